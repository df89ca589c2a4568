"""Files detkit writes for people and tools to read: JSON written atomically.

- `atomic_write`: every file detkit writes goes through it (checkpoints, JSON, Markdown,
  ONNX): a temporary file in the target's folder, flushed and fsynced, renamed over the
  target. A kill leaves the old file or the new one; a full disk or an unwritable folder
  raises `WriteError` (an OSError: the tools' one line, exit status 2) naming the path, the
  reason and what is kept, and leaves no temporary file behind.

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
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["WriteError", "atomic_write", "write_json", "write_text", "write_predictions", "file_lock",
           "os_error_of"]


class WriteError(OSError):
    """A file could not be written (a full disk, an unwritable folder, ...). Its message is
    one line: the path, the reason, and what is kept (the previous file, unchanged, or
    nothing); no partial file was left. `path`, `reason` and `kept` are its parts, so that a
    caller can say more about what is kept (`with_kept`)."""

    def __init__(self, path: str | os.PathLike, reason: str, kept: str, errno_: int | None = None) -> None:
        self.path, self.reason, self.kept = str(path), reason, kept
        super().__init__(errno_, f"cannot write {self.path}: {reason}; {kept}")

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}; {self.kept}"

    def with_kept(self, kept: str) -> "WriteError":
        """The same error saying `kept` instead."""
        return WriteError(self.path, self.reason, kept, self.errno)


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError that `exc` is or was raised from or while handling (torch.save reports a
    failed write as a RuntimeError raised while handling the OSError), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path` (folders created), flush and fsync
    it, then rename it over `path`. Nothing is left half-written: on any error the temporary
    file is removed and `path` is as it was; an OSError underneath (disk full, permission
    denied, read-only file system), also one that another error was raised from, becomes a
    `WriteError` naming `path`."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # An OSError, or torch.save's RuntimeError raised while handling one (not, say, a stop
        # signal's exception that happened to come while an OSError was handled).
        error = os_error_of(exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if error is None or isinstance(exc, WriteError):
            raise
        kept = f"the previous {path.name} is kept unchanged" if path.is_file() else "nothing was written"
        raise WriteError(path, _reason(error), kept, error.errno) from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) atomically (`atomic_write`; `WriteError` when it cannot)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


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
