"""RoI feature pooling over one feature map or an FPN pyramid, plain or deformable.

`RoIPooler` is what torchvision's `RoIHeads` calls as `box_roi_pool(features,
proposals, image_shapes)`. Kinds:

- "align": torchvision `roi_align` with aligned=False, as torchvision's
  `MultiScaleRoIAlign` (so torchvision Faster R-CNN checkpoints give the same
  features).
- "alignv2": RoIAlign with aligned=True (detectron2's ROIAlignV2), computed by
  `detkit.ops.deform_roi_pool` without offsets. The same op as the deformable kinds, so
  a deformable pooler's cost is measured against the same kernel; on the CPU it is also
  far faster than torchvision's serial roi_align backward (docs/benchmarks.md).
- "pool": torchvision `roi_pool` (Fast R-CNN's quantised max pooling).
- "deform": deformable RoI pooling (DCNv1), `detkit.ops.DeformRoIPool(modulated=False)`.
- "mdeform": modulated deformable RoI pooling (DCNv2), `DeformRoIPool(modulated=True)`.

The deformable kinds sample with aligned=True (the half-pixel shift: the semantics
of `detkit.ops.deform_roi_pool`), like "alignv2" and unlike "align". A fresh "deform"
pooler therefore equals "alignv2" and a fresh "mdeform" one half of it (mask sigmoid(0)).

Several feature maps: each RoI goes to one level by the FPN paper's rule (eq. 1),
level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped
to the levels present (level of a map = log2 of its stride), as torchvision does.
Unlike `MultiScaleRoIAlign`, the spatial scale of each map is 1/stride as given,
not inferred from the feature and image sizes.

For the deformable kinds all levels share ONE offset branch (the submodule
`deform_pool.offset_branch`, found by `detkit.ops.offset_branch_parameters`);
mmdetection instead builds one deformable RoI pooling layer, with its own branch,
per level.

`detkit.modeling.build.build_faster_rcnn` makes the detector's pooler from the model config's flat
`pooler_kind`, `pooler_output_size`, `pooler_sampling_ratio`, `deform_gamma` and
`deform_hidden_dim` keys, with the maps it pools from (names, strides, channels).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_area, roi_align, roi_pool

from detkit.modeling.heads.roi_align_gather import roi_align_gather
from detkit.ops import DeformRoIPool, deform_roi_pool

POOLER_KINDS = ("align", "alignv2", "pool", "deform", "mdeform")


def fpn_levels(boxes: Tensor, min_level: int, max_level: int, canonical_scale: float = 224,
               canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each box [K, 4] (x1, y1, x2, y2, image pixels) -> int64 [K] in [min, max].

    level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), clamped;
    a 224 x 224 box goes to level 4, 112 x 112 to 3, 448 x 448 to 5.
    """
    scale = torch.sqrt(box_area(boxes))
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale)
                        + torch.tensor(eps, dtype=scale.dtype, device=scale.device))
    return torch.clamp(level, min=min_level, max=max_level).to(torch.int64)


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes [N_i, 4] -> rois [sum N_i, 5] = (image index, x1, y1, x2, y2)."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rois, dim=0)


