"""The region proposal network: torchvision's RPN built from plain options, and the builder
a model config's optional `rpn` node names.

- `build_rpn(in_channels, anchor_sizes, aspect_ratios, ...)`: an `AnchorGenerator` with one
  group of sizes per feature map, one shared `RPNHead` and a `RegionProposalNetwork`.
- `RPNBuilder`: the same options held by a builder (no parameters, so making it draws no
  random numbers); `detkit.modeling.build.build_faster_rcnn` calls it with the channels of
  the maps the RPN runs on:

      rpn: {_target_: detkit.modeling.heads.rpn.RPNBuilder, anchor_sizes: [[32], [64], [128], [256], [512]],
            aspect_ratios: [0.5, 1.0, 2.0], pre_nms_top_n_train: 2000, post_nms_top_n_test: 1000}

  Without the node, the model's flat `anchor_sizes`, `aspect_ratios` and `rpn_options` make
  the same builder. `anchor_sizes` null means the layout's default.
- `batched_proposals(rpn, images, image_size, features)`: the eval forward of a built RPN for
  a batch of images of one size with every image in the same tensors (its proposal filter's
  loop over the images as index arithmetic, `detkit.modeling.heads.per_image`), which a trace
  keeps free in the batch size: the ONNX export's form. It runs the RPN's own head, anchor
  generator and box coder and reads its settings (pre/post-NMS top-n, min size, score and NMS
  thresholds) from it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from detkit.modeling.heads.per_image import nms_first_per_image, take

__all__ = ["ASPECT_RATIOS", "RPNBuilder", "batched_proposals", "build_rpn"]

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def build_rpn(in_channels: int, anchor_sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[float],
              pre_nms_top_n_train: int = 2000, pre_nms_top_n_test: int = 1000,
              post_nms_top_n_train: int = 2000, post_nms_top_n_test: int = 1000, nms_thresh: float = 0.7,
              fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
              positive_fraction: float = 0.5, score_thresh: float = 0.0) -> RegionProposalNetwork:
    """RPN over feature maps of `in_channels` channels, one group of `anchor_sizes` per map.

    Every map gets `aspect_ratios` (height / width) for each of its sizes; all maps need
    the same number of anchors per position (one RPNHead is shared). pre/post_nms_top_n
    are per feature map / per image, as in torchvision. Proposals are (x1, y1, x2, y2)
    boxes in network-input pixels.
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


@dataclass(frozen=True)
class RPNBuilder:
    """The options of `build_rpn` but `in_channels`; anchor_sizes None: the layout's default."""

    anchor_sizes: Sequence[Sequence[int]] | None = None
    aspect_ratios: Sequence[float] = ASPECT_RATIOS
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0

    def __call__(self, in_channels: int, feature_names: Sequence[str],
                 default_anchor_sizes: Sequence[Sequence[int]]) -> RegionProposalNetwork:
        """The RPN over the maps `feature_names` (all of `in_channels` channels), with one
        anchor size group per map (`default_anchor_sizes` when this builder's are None)."""
        sizes = default_anchor_sizes if self.anchor_sizes is None else self.anchor_sizes
        if len(sizes) != len(feature_names):
            raise ValueError(f"anchor_sizes needs one group per RPN feature map {list(feature_names)}, "
                             f"got {sizes}")
        return build_rpn(in_channels, sizes, self.aspect_ratios, **self.options())

    def options(self) -> dict:
        """The keyword arguments of `build_rpn` after the aspect ratios (the flat rpn_options)."""
        return {f.name: getattr(self, f.name) for f in fields(RPNBuilder)
                if f.name not in ("anchor_sizes", "aspect_ratios")}


def batched_proposals(rpn: RegionProposalNetwork, images: Tensor, image_size: tuple[Tensor, Tensor],
                      features: Sequence[Tensor]) -> Tensor:
    """What `rpn(ImageList(images, sizes), features)` proposes in eval, for a batch of one size:
    images [B, 3, H, W] (transformed and padded), image_size the (h, w) of every image in it
    (0-dim tensors, or ints), features the maps the RPN runs on -> rois [K, 5] = (image index,
    x1, y1, x2, y2) in network-input pixels, ordered by (image, score) as torchvision's per-image
    lists concatenated. Sizes come from tensor shapes, so a trace keeps B, H and W free.

    As `RegionProposalNetwork.filter_proposals`: the top pre_nms_top_n per level, sigmoid, clip
    to the image, boxes smaller than min_size out, scores below score_thresh out, NMS per
    (image, level), the first post_nms_top_n per image."""
    num_images = torch._shape_as_tensor(images)[0]                                  # 0-dim int64
    batch = images.shape[0]
    maps = list(features)
    objectness, deltas = rpn.head(maps)
    anchors = rpn.anchor_generator(ImageList(images[:1], [image_size]), maps)[0]   # [N, 4], one image's
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    all_anchors = anchors.unsqueeze(0).expand(batch, -1, -1).reshape(-1, 4)
    proposals = rpn.box_coder.decode_single(deltas.detach(), all_anchors).view(batch, -1, 4)
    objectness = objectness.reshape(batch, -1)
    levels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_level)])
    levels = levels.reshape(1, -1).expand_as(objectness)
    top = rpn._get_top_n_idx(objectness, per_level)
    rows = torch.arange(batch)[:, None]
    scores = torch.sigmoid(objectness[rows, top]).reshape(-1)
    level = levels[rows, top].reshape(-1)
    boxes = clip_boxes_to_image(proposals[rows, top].reshape(-1, 4), image_size)
    image = rows.expand_as(top).reshape(-1)
    boxes, scores, level, image = take(remove_small_boxes(boxes, rpn.min_size), boxes, scores, level, image)
    boxes, scores, level, image = take(torch.where(scores >= rpn.score_thresh)[0], boxes, scores, level, image)
    keep = nms_first_per_image(boxes, scores, image, level, len(per_level), rpn.nms_thresh, rpn.post_nms_top_n(),
                               num_images)
    return torch.cat([image[keep, None].to(boxes.dtype), boxes[keep]], dim=1)
