"""The dynamic-batch eval forward of a detkit `FasterRCNN`, for files whose batch size is free.

torchvision's transform, RPN proposal filter and RoI post-processing loop over the images in
Python, which a trace unrolls (fixing the batch). `BatchedDetector` drives the model's own
parts through the forms of those steps that keep every image of a batch of one size in the
same tensors, each beside the eager computation it mirrors:

- `detkit.modeling.transform.transform_batch` / `boxes_to_input`: the transform and the way
  back to input pixels (one resize, one set of anchors and one clamp for the batch);
- the backbone and neck (`FasterRCNN.features`);
- `detkit.modeling.heads.rpn.batched_proposals`: the RPN (its head, anchors, box coder and
  settings) with its per-image proposal filter as index arithmetic;
- `detkit.modeling.heads.roi_heads.batched_detections`: the RoI heads (pooler, box head,
  predictor, box coder and settings) with their per-image post-processing likewise.

Outputs: boxes [D, 4] in input pixels, scores [D], labels [D], image_index [D].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.modeling.detector import FasterRCNN
from detkit.modeling.heads.roi_heads import batched_detections
from detkit.modeling.heads.rpn import batched_proposals
from detkit.modeling.transform import boxes_to_input, transform_batch


class BatchedDetector(nn.Module):
    """images [B, 3, H, W] (B free when traced) -> (boxes, scores, labels, image_index)."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        original = torch._shape_as_tensor(images)[2:]
        x, resized = transform_batch(model.transform, images)
        size = (resized[0], resized[1])                             # the resized size, as tensors
        features = model.features(x)
        rois = batched_proposals(model.rpn, x, size, [features[n] for n in model.rpn_in_features])
        boxes, scores, labels, image = batched_detections(model.roi_heads, features, rois, size)
        return boxes_to_input(boxes, resized, original), scores, labels, image