class RoIPooler(nn.Module):
    """Pool every proposal from its feature map into [C, output_size, output_size].

    Args:
        kind: one of "align", "alignv2", "pool", "deform", "mdeform" (module docstring).
        feature_names: the feature maps to pool from (e.g. ["res5"] or ["p2", ..., "p5"]).
        strides: their strides, same order. With several maps the strides must be
            consecutive powers of two (4, 8, 16, 32).
        in_channels: channels of those maps (the same for all of them).
        output_size: bins per side.
        sampling_ratio: bilinear samples per bin side (all kinds but "pool"); 0 means adaptive, ceil(bin size). torchvision's FPN model uses 2.
        gamma: scale of the normalised offsets (deformable kinds; 0.1 in the papers).
        canonical_scale, canonical_level: the FPN level rule's 224 and 4.
        hidden_dim, num_hidden: size and number of the offset branch's hidden fc layers
            (deformable kinds).

    forward(features {name: [B, C, H_l, W_l]}, proposals [N_i, 4] per image in
    (x1, y1, x2, y2) image pixels, image_shapes [(h, w)] per image) ->
    [sum N_i, C, output_size, output_size], in the order of the proposals.
    `level_indices` tells which map each box is pooled from, and `predict_offsets` what a
    deformable pooler shifts its bins by (both for visualisation, `detkit.vis`).
    """

    def __init__(self, kind: str, feature_names: Sequence[str], strides: Sequence[int], in_channels: int,
                 output_size: int = 7, sampling_ratio: int = 0, gamma: float = 0.1,
                 canonical_scale: float = 224, canonical_level: int = 4, hidden_dim: int = 1024,
                 num_hidden: int = 2) -> None:
        super().__init__()
        if kind not in POOLER_KINDS:
            raise ValueError(f"pooler kind must be one of {POOLER_KINDS}, got {kind!r}")
        if isinstance(feature_names, str):
            feature_names = [feature_names]
        if isinstance(strides, int):
            strides = [strides]
        self.feature_names = tuple(str(n) for n in feature_names)
        self.strides = tuple(int(s) for s in strides)
        if not self.feature_names or len(self.feature_names) != len(self.strides):
            raise ValueError(f"feature_names {list(self.feature_names)} and strides {list(self.strides)} "
                             "must be non-empty and of the same length")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature_names must be distinct, got {list(self.feature_names)}")
        if any(s <= 0 for s in self.strides):
            raise ValueError(f"strides must be positive, got {list(self.strides)}")
        if len(self.strides) > 1:
            levels = [math.log2(s) for s in self.strides]
            if not all(lv.is_integer() for lv in levels) or any(
                    b != a + 1 for a, b in zip(levels, levels[1:])):
                raise ValueError("with several feature maps the strides must be consecutive powers of two, "
                                 f"finest first (e.g. 4, 8, 16, 32), got {list(self.strides)}")
            self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        if not isinstance(output_size, int) or isinstance(output_size, bool) or output_size <= 0:
            raise ValueError(f"output_size must be a positive int, got {output_size!r}")
        self.kind, self.in_channels, self.output_size = kind, int(in_channels), output_size
        self.sampling_ratio, self.gamma = int(sampling_ratio), float(gamma)
        self.canonical_scale, self.canonical_level = canonical_scale, int(canonical_level)
        self.deform_pool: DeformRoIPool | None = None
        if kind in ("deform", "mdeform"):
            # One branch for all levels. Its spatial_scale stays 1: forward hands it RoIs
            # already in the pixels of the level's feature map (exact for power-of-two strides).
            self.deform_pool = DeformRoIPool(
                self.in_channels, output_size, spatial_scale=1.0, sampling_ratio=self.sampling_ratio,
                gamma=self.gamma, modulated=kind == "mdeform", hidden_dim=hidden_dim, num_hidden=num_hidden)

    def _cast(self, feature: Tensor, rois: Tensor) -> Tensor:
        """rois in the feature's dtype for torchvision's ops; for detkit's, at least float32, so
        that batch indices stay exact under a float16 / bfloat16 feature (left as they are under
        autocast, which picks the op's dtype)."""
        if torch.is_autocast_enabled(feature.device.type):
            return rois
        if self.kind in ("align", "pool"):
            return rois.to(feature.dtype)
        return rois.to(torch.promote_types(feature.dtype, torch.float32))

    @staticmethod
    def _to_level(rois: Tensor, scale: float) -> Tensor:
        """rois [K, 5] in image pixels -> in the pixels of a level of stride 1 / scale, for
        `deform_pool` (whose spatial_scale is 1)."""
        return torch.cat([rois[:, :1], rois[:, 1:] * scale], dim=1)

    def _pool(self, feature: Tensor, rois: Tensor, stride: int) -> Tensor:
        rois = self._cast(feature, rois)
        scale = 1.0 / stride
        if self.kind == "align":
            return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, aligned=False)
        if self.kind == "pool":
            return roi_pool(feature, rois, self.output_size, scale)
        if self.kind == "alignv2":
            return deform_roi_pool(feature, rois, None, None, self.output_size, scale, self.sampling_ratio)
        assert self.deform_pool is not None
        return self.deform_pool(feature, self._to_level(rois, scale))

    def check_gather_form(self) -> None:
        """ValueError unless this pooler has a gather form (`gather_pool`)."""
        if self.kind == "pool":
            raise ValueError("the 'pool' kind (quantised max pooling) has no gather form")
        if self.sampling_ratio <= 0:
            raise ValueError("adaptive sampling (sampling_ratio=0) has no fixed-shape gather form")

    def gather_pool(self, feature: Tensor, rois: Tensor, stride: int) -> Tensor:
        """`_pool` written with gathers (`roi_align_gather`), for ONNX graphs without RoiAlign
        (opset 22): kinds "align", "alignv2", "deform" and "mdeform" with a fixed sampling ratio;
        a deformable kind runs its own offset branch (`DeformRoIPool.offset_branch`)."""
        self.check_gather_form()
        size = (self.output_size, self.output_size)
        rois = rois.to(feature.dtype)
        if self.kind == "align":
            return roi_align_gather(feature, rois, size, 1.0 / stride, self.sampling_ratio, aligned=False)
        if self.kind == "alignv2":
            return roi_align_gather(feature, rois, size, 1.0 / stride, self.sampling_ratio)
        deform = self.deform_pool
        scaled = self._to_level(rois, 1.0 / stride)
        plain = roi_align_gather(feature, scaled, deform.output_size, 1.0, deform.sampling_ratio)
        out = deform.offset_branch(plain.flatten(1))
        bins = deform.output_size[0] * deform.output_size[1]
        offset = out[:, :2 * bins].reshape(-1, 2, *deform.output_size)
        mask = torch.sigmoid(out[:, 2 * bins:]).reshape(-1, 1, *deform.output_size) if deform.modulated else None
        return roi_align_gather(feature, scaled, deform.output_size, 1.0, deform.sampling_ratio, offset=offset,
                                mask=mask, gamma=deform.gamma)

    def level_indices(self, boxes: Tensor) -> Tensor:
        """boxes [K, 4] (x1, y1, x2, y2) in network-input pixels -> int64 [K]: the index into
        `feature_names` / `strides` of the map each box is pooled from (the FPN level rule
        with several maps, module docstring; 0 for a single map)."""
        if len(self.feature_names) == 1:
            return torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
        return fpn_levels(boxes, self.min_level, self.max_level, self.canonical_scale,
                          self.canonical_level) - self.min_level

    def forward(self, features: Mapping[str, Tensor], proposals: Sequence[Tensor],
                image_shapes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        missing = [n for n in self.feature_names if n not in features]
        if missing:
            raise ValueError(f"RoIPooler pools from {list(self.feature_names)} but features lack {missing} "
                             f"(got {list(features)})")
        return self.pool_rois(features, boxes_to_rois(proposals))

    def pool_rois(self, features: Mapping[str, Tensor], rois: Tensor,
                  pool: Callable[[Tensor, Tensor, int], Tensor] | None = None) -> Tensor:
        """rois [K, 5] = (batch_index, x1, y1, x2, y2) in image pixels -> [K, C, ph, pw], each RoI
        pooled from the level the FPN rule assigns it (the only map in the single-scale layout)
        by `pool(feature, rois, stride)` (default: this pooler's own; the ONNX export passes its
        gather form)."""
        pool = self._pool if pool is None else pool
        maps = [features[n] for n in self.feature_names]
        if len(maps) == 1:
            return pool(maps[0], rois, self.strides[0])
        levels = self.level_indices(rois[:, 1:])
        order, pooled = [], []
        for i, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(levels == i)[0]
            order.append(index)
            pooled.append(pool(feature, rois[index], stride).to(maps[0].dtype))
        # Levels come out grouped; put them back in RoI order.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def predict_offsets(self, features: Mapping[str, Tensor], rois: Tensor) -> tuple[Tensor, Tensor | None]:
        """What a deformable pooler ("deform", "mdeform") shifts its bins by.

        rois [K, 5] = (batch_index, x1, y1, x2, y2) in network-input pixels (on any device: the
        levels are computed there), each taken to the map `level_indices` picks, as `pool_rois`
        does -> (offset [K, 2, ph, pw] normalised (x, y) shifts, mask [K, 1, ph, pw] bin weights
        or None for "deform"), in RoI order, on the features' device.
        """
        if self.deform_pool is None:
            raise ValueError(f"a {self.kind!r} RoIPooler has no offsets; only 'deform' and 'mdeform' do")
        levels = self.level_indices(rois[:, 1:])
        order, offsets, masks = [], [], []
        for i, (name, stride) in enumerate(zip(self.feature_names, self.strides)):
            index = torch.where(levels == i)[0]
            feature = features[name]
            level_rois = self._cast(feature, rois[index].to(feature.device))
            offset, mask = self.deform_pool.predict_offsets(feature, self._to_level(level_rois, 1.0 / stride))
            order.append(index.to(feature.device))
            offsets.append(offset)
            masks.append(mask)
        back = torch.argsort(torch.cat(order))
        return torch.cat(offsets)[back], None if masks[0] is None else torch.cat(masks)[back]

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, feature_names={list(self.feature_names)}, strides={list(self.strides)}, "
                f"in_channels={self.in_channels}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")


class GatherRoIPooler(nn.Module):
    """A RoIPooler's forward ("align", "alignv2", "deform", "mdeform"; fixed sampling ratio)
    with its pooling done by `RoIPooler.gather_pool`, sharing the pooler's offset branch: what
    the ONNX export swaps in for opset 22."""

    def __init__(self, pooler: RoIPooler) -> None:
        super().__init__()
        pooler.check_gather_form()
        self.pooler = pooler

    def pool_rois(self, features: Mapping[str, Tensor], rois: Tensor) -> Tensor:
        """`RoIPooler.pool_rois` through the gather form."""
        return self.pooler.pool_rois(features, rois, self.pooler.gather_pool)

    def forward(self, features, proposals, image_shapes=None) -> Tensor:
        return self.pool_rois(features, boxes_to_rois(proposals))
