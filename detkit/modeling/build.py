"""Builders assembling Faster R-CNN parts from plain arguments (the targets of Hydra configs).

- `build_roi_heads`, `build_transform`: torchvision's RoI heads (with the 2fc box head and the
  linear predictor) and transform with the Faster R-CNN defaults; the RPN is
  `detkit.modeling.heads.rpn.build_rpn`.
- `build_faster_rcnn`: a whole detector around a built backbone (an object with
  `out_channels` and `strides` dicts whose forward returns {"res2".."res5": ...}), in
  one of two layouts:

  "fpn": FPN neck (out 256) on res2..res5 -> p2..p6; RPN on p2..p6 with one anchor
  size per level (32, 64, 128, 256, 512) x ratios (0.5, 1, 2); RoI pooling on p2..p5
  (FPN level rule), sampling ratio 2; 2fc head.

  "single_scale" (the DCN papers' layout): RPN on res4 with 5 sizes x 3 ratios
  (32..512 x 0.5, 1, 2) at every position; RoI pooling on res5 (stride 16 with a
  dilated res5, 32 otherwise), then the 2fc head (two 1024-d fc layers). res5 is
  computed once over the whole image, not per RoI as in detectron2's C4 head.
- `build_resnet`: the backbone, optionally from a torchvision ImageNet checkpoint.

Each part of the detector is configured one way: by the flat keys of `build_faster_rcnn`
(`pooler_kind`, `fpn_channels`, `anchor_sizes`, `rpn_options`, `representation_size`, ...;
docs/models.md). A model config names no builder of a part.

Deformable poolers hold `detkit.ops.DeformRoIPool`, so their offset branches are found
by `detkit.ops.offset_branch_parameters(model)`.

Every `_target_` a config names (`build_faster_rcnn`, `build_resnet`, the data sources, the
optimizer and schedule builders) is looked up in one registry, `detkit.config.registry`;
see docs/checkpoints.md.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detkit.modeling.backbone import ResNet, load_torchvision_weights
from detkit.modeling.detector import FasterRCNN
from detkit.modeling.heads.poolers import RoIPooler
from detkit.modeling.heads.rpn import ASPECT_RATIOS, build_rpn
from detkit.modeling.neck.fpn import FPN

LAYOUTS = ("fpn", "single_scale")
FPN_IN_FEATURES = ("res2", "res3", "res4", "res5")
FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
SINGLE_SCALE_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)


def build_roi_heads(box_roi_pool: nn.Module, in_channels: int, output_size: int, num_classes: int,
                    representation_size: int = 1024, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                    batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                    bbox_reg_weights: Sequence[float] | None = None, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections_per_img: int = 100) -> RoIHeads:
    """RoI heads: `box_roi_pool` -> [K, in_channels, output_size, output_size] -> the 2fc box
    head (torchvision's `TwoMLPHead`: flatten, fc6, ReLU, fc7, ReLU; the DCN papers' head of two
    `representation_size`-d fc layers) -> [K, representation_size] -> the linear predictor
    (`FastRCNNPredictor`) -> class scores [K, num_classes] (background included) and box
    deltas [K, 4 * num_classes]. The parameter names (fc6, fc7, cls_score, bbox_pred) are
    torchvision's, so torchvision Faster R-CNN checkpoints map onto `roi_heads.box_head.*` and
    `roi_heads.box_predictor.*`. bbox_reg_weights None means torchvision's (10, 10, 5, 5).
    """
    pooled_size = getattr(box_roi_pool, "output_size", output_size)
    if pooled_size not in (output_size, (output_size, output_size)):
        raise ValueError(f"box_roi_pool pools to {pooled_size} but output_size is {output_size}")
    head = TwoMLPHead(int(in_channels) * int(output_size) ** 2, int(representation_size))  # built first: the init order
    predictor = FastRCNNPredictor(int(representation_size), int(num_classes))
    weights = None if bbox_reg_weights is None else tuple(float(w) for w in bbox_reg_weights)
    return RoIHeads(box_roi_pool, head, predictor, fg_iou_thresh=fg_iou_thresh,
                    bg_iou_thresh=bg_iou_thresh, batch_size_per_image=batch_size_per_image,
                    positive_fraction=positive_fraction, bbox_reg_weights=weights,
                    score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img)


def build_transform(min_size: int | Sequence[int] = 800, max_size: int = 1333,
                    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                    image_std: Sequence[float] = (0.229, 0.224, 0.225),
                    size_divisible: int = 32) -> GeneralizedRCNNTransform:
    """Normalise (ImageNet mean/std), resize (shorter side `min_size`, one drawn per image in
    training when several are given, the last in eval; longer side at most `max_size`;
    bilinear) and batch with zero padding to a multiple of `size_divisible`."""
    sizes = (int(min_size),) if isinstance(min_size, (int, float)) else tuple(int(s) for s in min_size)
    return GeneralizedRCNNTransform(sizes, int(max_size), [float(m) for m in image_mean],
                                    [float(s) for s in image_std], size_divisible=int(size_divisible))


def build_faster_rcnn(backbone: nn.Module, num_classes: int, layout: str = "fpn", pooler_kind: str = "align", *,
                      fpn_channels: int = 256, rpn_feature: str = "res4", pool_feature: str = "res5",
                      anchor_sizes: Sequence[Sequence[int]] | None = None,
                      aspect_ratios: Sequence[float] = ASPECT_RATIOS, pooler_output_size: int = 7,
                      pooler_sampling_ratio: int = 2, deform_gamma: float = 0.1, deform_hidden_dim: int = 1024,
                      representation_size: int = 1024, rpn_options: Mapping | None = None,
                      roi_heads_options: Mapping | None = None,
                      transform_options: Mapping | None = None) -> FasterRCNN:
    """Faster R-CNN around `backbone` in the "fpn" or "single_scale" layout (module docstring).

    Every part is configured here, by flat keys only:
    - the neck (fpn layout): `FPN` with `fpn_channels` per level, on res2..res5 -> p2..p6;
    - the RPN (`build_rpn`): `anchor_sizes` (one group per RPN map; None: the layout's
      default), `aspect_ratios`, and `rpn_options` (its other keyword arguments); the
      single-scale layout runs it on `rpn_feature`;
    - the RoI pooler (`RoIPooler`): `pooler_kind` ("align", "alignv2", "pool", "deform",
      "mdeform"), `pooler_output_size`, `pooler_sampling_ratio`, and for the deformable kinds
      `deform_gamma` and `deform_hidden_dim` (the offset branch); the single-scale layout pools
      `pool_feature`;
    - the box head and predictor (`build_roi_heads`): the 2fc head of `representation_size`
      and the linear predictor, with `roi_heads_options` (sampling, NMS, thresholds).
      They have no node of their own: the 2fc head is the only head and `representation_size`
      its only option, and the predictor has none, so a node could only say again what
      `representation_size` says;
    - the transform (`build_transform`): `transform_options`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    neck, rpn_features, pool_features, channels, strides = _neck_and_maps(
        backbone, layout, fpn_channels, rpn_feature, pool_feature)
    pool_channels = channels[pool_features[0]]
    if any(channels[n] != pool_channels for n in pool_features):
        raise ValueError(f"pooled feature maps need equal channels, got { {n: channels[n] for n in pool_features} }")
    box_roi_pool = RoIPooler(pooler_kind, pool_features, [strides[n] for n in pool_features], pool_channels,
                             output_size=pooler_output_size, sampling_ratio=pooler_sampling_ratio,
                             gamma=deform_gamma, hidden_dim=deform_hidden_dim)
    default_sizes = FPN_ANCHOR_SIZES if layout == "fpn" else SINGLE_SCALE_ANCHOR_SIZES
    sizes = default_sizes if anchor_sizes is None else anchor_sizes
    if len(sizes) != len(rpn_features):
        raise ValueError(f"anchor_sizes needs one group per RPN feature map {rpn_features}, got {sizes}")
    region_proposals = build_rpn(channels[rpn_features[0]], sizes, aspect_ratios, **dict(rpn_options or {}))
    roi_heads = build_roi_heads(box_roi_pool, pool_channels, pooler_output_size, num_classes,
                                representation_size=representation_size, **dict(roi_heads_options or {}))
    transform = build_transform(**dict(transform_options or {}))
    return FasterRCNN(backbone, region_proposals, roi_heads, transform, neck, rpn_in_features=rpn_features,
                      num_classes=num_classes)


