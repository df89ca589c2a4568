"""Which implementation runs each detkit op: the compiled kernels or the pure-PyTorch path.

Every op is listed once in `OPS`: its schema (as csrc/schemas.cpp defines it) and its
pure-PyTorch implementation, a function with the op's own signature. `call(name, *args)`
runs `torch.ops.detkit.<name>(*args)` where a compiled kernel exists for the tensors' device,
and the pure function elsewhere:

- the extension is missing or stale (built for another torch), e.g. after
  `DETKIT_BUILD_EXT=0 pip install .` or an install without a C++ compiler;
- it has no kernel for the device: CUDA tensors with a CPU-only build, MPS, XPU, ...

The first fallback in a process warns once (`PureOpsWarning`), naming the slow path and
how to build the kernels. `DETKIT_OPS` chooses for the whole process:

- `auto` (default): the kernels where they exist, the pure path elsewhere (with the warning);
- `pure`: always the pure path, silently (tests, comparisons);
- `kernels`: never the pure path: a missing kernel raises the build error instead.

`use_pure_ops()` forces the pure path from Python (also as a context manager). The pure path
runs under autocast in float32, as the kernels' autocast rules do; torch.compile traces it
like any PyTorch code. During ONNX export the op itself is called (the kernels, or the pure
function registered as the op when there is no extension), so the exporters see
`detkit::<name>` and `detkit.ops.onnx` turns it into the same standard ONNX either way.

Adding an op is one entry in `OPS`; its wrapper calls `call(name, ...)` and its module calls
`define_pure_op(name, fake)` at import (deform_conv2d, deform_roi_pool, dcnv3_core, dcnv4_core).
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from detkit.ops import _extension

ENV_VAR = "DETKIT_OPS"
MODES = ("auto", "pure", "kernels")


@dataclass(frozen=True)
class Op:
    """One detkit op: its schema (csrc/schemas.cpp) and where its pure-PyTorch implementation
    lives ("module:function", imported on first use; same arguments as the op)."""

    schema: str
    pure: str
    #: Positions of the arguments that get gradients (the op's backward returns them in order).
    differentiable: tuple[int, ...]


OPS: dict[str, Op] = {
    "deform_conv2d": Op(
        "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? mask, Tensor? bias, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
        "detkit.ops.pure.deform_conv2d:deform_conv2d_op", differentiable=(0, 1, 2, 3, 4)),
    "deform_roi_pool": Op(
        "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, int pooled_height, "
        "int pooled_width, float spatial_scale, int sampling_ratio, float gamma) -> Tensor",
        "detkit.ops.pure.deform_roi_pool:deform_roi_pool_op", differentiable=(0, 2, 3)),
    "dcnv3_core": Op(
        "dcnv3_core(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, "
        "bool remove_center) -> Tensor",
        "detkit.ops.pure.dcnv3:dcnv3_core_op", differentiable=(0, 1, 2)),
    "dcnv4_core": Op(
        "dcnv4_core(Tensor input, Tensor offset_mask, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, "
        "bool remove_center) -> Tensor",
        "detkit.ops.pure.dcnv3:dcnv4_core_op", differentiable=(0, 1)),
}

#: Dispatch keys of the device types a kernel may be registered for.
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "meta": "Meta",
                "hpu": "HPU", "privateuseone": "PrivateUse1"}


class PureOpsWarning(UserWarning):
    """detkit's ops run on the pure-PyTorch path because no compiled kernel can run them."""


def _mode_from_env() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)} (or unset), got "
                         f"{os.environ[ENV_VAR]!r}")
    return value


_mode: str = _mode_from_env()
_warned: bool = False
_pure_functions: dict[str, Callable[..., Any]] = {}


def mode() -> str:
    """The process's choice: "auto", "pure" or "kernels" (see the module docstring)."""
    return _mode


class _Restore:
    """Returned by `use_pure_ops`: the new mode is already in force; as a context manager it
    restores the previous one on exit."""

    def __init__(self, previous: str) -> None:
        self.previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc: object) -> None:
        set_mode(self.previous)


def set_mode(value: str) -> _Restore:
    """Set the mode ("auto", "pure" or "kernels") for the process; see `use_pure_ops`."""
    global _mode
    if value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
    previous, _mode = _mode, value
    return _Restore(previous)


def use_pure_ops(enabled: bool = True) -> _Restore:
    """Run every detkit op on the pure-PyTorch path (`enabled=False`: back to "auto").

    Takes effect at once, for the process (as DETKIT_OPS=pure does); used as a context
    manager, `with detkit.ops.use_pure_ops(): ...`, it restores the previous mode on exit."""
    return set_mode("pure" if enabled else "auto")


def _kernel_table() -> dict[tuple[str, str], bool]:
    """(op, device type) -> whether the loaded extension registered a kernel for it. Built
    once at import (the extension registers everything when it loads), so that deciding is a
    dict lookup, also inside torch.compile."""
    table = {}
    for name in OPS:
        for device_type, key in _DEVICE_KEYS.items():
            found = False
            if _extension.LOADED:
                try:
                    found = torch._C._dispatch_has_kernel_for_dispatch_key(f"detkit::{name}", key)
                except RuntimeError:  # an op this build of the extension does not define
                    found = False
            table[name, device_type] = bool(found)
    return table


_has_kernel: dict[tuple[str, str], bool] = _kernel_table()


def has_kernel(name: str, device: torch.device | str) -> bool:
    """Whether the compiled extension is usable and has a kernel of op `name` for `device`."""
    return _has_kernel.get((name, torch.device(device).type), False)


