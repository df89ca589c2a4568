"""Writing the predictions JSON of tools/predict.py and tools/predict_onnx.py.

The format is tools/predict.py's: a JSON list of {"file_name", "category_id",
"bbox": [x, y, w, h], "score"} (`detkit.inference.to_coco_results`), written on one line.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from detkit.engine.evaluate import write_json


def write_predictions(output: str | os.PathLike, detections: Iterable[dict]) -> int:
    """Write `detections` to `output` atomically (folders created); return their count."""
    detections = list(detections)
    write_json(output, detections, indent=None)
    return len(detections)
