"""Fault injection for the tests' subprocesses (tests/tools/test_faults.py puts this folder first
on PYTHONPATH, so Python imports this file at start-up):

    DETKIT_FAULT_ENOSPC=GLOB[@SKIP]   files whose name matches GLOB (fnmatch on the base name,
                                      e.g. ".last.pth.*.tmp", the checkpoint's temporary file)
                                      fail with ENOSPC after their first bytes, except the
                                      first SKIP such files: a disk that fills up
    DETKIT_FAULT_READONLY=FOLDER      creating files or folders in FOLDER fails with EACCES
                                      (an unwritable folder, also for root, whom chmod does
                                      not stop)

Only Python's own file objects (io.open, os.fdopen, pathlib) and os.open / os.mkdir are
patched: enough for detkit's writes (detkit.io.atomic_write).
"""
import errno
import fnmatch
import io
import os

_ENOSPC = os.environ.get("DETKIT_FAULT_ENOSPC")
_READONLY = os.environ.get("DETKIT_FAULT_READONLY")


def _path_of(file) -> str:
    if isinstance(file, int):
        try:
            return os.readlink(f"/proc/self/fd/{file}")
        except OSError:
            return ""
    try:
        return os.path.abspath(os.fsdecode(file))
    except TypeError:
        return ""


class _FillingFile:
    """A file whose second write fails with ENOSPC (the first lands, half the data of it)."""

    def __init__(self, handle, path: str) -> None:
        self._handle, self._path, self._writes = handle, path, 0

    def write(self, data):
        self._writes += 1
        if self._writes > 1 or len(data) > 64:
            self._handle.write(bytes(data)[:len(data) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)


def _install() -> None:
    original_open, original_os_open, original_mkdir = io.open, os.open, os.mkdir
    pattern, _, skip = (_ENOSPC or "").partition("@")
    state = {"skip": int(skip or 0)}
    readonly = os.path.abspath(_READONLY) if _READONLY else None

    def denied(path: str) -> bool:
        return readonly is not None and (path == readonly or path.startswith(readonly + os.sep))

    def patched_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        path = _path_of(file)
        if writing and denied(os.path.dirname(path)) and not isinstance(file, int):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        handle = original_open(file, mode, *args, **kwargs)
        if writing and pattern and fnmatch.fnmatch(os.path.basename(path), pattern):
            if state["skip"] > 0:
                state["skip"] -= 1
                return handle
            return _FillingFile(handle, path)
        return handle

    def patched_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and denied(os.path.dirname(_path_of(path))):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return original_os_open(path, flags, *args, **kwargs)

    def patched_mkdir(path, *args, **kwargs):
        if denied(os.path.dirname(_path_of(path))):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return original_mkdir(path, *args, **kwargs)

    io.open = patched_open
    import builtins
    builtins.open = patched_open
    os.open, os.mkdir = patched_os_open, patched_mkdir


if _ENOSPC or _READONLY:
    _install()
