"""The eval forward of a detkit `FasterRCNN` in a form the TorchScript ONNX exporter traces
into one graph with dynamic image sizes.

`ExportableDetector(model)` computes what `model.eval()(list(images))` computes (it runs the
model's own `FasterRCNN.detect`: same submodules, same weights) but takes one [B, 3, H, W] tensor and returns flat tensors.
Everything that depends on the image size is computed from tensor shapes, never from
Python ints (which tracing would freeze): torchvision's anchor generator, proposal filter,
RoI heads and batching already switch to such code paths while tracing; the final clamp of
the boxes to the input image uses `torchvision.ops.clip_boxes_to_image`, which does the same.

The resize is this module's own (`resize_like_eager`): torchvision's tracing path computes
the resized size as floor(h * scale) in float32 with the scale from a reciprocal, which
for some sizes (227 x 227 -> 191 instead of 192 at min_size 192, 1 image in 7 of the
synthetic val set) is one pixel short of eager PyTorch's float64 floor(h * min_size /
min(h, w)); every feature then differs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import clip_boxes_to_image

from detkit.modeling.detector import FasterRCNN


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
        batch = self.transform(image_list)
        detections, _ = model.detect(batch)
        detections = model.transform.postprocess(detections, batch.image_sizes, original_sizes)
        boxes, scores, labels, index = [], [], [], []
        for i, (det, size) in enumerate(zip(detections, original_sizes)):
            boxes.append(clip_boxes_to_image(det["boxes"], size))
            scores.append(det["scores"])
            labels.append(det["labels"])
            index.append(torch.full_like(det["labels"], i))
        if len(detections) == 1:
            return boxes[0], scores[0], labels[0], index[0]
        return torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(index)

    def transform(self, images: list[Tensor]) -> ImageList:
        """GeneralizedRCNNTransform's eval forward (normalise, resize, pad to a multiple of
        size_divisible) with `resize_like_eager` as the resize."""
        transform = self.model.transform
        resized = [resize_like_eager(transform.normalize(img), int(transform.min_size[-1]),
                                     int(transform.max_size)) for img in images]
        sizes = [img.shape[-2:] for img in resized]
        batch = transform.batch_images(resized, size_divisible=transform.size_divisible)
        return ImageList(batch, [(size[0], size[1]) for size in sizes])


def resize_like_eager(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """image [C, H, W] (or a batch [B, C, H, W] of one size) resized bilinearly as
    GeneralizedRCNNTransform resizes it in eager mode: to floor(side * scale) with
    scale = min(min_size / min(H, W), max_size / max(H, W)), all in float64, and coordinates
    mapped with the input / output size ratio (half-pixel).

    While tracing, the size is computed from the shape in float64 and handed to
    `interpolate` as per-side scale factors (size + 0.5) / side: its float32
    floor(side * factor) then lands on the size whatever the rounding, and the exported
    Resize takes that size (coordinates from the size ratio, as in eager)."""
    batch = image if image.dim() == 4 else image[None]
    if torch._C._get_tracing_state():
        shape = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        # Tensor / tensor, and no 0-dim tensor: a Python number over a tensor exports as
        # number * Reciprocal(x), which rounds differently (192 * (1/227) * 227 < 192), and the
        # exporter computes 0-dim ("scalar") tensors in float32.
        low = torch.full((1,), float(min_size), dtype=torch.float64)
        high = torch.full((1,), float(max_size), dtype=torch.float64)
        scale = torch.minimum(low / shape.amin(dim=0, keepdim=True), high / shape.amax(dim=0, keepdim=True))
        size = torch.floor(shape * scale)
        factors = (size + 0.5) / shape
        out = F.interpolate(batch, scale_factor=(factors[0], factors[1]), mode="bilinear",
                            recompute_scale_factor=True, align_corners=False)
    else:
        height, width = image.shape[-2:]
        scale = min(min_size / min(height, width), max_size / max(height, width))
        size = [int(math.floor(height * scale)), int(math.floor(width * scale))]
        out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return out if image.dim() == 4 else out[0]