def why_no_kernel(name: str, device: torch.device | str) -> str:
    """Why `has_kernel(name, device)` is False, in words."""
    device_type = torch.device(device).type
    if not _extension.LOADED:
        return _extension.load_problem()
    if device_type == "cuda" and not _extension.cuda_kernels_built():
        return "detkit's extension was built with its CPU kernels only (no CUDA kernels)"
    return f"detkit's extension has no {device_type} kernel of {name}"


def require_ops(device: torch.device | str | None = None) -> None:
    """Raise a RuntimeError explaining how to build the extension if it is unusable, or,
    given a device, if it has no kernels for that device (a CPU-only build and CUDA
    tensors, MPS, ...). For callers that need the compiled kernels, not the pure-PyTorch
    path the ops otherwise fall back to."""
    _extension.require_loaded()
    if device is not None and not has_kernel("deform_conv2d", device):
        raise RuntimeError(f"{why_no_kernel('deform_conv2d', device)}.\n{_extension.BUILD_HINT}")


def build_hint() -> str:
    return _extension.BUILD_HINT


def _warn_once(name: str, device: torch.device) -> None:
    global _warned
    if _warned or torch.compiler.is_compiling():
        return
    _warned = True
    warnings.warn(
        f"detkit's ops run on the pure-PyTorch path for {device.type} tensors, slower than its "
        f"compiled kernels and with several times their memory (docs/benchmarks.md): "
        f"{why_no_kernel(name, device)}. To build the kernels:\n{build_hint()}\n"
        f"Set {ENV_VAR}=pure to choose the pure-PyTorch path without this warning.",
        PureOpsWarning, stacklevel=5)


def use_kernel(name: str, device: torch.device) -> bool:
    """True: run the compiled kernel of op `name` for `device`; False: the pure path (warning
    once per process when that is a fallback rather than the chosen mode)."""
    if _mode == "pure":
        return False
    if has_kernel(name, device):
        return True
    if _mode == "kernels":
        raise RuntimeError(f"{why_no_kernel(name, device)}, and {ENV_VAR}=kernels forbids the "
                           f"pure-PyTorch path.\n{build_hint()}")
    _warn_once(name, device)
    return False


def path(device: torch.device | str = "cpu", name: str = "deform_conv2d") -> str:
    """"kernels" or "pure": what op `name` runs on for tensors of `device` (no warning)."""
    if _mode == "pure":
        return "pure"
    if has_kernel(name, device) or _mode == "kernels":
        return "kernels"
    return "pure"


def pure_function(name: str) -> Callable[..., Any]:
    """The pure-PyTorch implementation of op `name` (same arguments as the op)."""
    fn = _pure_functions.get(name)
    if fn is None:
        module, attr = OPS[name].pure.split(":")
        fn = _pure_functions[name] = getattr(importlib.import_module(module), attr)
    return fn


def _as_float32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def call(name: str, *args: Any) -> Any:
    """Run op `name` on `args` (the op's arguments, in its schema's order; args[0] is the
    input tensor, whose device decides) on the kernels or the pure path."""
    device = args[0].device
    # Meta tensors (shape-only runs) go to the op's fake kernel, whichever path is in use.
    if device.type == "meta" or torch.onnx.is_in_onnx_export() or use_kernel(name, device):
        return getattr(torch.ops.detkit, name)(*args)
    fn = pure_function(name)
    if torch.is_autocast_enabled(device.type):
        # As the kernels' autocast rules (csrc/autocast.cpp): the op runs in float32.
        with torch.autocast(device.type, enabled=False):
            return fn(*(_as_float32(a) for a in args))
    return fn(*args)


# ----------------------------------------------------------------------------- no extension

_library: torch.library.Library | None = None
_defined: set[str] = set()


def _pure_autograd(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """setup_context and backward for op `name` defined over its pure function: the backward
    recomputes the pure forward with autograd and differentiates it."""
    op = OPS[name]

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*(inputs[i] for i in op.differentiable))

    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        args = list(ctx.inputs)
        leaves = []
        for position, tensor in zip(op.differentiable, saved):
            if tensor is not None and ctx.needs_input_grad[position]:
                tensor = tensor.detach().requires_grad_(True)
                leaves.append(tensor)
            args[position] = tensor
        grads = [None] * len(args)
        if leaves:
            with torch.enable_grad():
                out = pure_function(name)(*args)
                found = torch.autograd.grad(out, leaves, grad_output, allow_unused=True)
            found_iter = iter(found)
            for position, tensor in zip(op.differentiable, saved):
                if tensor is not None and ctx.needs_input_grad[position]:
                    grad = next(found_iter)
                    grads[position] = grad if grad is not None else torch.zeros_like(tensor)
        return tuple(grads)

    return setup_context, backward


def define_pure_op(name: str, fake: Callable[..., Any]) -> None:
    """Called once by each op's module at import. Imports the op's pure function; and, without
    the extension, defines `torch.ops.detkit.<name>` from its schema in `OPS`, with
    the pure function as its kernel on every device, `fake` as its fake kernel (torch.compile,
    torch.export) and autograd through the pure function; so that calls of the op itself (ONNX
    export, torch.export, code that calls torch.ops.detkit directly) work as with the
    extension. Does nothing when the extension is loaded (it defines the op) or when `name`
    is defined already."""
    global _library
    pure_function(name)  # imported now, not first inside a torch.compile trace
    if _extension.LOADED or name in _defined:
        return
    if _library is None:
        _library = torch.library.Library("detkit", "DEF")
    _library.define(OPS[name].schema)

    def kernel(*args):
        return pure_function(name)(*args)

    _library.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"detkit::{name}", fake, lib=_library)
    setup_context, backward = _pure_autograd(name)
    torch.library.register_autograd(f"detkit::{name}", backward, setup_context=setup_context, lib=_library)
    _defined.add(name)
