"""Files detkit writes for people and tools to read: JSON written atomically.

- `write_json`: metrics.json, train_stats.json, detections.json, offset_stats.json, ...
  (NaN/inf as null; a temporary file renamed into place, so a killed process never leaves
  half a file).
- `write_text`: Markdown tables (offset_stats.md, ...), atomically in the same way.
- `write_predictions`: the predictions JSON of tools/predict.py and tools/predict_onnx.py,
  a list of {"file_name", "category_id", "bbox": [x, y, w, h], "score"}
  (`detkit.evaluation.inference.to_coco_results`) on one line.
- `file_lock`: an exclusive lock on a lock file, for processes that share a file or a
  folder (two ablation sweeps recording into one records file, or reaching the same run).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_json", "write_text", "write_predictions", "file_lock"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) atomically: a temporary file beside `path`, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write `data` as JSON (NaN/inf as null), atomically (temporary file + rename)."""
    write_text(path, json.dumps(_json_safe(data), indent=indent))


def write_predictions(output: str | os.PathLike, detections: Iterable[dict]) -> int:
    """Write `detections` to `output` atomically (folders created); return their count."""
    detections = list(detections)
    write_json(output, detections, indent=None)
    return len(detections)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on the lock file `path` (created, with its folders, if missing)
    while the block runs, and yield True. With `blocking=False`, when another process holds it,
    yield False at once, without the lock. The lock is the operating system's (POSIX flock),
    so it goes with the process that held it, even a killed one: a lock file left behind never
    blocks anyone. Where there is no flock (Windows) it yields True without locking."""
    try:
        import fcntl
    except ImportError:       # pragma: no cover - not POSIX
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
