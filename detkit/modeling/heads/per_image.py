"""Per-image selections over a whole batch, as index arithmetic: the batched forms of the loops
over images in torchvision's RPN proposal filter and RoI heads' post-processing.

A trace unrolls a Python loop over the images, which fixes the batch size. Here the boxes of
all images sit in one tensor with their image index beside them, and

- `nms_first_per_image` is the per-image "NMS within each group (the RPN's feature levels, the
  RoI heads' classes), then the first k in score order" of both: one NMS over all images with
  (image, group) as the group (torchvision's coordinate trick keeps groups apart, as its
  per-image NMS keeps levels or classes apart), then `first_per_image`;
- `first_per_image` is a per-image `keep[:k]`, concatenated, from a running count of each
  image's boxes in score order (CumSum).

Used by `detkit.modeling.heads.rpn.batched_proposals` and
`detkit.modeling.heads.roi_heads.batched_detections`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["first_per_image", "nms_first_per_image", "take"]


def take(keep: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Each of `tensors` indexed by `keep` (the boxes and what goes with them)."""
    return tuple(t[keep] for t in tensors)


def first_per_image(order: Tensor, image: Tensor, k: int, num_images: Tensor) -> Tensor:
    """Of `order` (indices sorted by decreasing score), the first k of each image, returned
    ordered by (image, rank): what a per-image `keep[:k]`, concatenated, gives."""
    img = image[order]
    onehot = (img[:, None] == torch.arange(num_images)[None, :]).to(torch.int64)   # [N, B]
    rank = (torch.cumsum(onehot, dim=0) * onehot).sum(dim=1) - 1
    selected = torch.where(rank < k)[0]
    key = img[selected] * k + rank[selected]                                          # unique
    return order[selected][torch.argsort(key)]


def nms_first_per_image(boxes: Tensor, scores: Tensor, image: Tensor, group: Tensor, num_groups: int,
                        iou_threshold: float, k: int, num_images: Tensor) -> Tensor:
    """Indices of the boxes [N, 4] that NMS at `iou_threshold` keeps within each (image, group),
    the first k of each image by score, ordered by (image, score): torchvision's per-image
    `batched_nms(boxes, scores, group, iou_threshold)[:k]`, concatenated over the images.
    image, group: int64 [N], group in [0, num_groups)."""
    keep = batched_nms(boxes, scores, image * num_groups + group, iou_threshold)
    return first_per_image(keep, image, k, num_images)
