"""The RoI heads' eval forward for a batch with every image in the same tensors.

The RoI heads are torchvision's `RoIHeads` (built by `detkit.modeling.build.build_roi_heads`
around detkit's `RoIPooler`, torchvision's 2fc box head and linear predictor); in eval
they pool the proposals, run the box head and predictor, then post-process each image in a
Python loop (`RoIHeads.postprocess_detections`), which a trace unrolls.
`batched_detections` is that forward with the loop as index arithmetic
(`detkit.modeling.heads.per_image`), so that a trace keeps the batch size free: the ONNX
export's form. It runs the heads' own pooler (`pool_rois`), box head, predictor and box coder
and reads their settings (score and NMS thresholds, detections per image) from them.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from detkit.modeling.heads.per_image import nms_first_per_image, take

__all__ = ["MIN_DETECTION_SIZE", "batched_detections"]

# The side (network-input pixels) below which RoIHeads.postprocess_detections drops a detection:
# a constant in torchvision's code, not a setting of the module.
MIN_DETECTION_SIZE = 1e-2


def batched_detections(roi_heads: RoIHeads, features: Mapping[str, Tensor], rois: Tensor,
                       image_size: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What `roi_heads(features, proposals, image_sizes)` detects in eval, for a batch of one size:
    features {name: [B, C, H_l, W_l]}, rois [K, 5] = (image index, x1, y1, x2, y2) in
    network-input pixels (`detkit.modeling.heads.rpn.batched_proposals`), image_size the (h, w)
    of every image (0-dim tensors, or ints) ->
    (boxes [D, 4] in network-input pixels, scores [D], labels [D] int64, image index [D] int64),
    ordered by (image, score) as torchvision's per-image lists concatenated.

    As `RoIHeads.postprocess_detections`: softmax, box decoding, clip to the image, the
    background dropped, scores above score_thresh, boxes smaller than MIN_DETECTION_SIZE out,
    NMS per (image, class), the first detections_per_img per image."""
    num_images = torch._shape_as_tensor(next(iter(features.values())))[0]             # 0-dim int64
    pooled = roi_heads.box_roi_pool.pool_rois(features, rois)   # RoIPooler, or its GatherRoIPooler
    class_logits, box_regression = roi_heads.box_predictor(roi_heads.box_head(pooled))
    num_classes = class_logits.shape[-1]
    pred = roi_heads.box_coder.decode_single(box_regression, rois[:, 1:]).reshape(rois.shape[0], -1, 4)
    pred = clip_boxes_to_image(pred, image_size)
    probs = F.softmax(class_logits, -1)
    labels = torch.arange(num_classes).view(1, -1).expand_as(probs)
    roi_image = rois[:, 0].to(torch.int64)[:, None].expand_as(probs)
    boxes = pred[:, 1:].reshape(-1, 4)
    scores, labels, image = probs[:, 1:].reshape(-1), labels[:, 1:].reshape(-1), roi_image[:, 1:].reshape(-1)
    boxes, scores, labels, image = take(torch.where(scores > roi_heads.score_thresh)[0], boxes, scores, labels, image)
    boxes, scores, labels, image = take(remove_small_boxes(boxes, min_size=MIN_DETECTION_SIZE),
                                        boxes, scores, labels, image)
    keep = nms_first_per_image(boxes, scores, image, labels, num_classes, roi_heads.nms_thresh,
                               roi_heads.detections_per_img, num_images)
    return take(keep, boxes, scores, labels, image)
