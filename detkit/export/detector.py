"""The per-image eval forward of a detkit `FasterRCNN`, as the TorchScript ONNX exporter traces
it into one graph with dynamic image sizes (batch fixed).

`ExportableDetector(model)` computes what `model.eval()(list(images))` computes from the
model's own parts: the transform's traceable form `detkit.modeling.transform.transform_images`,
then `FasterRCNN.detect` (backbone, neck, torchvision's RPN and RoI heads, whose loops over
the images a trace unrolls) and `FasterRCNN.postprocess`. It takes one [B, 3, H, W] tensor and
returns flat tensors. Sizes come from tensor shapes, never from Python ints (which tracing
would freeze): torchvision's anchor generator, proposal filter, RoI heads, batching and box
clamp switch to such code paths while tracing, and the transform's resize is
`detkit.modeling.transform.resize_like_eager`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.modeling.detector import FasterRCNN
from detkit.modeling.transform import transform_images


class ExportableDetector(nn.Module):
    """images [B, 3, H, W] float RGB in [0, 1] -> (boxes [D, 4] x1y1x2y2 in input pixels,
    scores [D], labels [D] int64, image_index [D] int64), detections of all images
    concatenated in image order (B is fixed when traced; H and W stay dynamic)."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        image_list = [images[i] for i in range(images.shape[0])]
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in image_list]
        batch = transform_images(model.transform, image_list)
        detections, _ = model.detect(batch)
        detections = model.postprocess(detections, batch.image_sizes, original_sizes)
        if len(detections) == 1:
            det = detections[0]
            return det["boxes"], det["scores"], det["labels"], torch.full_like(det["labels"], 0)
        return (torch.cat([det["boxes"] for det in detections]), torch.cat([det["scores"] for det in detections]),
                torch.cat([det["labels"] for det in detections]),
                torch.cat([torch.full_like(det["labels"], i) for i, det in enumerate(detections)]))
