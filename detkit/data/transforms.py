"""Detection transforms on (image HWC uint8 RGB numpy, target dict), run in DataLoader workers.

Each transform is a callable `(image, target) -> (image, target)`; `target`
holds "boxes" (x1y1x2y2 in the image's pixels, numpy float32 [N, 4] or a
tensor) and any other keys, which pass through. `ToTensor` ends a pipeline:
image -> float32 [3, H, W] in [0, 1], boxes/labels -> tensors.

What is deliberately *not* here: normalisation by the ImageNet mean/std and
padding the batch to a multiple of 32. Both happen in the model's own
transform (torchvision's GeneralizedRCNNTransform), which is what torchvision's
pretrained checkpoints expect. That transform also resizes (shorter side to
min_size, longer side capped at max_size); when the dataset's
`ResizeShortestSide` uses the same sizes, the model's resize is a no-op (a
scale of 1, or within a rounding pixel of it when the max_size cap binds), so
resizing here in the workers just moves that work off the training process.

Resizing convention: `target["scale"]` is multiplied by the resize factor
(pixels of the resized image per pixel of the original; both axes use the same
factor, and boxes are multiplied by exactly it). A box the model predicts on
the resized image maps back to the original image by dividing by
`target["scale"]`, which is what `detkit.evaluation.COCOEvaluator` does.

Randomness (the flip, the choice among several min sizes) comes from Python's
`random` module; `detkit.data.loader.build_train_loader` seeds it per sample,
so augmentations are reproducible and independent of the number of workers.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

__all__ = [
    "Compose", "ResizeShortestSide", "RandomHorizontalFlip", "ToTensor",
    "build_transforms", "image_to_tensor", "resized_shape",
]

Target = dict[str, Any]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target: Target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """(new_height, new_width, scale): shorter side to min_size unless the longer would exceed max_size.

    scale = min(min_size / shorter, max_size / longer); sides are rounded.
    """
    short, long = min(height, width), max(height, width)
    scale = min(min_size / short, max_size / long)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


class ResizeShortestSide:
    """Resize so the shorter side is `min_size` (a random choice when a sequence), the longer <= `max_size`.

    Boxes are multiplied by the scale and `target["scale"]` by it too (see the
    module docstring). Uses bilinear interpolation (area when shrinking a lot).
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int) -> None:
        sizes = (min_size,) if isinstance(min_size, (int, np.integer)) else tuple(min_size)
        if not sizes or min(sizes) <= 0 or max_size <= 0:
            raise ValueError(f"min_size and max_size must be positive; got {min_size!r}, {max_size!r}")
        self.min_sizes = tuple(int(s) for s in sizes)
        self.max_size = int(max_size)

    def __call__(self, image: np.ndarray, target: Target):
        min_size = self.min_sizes[0] if len(self.min_sizes) == 1 else random.choice(self.min_sizes)
        h, w = image.shape[:2]
        nh, nw, scale = resized_shape(h, w, min_size, self.max_size)
        if (nh, nw) != (h, w):
            interp = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR
            image = cv2.resize(image, (nw, nh), interpolation=interp)
        else:
            scale = 1.0
        target = dict(target)
        if scale != 1.0:
            target["boxes"] = target["boxes"] * scale
        target["scale"] = float(target.get("scale", 1.0)) * scale
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestSide(min_size={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability p; boxes x1' = W - x2, x2' = W - x1.

    Records target["flipped"] (bool) when it runs.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        self.p = float(p)

    def __call__(self, image: np.ndarray, target: Target):
        if self.p <= 0 or random.random() >= self.p:
            return image, target
        width = image.shape[1]
        image = np.ascontiguousarray(image[:, ::-1])
        target = dict(target)
        boxes = target["boxes"]
        flipped = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
        flipped[:, 0] = width - boxes[:, 2]
        flipped[:, 2] = width - boxes[:, 0]
        target["boxes"] = flipped
        target["flipped"] = not target.get("flipped", False)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 (or HW) numpy -> float32 [C, H, W] tensor in [0, 1] (contiguous)."""
    if image.ndim == 2:
        image = image[:, :, None]
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    tensor = torch.from_numpy(chw).to(torch.float32)
    if image.dtype == np.uint8:
        tensor.div_(255.0)
    return tensor


class ToTensor:
    """image -> float32 [3, H, W] in [0, 1]; boxes -> float32 [N, 4], labels -> int64 [N] tensors."""

    def __call__(self, image: np.ndarray, target: Target):
        image = image_to_tensor(image)
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = torch.as_tensor(np.asarray(target["boxes"], np.float32).reshape(-1, 4))
        if "labels" in target:
            target["labels"] = torch.as_tensor(np.asarray(target["labels"], np.int64).reshape(-1))
        return image, target

    def __repr__(self) -> str:
        return "ToTensor()"


def build_transforms(train: bool, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                     flip_prob: float = 0.5) -> Compose:
    """The standard pipeline: resize, (training) horizontal flip, ToTensor.

    Training picks the shorter side at random among `min_size` (if a sequence);
    testing uses the largest of them. Pass the model transform's sizes so that
    its own resize becomes a no-op.
    """
    if train:
        steps: list[Callable] = [ResizeShortestSide(min_size, max_size)]
        if flip_prob > 0:
            steps.append(RandomHorizontalFlip(flip_prob))
    else:
        test_size = min_size if isinstance(min_size, (int, np.integer)) else max(min_size)
        steps = [ResizeShortestSide(int(test_size), max_size)]
    steps.append(ToTensor())
    return Compose(steps)
