"""CocoDetection on a tiny COCO dataset written by the test: targets, label mapping, errors."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.data.coco import CocoDetection, DatasetError, coco_paths
from detkit.data.transforms import build_transforms

CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "bird"}]
# (id, file name, height, width)
IMAGES = [(10, "a.png", 40, 60), (20, "b.png", 50, 30), (30, "c.png", 32, 32)]


def _annotations() -> list[dict]:
    return [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 6, 10, 20], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 11, "bbox": [50, 30, 20, 20], "area": 400, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 10, "category_id": 7, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 1},  # crowd
        {"id": 4, "image_id": 10, "category_id": 7, "bbox": [20, 20, 0, 5], "area": 0, "iscrowd": 0},  # empty
        {"id": 5, "image_id": 20, "category_id": 7, "bbox": [2.5, 3.5, 4, 6], "area": 24, "iscrowd": 0},
        {"id": 6, "image_id": 30, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},  # only crowd
    ]


def _pixels(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_dataset(root: Path, annotations: list[dict] | None = None, images=IMAGES) -> tuple[Path, Path]:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for k, (_, name, h, w) in enumerate(images):
        assert cv2.imwrite(str(image_dir / name), cv2.cvtColor(_pixels(k, h, w), cv2.COLOR_RGB2BGR))
    data = {"images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
            "annotations": _annotations() if annotations is None else annotations,
            "categories": CATEGORIES}
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    return write_dataset(tmp_path)


def test_label_mapping_is_contiguous_over_sorted_category_ids(tiny):
    ds = CocoDetection(*tiny)
    assert ds.category_id_to_label == {3: 1, 7: 2, 11: 3}
    assert ds.label_to_category_id == {1: 3, 2: 7, 3: 11}
    assert ds.class_names == ["cat", "dog", "bird"]
    assert ds.num_classes == 4


def test_targets_boxes_labels_and_metadata(tiny):
    ds = CocoDetection(*tiny)
    assert len(ds) == 3 and ds.ids == [10, 20, 30]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    expected = torch.from_numpy(_pixels(0, 40, 60)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image, expected)  # RGB order, [0, 1]
    # xywh -> xyxy; the second box is clipped to the 60x40 image; crowd and empty boxes dropped.
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 6, 15, 26], [50, 30, 60, 40]]))
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 3] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 10 and target["orig_size"] == (40, 60) and target["scale"] == 1.0
    _, target = ds[1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.5, 3.5, 6.5, 9.5]]))
    assert target["labels"].tolist() == [2]
    _, target = ds[2]  # only a crowd annotation: an empty target of the right shapes
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_remove_images_without_annotations(tiny):
    assert CocoDetection(*tiny, remove_images_without_annotations=True).ids == [10, 20]
    assert CocoDetection(*tiny, remove_images_without_annotations=False).ids == [10, 20, 30]


def test_aspect_ratios_come_from_the_json(tiny):
    ds = CocoDetection(*tiny)
    assert ds.aspect_ratios() == pytest.approx([60 / 40, 30 / 50, 1.0])


def test_transforms_are_applied(tiny):
    ds = CocoDetection(*tiny, transforms=build_transforms(False, min_size=80, max_size=1000))
    image, target = ds[0]
    assert image.shape == (3, 80, 120)
    assert target["scale"] == pytest.approx(2.0)
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 12, 30, 52], [100, 60, 120, 80]]))


def test_expected_category_ids(tiny):
    CocoDetection(*tiny, category_ids=[11, 3, 7])  # same set, any order
    with pytest.raises(DatasetError, match=r"instances\.json.*unexpected: \[11\]"):
        CocoDetection(*tiny, category_ids=[3, 7])
    with pytest.raises(DatasetError, match=r"missing: \[5\]"):
        CocoDetection(*tiny, category_ids=[3, 5, 7, 11])


def test_missing_folder(tiny, tmp_path):
    _, ann_file = tiny
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="image folder not found.*nope"):
        CocoDetection(missing, ann_file)


def test_missing_json(tiny, tmp_path):
    image_dir, _ = tiny
    with pytest.raises(DatasetError, match="annotation file not found.*missing.json"):
        CocoDetection(image_dir, tmp_path / "missing.json")


def test_corrupt_json(tiny, tmp_path):
    image_dir, _ = tiny
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="corrupt annotation JSON.*bad.json") as info:
        CocoDetection(image_dir, bad)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="bad.json has no 'annotations' list"):
        CocoDetection(image_dir, bad)


def test_missing_image_file(tiny):
    image_dir, ann_file = tiny
    (image_dir / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"image file missing: .*b\.png \(image id 20"):
        CocoDetection(image_dir, ann_file)
    ds = CocoDetection(image_dir, ann_file, validate=False)  # lazily: the loading names it
    with pytest.raises(DatasetError, match=r"b\.png"):
        ds[1]


def test_unreadable_image(tiny):
    image_dir, ann_file = tiny
    (image_dir / "c.png").write_bytes(b"not an image")
    ds = CocoDetection(image_dir, ann_file)  # exists, so validation passes
    with pytest.raises(DatasetError, match=r"unreadable.*c\.png"):
        ds[2]


def test_annotation_with_unknown_image_or_category(tmp_path):
    anns = _annotations() + [{"id": 99, "image_id": 12345, "category_id": 3, "bbox": [0, 0, 1, 1], "iscrowd": 0}]
    image_dir, ann_file = write_dataset(tmp_path / "x", anns)
    with pytest.raises(DatasetError, match="annotation 99 .* unknown image id 12345"):
        CocoDetection(image_dir, ann_file)
    anns = _annotations() + [{"id": 98, "image_id": 10, "category_id": 4, "bbox": [0, 0, 1, 1], "iscrowd": 0}]
    image_dir, ann_file = write_dataset(tmp_path / "y", anns)
    with pytest.raises(DatasetError, match="annotation 98 .* unknown category id 4"):
        CocoDetection(image_dir, ann_file)


def test_image_size_mismatch_is_reported(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"][0]["width"] = 61
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"a\.png is 60x40"):
        CocoDetection(image_dir, ann_file)[0]


def test_coco_paths():
    image_dir, ann_file = coco_paths("/data/coco", "val")
    assert image_dir == Path("/data/coco/val2017")
    assert ann_file == Path("/data/coco/annotations/instances_val2017.json")
    assert coco_paths("/data/coco", "train2017")[0] == Path("/data/coco/train2017")
    with pytest.raises(ValueError, match=r"split must be 'train' or 'val'; got 'test'"):
        coco_paths("/data/coco", "test")
