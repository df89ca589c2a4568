"""Writing the predictions JSON of tools/predict_onnx.py (tools/predict.py writes the same).

The format is tools/predict.py's: a JSON list of {"file_name", "category_id",
"bbox": [x, y, w, h], "score"} (`detkit.inference.to_coco_results`), written on one line.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def write_predictions(output: str | os.PathLike, detections: Iterable[dict]) -> int:
    """Write `detections` to `output` (folders created) as tools/predict.py does; return their count."""
    detections = list(detections)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(detections))
    return len(detections)
