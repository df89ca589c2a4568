"""COCO-format detection datasets read through pycocotools, images through OpenCV.

`CocoDetection(image_dir, annotation_file, transforms)` returns
`(image, target)` with

- `image`: float32 tensor [3, H, W], RGB, values in [0, 1] (after the transforms);
- `target["boxes"]`: float32 [N, 4] x1y1x2y2 in the returned image's pixels;
- `target["labels"]`: int64 [N], contiguous labels 1..K (0 is background): the
  i-th smallest category id of the dataset gets label i (`category_id_to_label`,
  `label_to_category_id`);
- `target["image_id"]` (int, the COCO image id), `target["orig_size"]`
  ((height, width) of the file, ints) and `target["scale"]` (float, 1.0 unless a
  resize transform changed it: returned-image pixels per original pixel).
  These are plain Python values, not tensors: move only tensors to a device
  (`detkit.data.loader.targets_to_device`).

Annotation handling (for training targets; COCO evaluation reads the ground
truth JSON itself, crowd regions included):

- crowd annotations (`iscrowd=1`) are skipped;
- boxes are converted from [x, y, w, h] to [x1, y1, x2, y2], clipped to the
  image, and those left with zero width or height are dropped;
- annotations whose category is not among the dataset's categories raise a
  `DatasetError` at construction (so do ones that name a missing image).

Images are read with `cv2.imread(..., IMREAD_COLOR | IMREAD_IGNORE_ORIENTATION)`
and converted BGR -> RGB: EXIF orientation is ignored on purpose, because COCO
annotations refer to the stored pixel grid (as PIL, which never rotates, reads it).

Every problem with the data on disk (missing folder or JSON file, corrupt JSON,
an image file listed but absent, unexpected category ids, an unreadable image)
raises `DatasetError`, a `ValueError` whose one-line message names the path or
id, so a training script can report it in one line and stop.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from detkit.data.transforms import image_to_tensor

__all__ = ["CocoDetection", "DatasetError", "clipped_xyxy", "coco_paths", "kept_annotations", "load_coco_json"]


class DatasetError(ValueError):
    """A dataset on disk is missing, unreadable or inconsistent (one-line message)."""


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image_dir, annotation_file) of a split of the standard COCO 2017 layout.

    root/train2017, root/val2017 and root/annotations/instances_{train,val}2017.json;
    `split` is "train" or "val" (or "train2017"/"val2017").
    """
    name = split if split.endswith("2017") else f"{split}2017"
    if name not in ("train2017", "val2017"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    root = Path(root)
    return root / name, root / "annotations" / f"instances_{name}.json"


def load_coco_json(annotation_file: str | os.PathLike) -> COCO:
    """A pycocotools COCO object for `annotation_file`, with its structure checked.

    Raises DatasetError naming the file when it is missing, not valid JSON, or
    lacks the images/annotations/categories lists, and naming the id when an
    annotation refers to an unknown image or category, or ids repeat.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"corrupt annotation JSON {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {path}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path} is not a COCO JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"annotation file {path} has no '{key}' list")
    try:
        image_ids = [int(img["id"]) for img in data["images"]]
        for img in data["images"]:
            img["file_name"], img["width"], img["height"]  # noqa: B018 (presence check)
        cat_ids = [int(c["id"]) for c in data["categories"]]
        for a in data["annotations"]:
            a["id"], a["image_id"], a["category_id"], a["bbox"]  # noqa: B018
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"annotation file {path} has a malformed entry (missing/bad {e})") from None
    for what, ids in (("image", image_ids), ("category", cat_ids)):
        if len(set(ids)) != len(ids):
            dup = next(i for i, n in Counter(ids).items() if n > 1)
            raise DatasetError(f"annotation file {path} repeats {what} id {dup}")
    known_images, known_cats = set(image_ids), set(cat_ids)
    for a in data["annotations"]:
        if a["image_id"] not in known_images:
            raise DatasetError(f"annotation {a['id']} in {path} refers to unknown image id {a['image_id']}")
        if a["category_id"] not in known_cats:
            raise DatasetError(f"annotation {a['id']} in {path} has unknown category id {a['category_id']}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def clipped_xyxy(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """A COCO [x, y, w, h] box as x1y1x2y2 clipped to a width x height image; None when the
    clipping leaves it empty."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return None if x2 <= x1 or y2 <= y1 else (x1, y1, x2, y2)


def kept_annotations(anns: Iterable[Mapping[str, Any]], width: int, height: int
                     ) -> Iterator[tuple[Mapping[str, Any], tuple[float, float, float, float]]]:
    """The annotations of one image of `width` x `height` that detkit keeps, with their boxes
    clipped to the image (`clipped_xyxy`): crowd annotations and boxes the clipping leaves
    empty are dropped. (annotation, (x1, y1, x2, y2)) in order."""
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        box = clipped_xyxy(a["bbox"], width, height)
        if box is not None:
            yield a, box


def _xywh_to_clipped_xyxy(anns: Sequence[dict[str, Any]], width: int, height: int,
                          cat_to_label: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Non-crowd annotations -> (boxes float32 [N, 4] x1y1x2y2 clipped, labels int64 [N]); empty dropped."""
    boxes, labels = [], []
    for a, box in kept_annotations(anns, width, height):
        boxes.append(box)
        labels.append(cat_to_label[a["category_id"]])
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64))


class CocoDetection(Dataset):
    """A COCO-format detection dataset (see the module docstring for what it returns).

    Args:
        image_dir: folder holding the images (file names as in the JSON).
        annotation_file: COCO instances JSON.
        transforms: callable (image HWC uint8 RGB numpy, target) -> (image, target),
            e.g. `detkit.data.transforms.build_transforms(...)`. Whatever it returns
            is converted to tensors if it is still numpy (so None works too).
        remove_images_without_annotations: drop images with no usable (non-crowd,
            non-empty) box; use True for training, False for evaluation.
        category_ids: the category ids the dataset must have (e.g. the training
            set's, when building the validation set); DatasetError when the JSON's
            differ. Labels always follow the sorted category ids.
        validate: run `validate()` (folder exists, every listed image file
            exists) at construction.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Callable | None = None,
        remove_images_without_annotations: bool = False,
        category_ids: Sequence[int] | None = None,
        validate: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}")
        self.coco = load_coco_json(self.annotation_file)
        cat_ids = sorted(self.coco.cats)
        if not cat_ids:
            raise DatasetError(f"annotation file {self.annotation_file} has no categories")
        if category_ids is not None and sorted(int(c) for c in category_ids) != cat_ids:
            expected = sorted(int(c) for c in category_ids)
            extra = sorted(set(cat_ids) - set(expected))
            missing = sorted(set(expected) - set(cat_ids))
            raise DatasetError(
                f"category ids of {self.annotation_file} do not match the expected ones "
                f"(unexpected: {extra[:10]}, missing: {missing[:10]})")
        self.category_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_category_id: dict[int, int] = {i + 1: c for i, c in enumerate(cat_ids)}
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]

        ids = sorted(self.coco.imgs)
        if remove_images_without_annotations:
            ids = [i for i in ids if self._has_usable_box(i)]
        self.ids: list[int] = ids
        if validate:
            self.validate()

    # ------------------------------------------------------------------ info
    @property
    def num_classes(self) -> int:
        """Number of model classes including background: K categories + 1."""
        return len(self.label_to_category_id) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_info(self, index: int) -> dict[str, Any]:
        """The JSON's image entry (id, file_name, width, height, ...) of dataset item `index`."""
        return self.coco.imgs[self.ids[index]]

    def aspect_ratios(self) -> list[float]:
        """width / height of every item, from the JSON (no image is read)."""
        return [self.coco.imgs[i]["width"] / max(self.coco.imgs[i]["height"], 1) for i in self.ids]

    def _has_usable_box(self, image_id: int) -> bool:
        info = self.coco.imgs[image_id]
        anns = self.coco.imgToAnns.get(image_id, [])
        boxes, _ = _xywh_to_clipped_xyxy(anns, info["width"], info["height"], self.category_id_to_label)
        return len(boxes) > 0

    def validate(self) -> None:
        """Cheap checks that every item can be loaded: DatasetError naming the first problem.

        The image folder must exist and hold every file the kept images name
        (checked with one directory listing plus os.path.exists for names with
        sub-folders; images are not decoded).
        """
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}")
        try:
            present = set(os.listdir(self.image_dir))
        except OSError as e:
            raise DatasetError(f"cannot list image folder {self.image_dir}: {e}") from None
        missing = []
        for image_id in self.ids:
            name = self.coco.imgs[image_id]["file_name"]
            if name in present:
                continue
            if ("/" in name or os.sep in name) and os.path.exists(self.image_dir / name):
                continue
            missing.append((image_id, name))
        if missing:
            image_id, name = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"image file missing: {self.image_dir / name} (image id {image_id} "
                               f"in {self.annotation_file}){more}")

    # ------------------------------------------------------------------ loading
    def load_image(self, index: int) -> np.ndarray:
        """Item `index`'s image as HWC uint8 RGB (DatasetError naming the file if unreadable)."""
        info = self.image_info(index)
        path = self.image_dir / info["file_name"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            reason = "missing" if not path.exists() else "unreadable"
            raise DatasetError(f"cannot read image file ({reason}): {path}")
        if image.shape[0] != info["height"] or image.shape[1] != info["width"]:
            raise DatasetError(f"image file {path} is {image.shape[1]}x{image.shape[0]} but "
                               f"{self.annotation_file} says {info['width']}x{info['height']}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def load_target(self, index: int) -> dict[str, Any]:
        """Item `index`'s target before transforms (boxes/labels as numpy arrays)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        boxes, labels = _xywh_to_clipped_xyxy(self.coco.imgToAnns.get(image_id, []), info["width"],
                                              info["height"], self.category_id_to_label)
        return {"boxes": boxes, "labels": labels, "image_id": int(image_id),
                "orig_size": (int(info["height"]), int(info["width"])), "scale": 1.0}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = self.load_image(index)
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return _as_tensors(image, target)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {len(self.label_to_category_id)} classes, "
                f"image_dir={str(self.image_dir)!r}, annotation_file={str(self.annotation_file)!r})")


def _as_tensors(image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Convert what transforms left as numpy (image HWC uint8, boxes, labels) into tensors."""
    if isinstance(image, np.ndarray):
        image = image_to_tensor(image)
    if not isinstance(target["boxes"], torch.Tensor):
        target["boxes"] = torch.as_tensor(np.asarray(target["boxes"], np.float32).reshape(-1, 4))
    if not isinstance(target["labels"], torch.Tensor):
        target["labels"] = torch.as_tensor(np.asarray(target["labels"], np.int64).reshape(-1))
    return image, target
