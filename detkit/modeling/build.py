"""Builders assembling Faster R-CNN parts from plain arguments (the targets of Hydra configs).

- `build_rpn`, `build_roi_heads`, `build_transform`: torchvision's RPN, RoI heads and
  transform with the Faster R-CNN defaults.
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

The neck, the RPN and the RoI pooler are made by builders (`FPNBuilder`, `RPNBuilder`,
`RoIPoolerBuilder`; the box head's are in `detkit.modeling.heads.box_head`): option holders
that a model config may give as the `neck`, `rpn` and `pooler` nodes, else made from the
flat options, and that `build_faster_rcnn` calls with the sizes it computes.

Deformable poolers hold `detkit.ops.DeformRoIPool`, so their offset branches are found
by `detkit.ops.offset_branch_parameters(model)`.

Every `_target_` a config names (these builders, the box head builders, the data sources,
the optimizer and schedule builders) is looked up in one registry, `detkit.config.registry`;
see docs/checkpoints.md.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detkit.modeling.backbone import ResNet, load_torchvision_weights
from detkit.modeling.detector import FasterRCNN
from detkit.modeling.heads.box_head import (BoxHeadBuilder, BoxPredictorBuilder, FastRCNNPredictorBuilder,
                                            TwoMLPHeadBuilder)
from detkit.modeling.heads.poolers import RoIPoolerBuilder
from detkit.modeling.heads.rpn import ASPECT_RATIOS, RPNBuilder
from detkit.modeling.neck.fpn import FPN, FPNBuilder

LAYOUTS = ("fpn", "single_scale")
FPN_IN_FEATURES = ("res2", "res3", "res4", "res5")
FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
SINGLE_SCALE_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
# The flat options each optional node replaces, with their defaults: with the node, a flat
# option must be left at its default (it would be silently ignored otherwise).
POOLER_FLAT_DEFAULTS = {"pooler_kind": "align", "pooler_output_size": 7, "pooler_sampling_ratio": 2,
                        "deform_gamma": 0.1, "deform_hidden_dim": 1024}
NECK_FLAT_DEFAULTS = {"fpn_channels": 256}
RPN_FLAT_DEFAULTS = {"anchor_sizes": None, "aspect_ratios": ASPECT_RATIOS, "rpn_options": None}


def build_roi_heads(box_roi_pool: nn.Module, in_channels: int, output_size: int, num_classes: int,
                    representation_size: int = 1024, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                    batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                    bbox_reg_weights: Sequence[float] | None = None, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections_per_img: int = 100,
                    box_head: BoxHeadBuilder | None = None,
                    box_predictor: BoxPredictorBuilder | None = None) -> RoIHeads:
    """RoI heads: `box_roi_pool` -> [K, in_channels, output_size, output_size] -> box head ->
    [K, F] -> box predictor -> class scores [K, num_classes] (background included) and box
    deltas [K, 4 * num_classes].

    box_head: a `BoxHeadBuilder` (a model config's `box_head` node), called with
    (in_channels, output_size); None means the 2fc head of `representation_size`
    (`TwoMLPHeadBuilder`). box_predictor: a `BoxPredictorBuilder`, called with
    (box_head.out_features, num_classes); None means `FastRCNNPredictorBuilder`.
    bbox_reg_weights None means torchvision's (10, 10, 5, 5).
    """
    pooled_size = getattr(box_roi_pool, "output_size", output_size)
    if pooled_size not in (output_size, (output_size, output_size)):
        raise ValueError(f"box_roi_pool pools to {pooled_size} but output_size is {output_size}")
    head_builder = TwoMLPHeadBuilder(int(representation_size)) if box_head is None else box_head
    predictor_builder = FastRCNNPredictorBuilder() if box_predictor is None else box_predictor
    head = head_builder(int(in_channels), int(output_size))       # built first: the init order of before
    predictor = predictor_builder(int(head_builder.out_features), int(num_classes))
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
                      representation_size: int | None = None, box_head: BoxHeadBuilder | None = None,
                      box_predictor: BoxPredictorBuilder | None = None, rpn_options: Mapping | None = None,
                      roi_heads_options: Mapping | None = None, transform_options: Mapping | None = None,
                      pooler: RoIPoolerBuilder | None = None, neck: FPNBuilder | None = None,
                      rpn: RPNBuilder | None = None) -> FasterRCNN:
    """Faster R-CNN around `backbone` in the "fpn" or "single_scale" layout (module docstring).

    pooler_kind: "align", "alignv2", "pool", "deform" or "mdeform" (`RoIPooler`). rpn_feature and
    pool_feature are the single-scale layout's maps. anchor_sizes None means the
    layout's default. box_head, box_predictor: the optional config nodes of the same names
    (`detkit.modeling.heads.box_head`), built by `build_roi_heads` with the pooled size;
    without box_head, the 2fc head of `representation_size` (None: 1024), which cannot be
    given with a box_head. rpn_options, roi_heads_options and transform_options are passed
    as keyword arguments to `build_rpn`, `build_roi_heads` and `build_transform`.

    pooler, neck, rpn: the optional config nodes of the same names (`RoIPoolerBuilder`,
    `FPNBuilder` for the fpn layout, `RPNBuilder`), called with the maps' names, strides and
    channels. Without one, the flat options it replaces (pooler_kind, pooler_*, deform_*;
    fpn_channels; anchor_sizes, aspect_ratios, rpn_options) make the same builder; with one,
    those must stay at their defaults.
    """
    if box_head is not None and representation_size is not None:
        raise ValueError("representation_size is the width of the default box head; with a box_head node, set "
                         "the head's own options there instead")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_flat_options("pooler", pooler, POOLER_FLAT_DEFAULTS, pooler_kind=pooler_kind,
                        pooler_output_size=pooler_output_size, pooler_sampling_ratio=pooler_sampling_ratio,
                        deform_gamma=deform_gamma, deform_hidden_dim=deform_hidden_dim)
    _check_flat_options("neck", neck, NECK_FLAT_DEFAULTS, fpn_channels=fpn_channels)
    _check_flat_options("rpn", rpn, RPN_FLAT_DEFAULTS, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios,
                        rpn_options=rpn_options)
    if neck is not None and layout != "fpn":
        raise ValueError(f"a neck node needs the fpn layout; the {layout!r} layout has no neck")
    pooler_builder = pooler if pooler is not None else RoIPoolerBuilder(
        pooler_kind, pooler_output_size, pooler_sampling_ratio, deform_gamma, deform_hidden_dim)
    rpn_builder = rpn if rpn is not None else RPNBuilder(anchor_sizes, aspect_ratios, **dict(rpn_options or {}))
    neck_builder = neck if neck is not None else FPNBuilder(fpn_channels)
    built_neck, rpn_features, pool_features, channels, strides = _neck_and_maps(
        backbone, layout, neck_builder, rpn_feature, pool_feature)
    pool_channels = channels[pool_features[0]]
    if any(channels[n] != pool_channels for n in pool_features):
        raise ValueError(f"pooled feature maps need equal channels, got { {n: channels[n] for n in pool_features} }")
    box_roi_pool = pooler_builder(pool_features, [strides[n] for n in pool_features], pool_channels)
    default_sizes = FPN_ANCHOR_SIZES if layout == "fpn" else SINGLE_SCALE_ANCHOR_SIZES
    region_proposals = rpn_builder(channels[rpn_features[0]], rpn_features, default_sizes)
    roi_heads = build_roi_heads(box_roi_pool, pool_channels, pooler_builder.output_size, num_classes,
                                representation_size=1024 if representation_size is None else representation_size,
                                box_head=box_head, box_predictor=box_predictor, **dict(roi_heads_options or {}))
    transform = build_transform(**dict(transform_options or {}))
    return FasterRCNN(backbone, region_proposals, roi_heads, transform, built_neck, rpn_in_features=rpn_features,
                      num_classes=num_classes)


def _neck_and_maps(backbone: nn.Module, layout: str, neck: FPNBuilder, rpn_feature: str,
                   pool_feature: str) -> tuple[FPN | None, list[str], list[str], dict, dict]:
    """(the built neck or None, the RPN's maps, the pooled maps, {map: channels}, {map: stride}):
    the fpn layout's neck on res2..res5 -> p2..p6 (RPN on all, pooling on p2..p5), or the
    single-scale layout's backbone maps."""
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
    built = neck({n: channels[n] for n in FPN_IN_FEATURES}, strides)
    rpn_features = list(built.strides)                         # p2..p6
    return built, rpn_features, rpn_features[:len(FPN_IN_FEATURES)], dict(built.out_channels), dict(built.strides)


def _check_flat_options(name: str, node: Any, defaults: Mapping[str, Any], **given: Any) -> None:
    """With a `name` node, every flat option it replaces must be at its default (or be empty)."""
    if node is None:
        return
    for key, value in given.items():
        if _plain(value) != _plain(defaults[key]):
            raise ValueError(f"{key} is an option of the default {name}; with a {name} node, set the node's own "
                             f"options there instead (got {key}={value!r} and {name}={node!r})")


def _plain(value: Any) -> Any:
    """Sequences as nested tuples and an empty mapping as None, for comparing options."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _plain(v)) for k, v in value.items())) or None
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_plain(v) for v in value)
    return value


def build_resnet(weights: str | None = None, **resnet_args) -> ResNet:
    """A `ResNet(**resnet_args)`, initialised from a torchvision ImageNet checkpoint file
    when `weights` is a path (config: `model.backbone.weights=/path/resnet50.pth`)."""
    backbone = ResNet(**resnet_args)
    if weights:
        load_torchvision_weights(backbone, weights)
    return backbone
