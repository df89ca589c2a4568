"""The region proposal network: torchvision's RPN built from plain options.

`build_rpn(in_channels, anchor_sizes, aspect_ratios, ...)`: an `AnchorGenerator` with one
group of sizes per feature map, one shared `RPNHead` and a `RegionProposalNetwork`.
`detkit.modeling.build.build_faster_rcnn` calls it with the model config's flat
`anchor_sizes` (null: the layout's default), `aspect_ratios` and `rpn_options` (the keyword
arguments after them).

`batched_proposals(rpn, images, image_size, features)`: the eval forward of a built RPN for
a batch of images of one size with every image in the same tensors (its proposal filter's
loop over the images as index arithmetic, `detkit.modeling.heads.per_image`), which a trace
keeps free in the batch size: the ONNX export's form. It runs the RPN's own head, anchor
generator and box coder and reads its settings (pre/post-NMS top-n, min size, score and NMS
thresholds) from it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from detkit.modeling.heads.per_image import nms_first_per_image, take

__all__ = ["ASPECT_RATIOS", "batched_proposals", "build_rpn"]

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
