"""The detector's transform in the forms a trace needs, beside the eager one they mirror.

The eager transform is torchvision's `GeneralizedRCNNTransform` (built by
`detkit.modeling.build.build_transform`): normalise, resize (shorter side to the last
`min_size`, longer side at most `max_size`, bilinear), zero-padded batching to a multiple of
`size_divisible`, and `postprocess` mapping boxes back to the input pixels. Its traceable
forms here read those settings from the transform module itself:

- `resize_like_eager`: the eager resize, to the pixel, with the size computed from tensor
  shapes while tracing. torchvision's own tracing path computes floor(side * scale) in
  float32 with the scale from a reciprocal, which for some sizes (227 x 227 -> 191 instead of
  192 at min_size 192, 1 image in 7 of the synthetic val set) is one pixel short of eager
  PyTorch's float64 floor(side * min_size / min(H, W)); every feature then differs.
- `transform_images`: the transform's eval forward on a list of images with that resize
  (torchvision's loops over the images, unrolled by a trace).
- `transform_batch` and `boxes_to_input`: the same for a batch [B, 3, H, W] of one size as
  one tensor (any B), and the way back to input pixels (`FasterRCNN.postprocess`'s form).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image

__all__ = ["boxes_to_input", "resize_like_eager", "transform_batch", "transform_images"]


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


def _eval_sizes(transform: GeneralizedRCNNTransform) -> tuple[int, int]:
    """(min_size, max_size) of the transform's eval resize: the last min_size, as it uses."""
    return int(transform.min_size[-1]), int(transform.max_size)


def transform_images(transform: GeneralizedRCNNTransform, images: list[Tensor]) -> ImageList:
    """`transform`'s eval forward (its own normalise, `resize_like_eager` as the resize, its own
    padded batching to a multiple of size_divisible): images [3, H_i, W_i] -> an ImageList of
    the batch and each image's resized size."""
    min_size, max_size = _eval_sizes(transform)
    resized = [resize_like_eager(transform.normalize(img), min_size, max_size) for img in images]
    sizes = [img.shape[-2:] for img in resized]
    batch = transform.batch_images(resized, size_divisible=transform.size_divisible)
    return ImageList(batch, [(size[0], size[1]) for size in sizes])


def transform_batch(transform: GeneralizedRCNNTransform, images: Tensor) -> tuple[Tensor, Tensor]:
    """`transform`'s eval forward on a batch of one size (its own normalise, `resize_like_eager`,
    padding to a multiple of size_divisible): images [B, 3, H, W] ->
    (the normalised, resized, zero-padded batch [B, 3, H', W'], the resized size (h, w) as an
    int64 tensor [2]), sizes computed from tensor shapes (B, H and W stay free in a trace)."""
    x = resize_like_eager(transform.normalize(images), *_eval_sizes(transform))    # [3, 1, 1] broadcast
    resized = torch._shape_as_tensor(x)[2:]
    stride = transform.size_divisible
    padded = (torch.ceil(resized.to(torch.float32) / stride) * stride).to(torch.int64)
    pad = padded - resized
    return F.pad(x, (0, pad[1], 0, pad[0])), resized


def boxes_to_input(boxes: Tensor, resized: Tensor, original: Tensor) -> Tensor:
    """boxes [D, 4] in the pixels of the resized image (h, w) `resized` -> in those of the input
    image of (h, w) `original` (both int64 tensors [2]), clamped to it: `FasterRCNN.postprocess`
    for a batch of one size."""
    ratio = original.to(torch.float32) / resized.to(torch.float32)                 # (h, w)
    boxes = boxes * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
    return clip_boxes_to_image(boxes, (original[0], original[1]))