def _neck_and_maps(backbone: nn.Module, layout: str, fpn_channels: int, rpn_feature: str,
                   pool_feature: str) -> tuple[FPN | None, list[str], list[str], dict, dict]:
    """(the built neck or None, the RPN's maps, the pooled maps, {map: channels}, {map: stride}):
    the fpn layout's neck of `fpn_channels` on res2..res5 -> p2..p6 (RPN on all, pooling on
    p2..p5), or the single-scale layout's backbone maps."""
    channels, strides = dict(backbone.out_channels), dict(backbone.strides)
    if layout != "fpn":
        missing = [n for n in (rpn_feature, pool_feature) if n not in channels]
        if missing:
            raise ValueError(f"backbone lacks features {missing} (it has {list(channels)})")
        return None, [rpn_feature], [pool_feature], channels, strides
    missing = [n for n in FPN_IN_FEATURES if n not in channels]
    if missing:
        raise ValueError(f"the fpn layout needs backbone features {list(FPN_IN_FEATURES)}; the backbone "
                         f"lacks {missing} (it has {list(channels)})")
    built = FPN({n: channels[n] for n in FPN_IN_FEATURES}, strides, fpn_channels)
    rpn_features = list(built.strides)                         # p2..p6
    return built, rpn_features, rpn_features[:len(FPN_IN_FEATURES)], dict(built.out_channels), dict(built.strides)


def build_resnet(weights: str | None = None, **resnet_args) -> ResNet:
    """A `ResNet(**resnet_args)`, initialised from a torchvision ImageNet checkpoint file
    when `weights` is a path (config: `model.backbone.weights=/path/resnet50.pth`)."""
    backbone = ResNet(**resnet_args)
    if weights:
        load_torchvision_weights(backbone, weights)
    return backbone
