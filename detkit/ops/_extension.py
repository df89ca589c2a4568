"""Loads the compiled ops (`detkit._C`) and explains a missing or stale build.

Importing this module never fails. Without a usable extension the ops run on the
pure-PyTorch path (detkit/ops/_dispatch.py decides, and warns once); `require_ops()`
raises the reason and the build command for callers that need the compiled kernels.
"""
from __future__ import annotations

import torch

BUILD_HINT = (
    "Build it from the repository root, in the environment that runs detkit, with\n"
    "    pip install --no-build-isolation -e .\n"
    "(DETKIT_WITH_CUDA=1 also compiles the CUDA kernels; see README.md)."
)

_load_error: str | None = None
try:
    from detkit import _C  # noqa: F401  (registers torch.ops.detkit.*)
except ImportError as exc:  # missing, or built against another torch (undefined symbols)
    _C = None
    _load_error = (
        f"detkit's compiled ops could not be loaded ({exc}). The extension is missing or "
        f"was built for another version of torch (installed: {torch.__version__}).\n{BUILD_HINT}"
    )
else:
    if _C.torch_version != torch.__version__:
        _load_error = (
            f"detkit's compiled ops were built for torch {_C.torch_version}, but torch "
            f"{torch.__version__} is installed. Rebuild them.\n{BUILD_HINT}"
        )

LOADED: bool = _load_error is None


def load_problem() -> str:
    """Why the extension is unusable ("" when it loaded)."""
    return (_load_error or "").split("\n")[0].rstrip(".")


def require_loaded() -> None:
    """Raise a RuntimeError explaining how to build the extension if it is unusable."""
    if _load_error is not None:
        raise RuntimeError(_load_error)


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return LOADED and bool(_C.with_cuda)


def set_cuda_columns_budget(num_bytes: int) -> int:
    """Set how many bytes of im2col columns the CUDA deform_conv2d processes per chunk of
    images (default 256 MiB) and return the previous value. For tests of the chunked path:
    a budget below one image's columns makes every chunk one image. Not a tuning API."""
    require_loaded()
    return int(_C._set_cuda_columns_budget(int(num_bytes)))
