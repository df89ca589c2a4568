"""Transforms: resize geometry and box scaling, horizontal flip, ToTensor, build_transforms."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detkit.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestSide,
    ToTensor,
    build_transforms,
    resized_shape,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _target(boxes) -> dict:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.arange(len(boxes), dtype=np.int64),
            "image_id": 1, "scale": 1.0}


@pytest.mark.parametrize("h, w, min_size, max_size", [
    (40, 60, 80, 1000),    # upscale, shorter side reaches min_size
    (60, 40, 30, 1000),    # downscale, tall image
    (20, 100, 50, 150),    # the longer side caps the scale
    (37, 53, 64, 91),      # odd sizes, cap just binding
    (64, 64, 64, 64),      # already there: no-op
])
def test_resize_geometry(h, w, min_size, max_size):
    boxes = [[1, 2, 11, 17], [0, 0, w, h]]
    image, target = ResizeShortestSide(min_size, max_size)(_image(h, w), _target(boxes))
    nh, nw = image.shape[:2]
    scale = target["scale"]
    assert scale == pytest.approx(min(min_size / min(h, w), max_size / max(h, w)))
    assert max(nh, nw) <= max_size
    if min(h, w) * max_size >= max(h, w) * min_size:   # not capped
        assert min(nh, nw) == min_size
    else:
        assert max(nh, nw) == max_size
    assert (nh, nw) == (round(h * scale), round(w * scale))
    np.testing.assert_allclose(target["boxes"], np.asarray(boxes, np.float32) * scale, rtol=1e-6)
    # The box of the whole image covers the resized image within rounding.
    assert abs(target["boxes"][1, 2] - nw) <= 0.5 and abs(target["boxes"][1, 3] - nh) <= 0.5
    assert target["labels"].tolist() == [0, 1] and target["image_id"] == 1


def test_resize_content_and_composed_scale():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 10:] = 200
    out, target = ResizeShortestSide(20, 1000)(image, _target([[10, 0, 20, 10]]))
    assert out.shape == (20, 40, 3) and out.dtype == np.uint8
    assert out[:, :19].max() == 0 and out[:, 21:].min() == 200  # the edge moved from x=10 to x=20
    out2, target2 = ResizeShortestSide(10, 1000)(out, target)
    assert out2.shape == (10, 20, 3) and target2["scale"] == pytest.approx(1.0)  # 2 * 0.5
    np.testing.assert_allclose(target2["boxes"], [[10, 0, 20, 10]])


def test_resize_random_choice_uses_all_sizes():
    t = ResizeShortestSide((16, 24, 32), 1000)
    random.seed(0)
    shorter = {min(t(_image(8, 12), _target([]))[0].shape[:2]) for _ in range(40)}
    assert shorter == {16, 24, 32}


def test_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"min_size and max_size must be positive; got 0, 100"):
        ResizeShortestSide(0, 100)
    assert resized_shape(100, 50, 25, 1000) == (50, 25, 0.5)


def test_flip_maps_boxes_and_pixels():
    image = _image(7, 10)
    boxes = [[1, 2, 4, 6], [0, 0, 10, 7], [8.5, 1, 10, 3]]
    out, target = RandomHorizontalFlip(1.0)(image, _target(boxes))
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_allclose(target["boxes"], [[6, 2, 9, 6], [0, 0, 10, 7], [0, 1, 1.5, 3]])
    assert target["flipped"] is True
    # The pixels inside a box move with it: box [1, 4) in x covers columns 1..3 -> 6..8.
    np.testing.assert_array_equal(out[:, 6:9], image[:, 1:4][:, ::-1])
    back, target2 = RandomHorizontalFlip(1.0)(out, target)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_allclose(target2["boxes"], np.asarray(boxes, np.float32))
    assert target2["flipped"] is False


def test_flip_probability():
    image = _image(4, 6)
    target = _target([[0, 0, 2, 2]])
    out, t = RandomHorizontalFlip(0.0)(image, target)
    assert out is image and t is target
    random.seed(1)
    flips = sum(RandomHorizontalFlip(0.5)(image, target)[1].get("flipped", False) for _ in range(400))
    assert 140 < flips < 260


def test_flip_and_resize_accept_tensor_boxes():
    target = {"boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([1])}
    _, t = RandomHorizontalFlip(1.0)(_image(5, 10), target)
    assert isinstance(t["boxes"], torch.Tensor)
    torch.testing.assert_close(t["boxes"], torch.tensor([[7.0, 2, 9, 4]]))
    assert target["boxes"][0, 0] == 1.0  # input untouched
    _, t = ResizeShortestSide(10, 100)(_image(5, 10), target)
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 4, 6, 8]]))


def test_to_tensor():
    image = _image(5, 7)
    image[0, 0] = (0, 128, 255)
    out, target = ToTensor()(image, _target([[1, 2, 3, 4]]))
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    assert 0.0 <= out.min() and out.max() <= 1.0
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    torch.testing.assert_close(out, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (1, 4)
    assert target["labels"].dtype == torch.int64
    _, empty = ToTensor()(image, _target([]))
    assert empty["boxes"].shape == (0, 4)


def test_build_transforms():
    train = build_transforms(True, min_size=(20, 30), max_size=100, flip_prob=0.5)
    assert isinstance(train, Compose)
    assert [type(t) for t in train.transforms] == [ResizeShortestSide, RandomHorizontalFlip, ToTensor]
    test = build_transforms(False, min_size=(20, 30), max_size=100)
    assert [type(t) for t in test.transforms] == [ResizeShortestSide, ToTensor]
    image, target = test(_image(10, 15), _target([[0, 0, 15, 10]]))
    assert image.shape == (3, 30, 45)  # the test size is the largest of the training sizes
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 45, 30]]))
    assert [type(t) for t in build_transforms(True, 20, 100, flip_prob=0).transforms] == \
        [ResizeShortestSide, ToTensor]
