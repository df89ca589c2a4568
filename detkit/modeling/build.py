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

Deformable poolers hold `detkit.ops.DeformRoIPool`, so their offset branches are found
by `detkit.ops.offset_branch_parameters(model)`.

Every `_target_` a config names (these builders, the box head builders, the data sources,
the optimizer and schedule builders) is looked up in one registry, `detkit.engine.config`
(`BUILDERS` here is the same mapping); see docs/checkpoints.md.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detkit.modeling.backbone import ResNet, load_torchvision_weights
from detkit.modeling.detector import FasterRCNN
from detkit.modeling.heads.box_head import (BoxHeadBuilder, BoxPredictorBuilder, FastRCNNPredictorBuilder,
                                            TwoMLPHeadBuilder)
from detkit.modeling.heads.poolers import RoIPooler
from detkit.modeling.neck.fpn import FPN

LAYOUTS = ("fpn", "single_scale")
FPN_IN_FEATURES = ("res2", "res3", "res4", "res5")
FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
SINGLE_SCALE_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def build_rpn(in_channels: int, anchor_sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[float],
              pre_nms_top_n_train: int = 2000, pre_nms_top_n_test: int = 1000,
              post_nms_top_n_train: int = 2000, post_nms_top_n_test: int = 1000, nms_thresh: float = 0.7,
              fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
              positive_fraction: float = 0.5, score_thresh: float = 0.0) -> RegionProposalNetwork:
    """RPN over feature maps of `in_channels` channels, one group of `anchor_sizes` per map.

    Every map gets `aspect_ratios` (height / width) for each of its sizes; all maps need
    the same number of anchors per position (one RPNHead is shared). pre/post_nms_top_n
    are per feature map / per image, as in torchvision.
    """
    sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    ratios = tuple(float(r) for r in aspect_ratios)
    if not sizes or not all(sizes) or not ratios:
        raise ValueError(f"anchor_sizes (one non-empty group per feature map) and aspect_ratios must be "
                         f"non-empty, got {sizes} and {ratios}")
    if len({len(level) for level in sizes}) != 1:
        raise ValueError(f"every feature map needs the same number of anchor sizes (the RPN head is "
                         f"shared), got {sizes}")
    anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes))
    head = RPNHead(int(in_channels), anchor_generator.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        anchor_generator, head, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
        batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        pre_nms_top_n={"training": int(pre_nms_top_n_train), "testing": int(pre_nms_top_n_test)},
        post_nms_top_n={"training": int(post_nms_top_n_train), "testing": int(post_nms_top_n_test)},
        nms_thresh=nms_thresh, score_thresh=score_thresh)


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
                      roi_heads_options: Mapping | None = None,
                      transform_options: Mapping | None = None) -> FasterRCNN:
    """Faster R-CNN around `backbone` in the "fpn" or "single_scale" layout (module docstring).

    pooler_kind: "align", "alignv2", "pool", "deform" or "mdeform" (`RoIPooler`). rpn_feature and
    pool_feature are the single-scale layout's maps. anchor_sizes None means the
    layout's default. box_head, box_predictor: the optional config nodes of the same names
    (`detkit.modeling.heads.box_head`), built by `build_roi_heads` with the pooled size;
    without box_head, the 2fc head of `representation_size` (None: 1024), which cannot be
    given with a box_head. rpn_options, roi_heads_options and transform_options are passed
    as keyword arguments to `build_rpn`, `build_roi_heads` and `build_transform`.
    """
    if box_head is not None and representation_size is not None:
        raise ValueError("representation_size is the width of the default box head; with a box_head node, set "
                         "the head's own options there instead")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    channels, strides = dict(backbone.out_channels), dict(backbone.strides)
    neck: FPN | None = None
    if layout == "fpn":
        missing = [n for n in FPN_IN_FEATURES if n not in channels]
        if missing:
            raise ValueError(f"the fpn layout needs backbone features {list(FPN_IN_FEATURES)}; the backbone "
                             f"lacks {missing} (it has {list(channels)})")
        neck = FPN({n: channels[n] for n in FPN_IN_FEATURES}, strides, fpn_channels, extra_max_pool=True)
        rpn_features = list(neck.strides)                          # p2..p6
        pool_features = rpn_features[:len(FPN_IN_FEATURES)]        # p2..p5
        channels, strides = neck.out_channels, neck.strides
        anchor_sizes = FPN_ANCHOR_SIZES if anchor_sizes is None else anchor_sizes
    else:
        rpn_features, pool_features = [rpn_feature], [pool_feature]
        missing = [n for n in (rpn_feature, pool_feature) if n not in channels]
        if missing:
            raise ValueError(f"backbone lacks features {missing} (it has {list(channels)})")
        anchor_sizes = SINGLE_SCALE_ANCHOR_SIZES if anchor_sizes is None else anchor_sizes
    if len(anchor_sizes) != len(rpn_features):
        raise ValueError(f"anchor_sizes needs one group per RPN feature map {rpn_features}, got {anchor_sizes}")
    pool_channels = channels[pool_features[0]]
    if any(channels[n] != pool_channels for n in pool_features):
        raise ValueError(f"pooled feature maps need equal channels, got { {n: channels[n] for n in pool_features} }")
    pooler = RoIPooler(pooler_kind, pool_features, [strides[n] for n in pool_features], pool_channels,
                       output_size=pooler_output_size, sampling_ratio=pooler_sampling_ratio, gamma=deform_gamma,
                       hidden_dim=deform_hidden_dim)
    rpn = build_rpn(channels[rpn_features[0]], anchor_sizes, aspect_ratios, **dict(rpn_options or {}))
    roi_heads = build_roi_heads(pooler, pool_channels, pooler_output_size, num_classes,
                                representation_size=1024 if representation_size is None else representation_size,
                                box_head=box_head, box_predictor=box_predictor, **dict(roi_heads_options or {}))
    transform = build_transform(**dict(transform_options or {}))
    return FasterRCNN(backbone, rpn, roi_heads, transform, neck, rpn_in_features=rpn_features,
                      num_classes=num_classes)


def build_resnet(weights: str | None = None, **resnet_args) -> ResNet:
    """A `ResNet(**resnet_args)`, initialised from a torchvision ImageNet checkpoint file
    when `weights` is a path (config: `model.backbone.weights=/path/resnet50.pth`)."""
    backbone = ResNet(**resnet_args)
    if weights:
        load_torchvision_weights(backbone, weights)
    return backbone


# ------------------------------------------------------------------ the registry of config targets

def __getattr__(name: str) -> Any:
    # BUILDERS, FILE_ARGUMENTS and ALLOWED_TARGETS were defined here when the allowlist held
    # only the model's builders; they now name the one registry of config targets (model, data,
    # schedule), `detkit.engine.config`, imported when first asked for (it imports this module).
    if name in ("BUILDERS", "FILE_ARGUMENTS", "ALLOWED_TARGETS"):
        from detkit.engine import config

        return {"BUILDERS": config.targets, "FILE_ARGUMENTS": config.file_arguments,
                "ALLOWED_TARGETS": config.allowed_targets}[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
