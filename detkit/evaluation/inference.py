"""Running a detector on image files and writing COCO-style detections.

Shared by tools/predict.py and tools/eval.py: images are read with OpenCV as RGB
float tensors in [0, 1] (the model's own transform normalises and resizes), and
detections come back in the image's pixels.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import torch
from torch import Tensor, nn
from tqdm import tqdm

from detkit.evaluation.coco_eval import coco_records

logger = logging.getLogger("detkit.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike) -> Tensor:
    """Image file -> Tensor[3, H, W] float32 RGB in [0, 1]; ValueError if unreadable."""
    array = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if array is None:
        raise ValueError(f"cannot read image {path} (missing, not an image, or an unsupported format)")
    return torch.from_numpy(cv2.cvtColor(array, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float().div_(255)


def list_images(input_path: str | os.PathLike) -> list[Path]:
    """An image file, or the image files of a folder (sorted); ValueError if there are none."""
    path = Path(input_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
    raise ValueError(f"input {path} is neither an image file nor a folder")


def to_coco_results(prediction: Mapping[str, Tensor], label_to_category_id: Mapping[int, int],
                    **fields) -> list[dict]:
    """One image's {"boxes" [N,4] x1y1x2y2, "scores", "labels"} as COCO results:
    [{**fields, "category_id", "bbox": [x, y, w, h], "score"}], unrounded (`coco_records`)."""
    def host(name: str, dtype: torch.dtype):
        return prediction[name].detach().cpu().to(dtype).numpy()

    return coco_records(host("boxes", torch.float64), host("scores", torch.float64), host("labels", torch.int64),
                        label_to_category_id, **fields)


@torch.inference_mode()
def predict_files(model: nn.Module, files: Sequence[Path], label_to_category_id: Mapping[int, int],
                  device: torch.device | str = "cpu", batch_size: int = 1,
                  root: Path | None = None, skipped: list[Path] | None = None) -> Iterable[dict]:
    """Yield COCO-style detections {"file_name", "category_id", "bbox", "score"} for `files`.
    file_name is relative to `root` when given, else the file's name. An unreadable image
    raises ValueError naming it; with a `skipped` list it is skipped instead, with a warning,
    and appended there. Progress: a tqdm bar of the images on stderr, shown only when stderr
    is a terminal (tqdm's disable=None)."""
    model.eval()
    with tqdm(total=len(files), desc="predicting", unit="img", disable=None) as progress:
        for start in range(0, len(files), batch_size):
            chunk, images = [], []
            for path in files[start:start + batch_size]:
                try:
                    image = read_image(path)
                except ValueError as exc:
                    if skipped is None:
                        raise
                    logger.warning("skipped: %s", exc)
                    skipped.append(path)
                    continue
                chunk.append(path)
                images.append(image.to(device))
            if images:
                for path, prediction in zip(chunk, model(images)):
                    name = str(path.relative_to(root)) if root is not None else path.name
                    yield from to_coco_results(prediction, label_to_category_id, file_name=name)
            progress.update(len(files[start:start + batch_size]))


def skipped_summary(skipped: Sequence[Path], root: Path | None = None, shown: int = 20) -> str:
    """One line listing the images `predict_files` skipped."""
    names = [str(p.relative_to(root)) if root is not None else str(p) for p in skipped]
    listed = ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
    return f"skipped {len(names)} unreadable image{'s' if len(names) != 1 else ''}: {listed}"
