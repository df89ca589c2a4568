"""DCNv3 (InternImage) and DCNv4 (FlashInternImage) sampling cores.

`dcnv3_core` and `dcnv4_core` take the official functions' arguments, in their order, and
their channels-last layouts, so code written for OpenGVLab's `dcnv3_core_pytorch` /
`DCNv3Function` / `DCNv4Function` moves to detkit by changing an import. They are thin
wrappers over `torch.ops.detkit.dcnv3_core` / `dcnv4_core` (C++/CUDA kernels in csrc/),
called through `detkit.ops._dispatch`: without the extension, or on a device without a detkit
kernel, they run the pure-PyTorch path (detkit/ops/pure/dcnv3.py). Autograd and the fake
kernels used by torch.compile are registered here, once, for every device (without the
extension, the dispatch defines the ops over the pure path with the same fake kernels).
docs/ops.md has the exact conventions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from detkit.ops import _dispatch, _extension
from detkit.ops._checks import check_like, check_tensor


def dcnv3_core(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
               stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
               dilation_w: int, group: int, group_channels: int, offset_scale: float,
               remove_center: bool = False) -> Tensor:
    """DCNv3's sampling core: y_g(p) = sum_k mask_gk * x_g(p + p_k + offset_gk).

    Args:
        input: [N, H, W, group*group_channels], channels-last.
        offset: [N, H_out, W_out, group*K*2]: per group, per point, an (x, y) pair in input
            pixels (before offset_scale); K = kernel_h*kernel_w (minus 1 with remove_center),
            points in the official order: x index i outer, y index j inner.
        mask: [N, H_out, W_out, group*K], the points' weights, used as given (DCNv3's layer
            applies a softmax over each group's K points before calling the core).
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w: ints.
        group: number of groups G; group_channels: channels per group D.
        offset_scale: scales the dilation grid and the offsets alike, around the kernel centre.
        remove_center: drop the point (kernel_w // 2, kernel_h // 2).

    Returns:
        [N, H_out, W_out, group*group_channels], with
        H_out = (H + 2*pad_h - (dilation_h*(kernel_h - 1) + 1)) // stride_h + 1.

    Point (i, j) of output pixel (ho, wo) samples x = wo*stride_w - pad_w + c_w + (i*dilation_w -
    c_w + dx)*offset_scale, y likewise, with c_w = dilation_w*(kernel_w - 1) // 2; integer
    positions are pixel centres; the bilinear sample reads zero outside (-1, H) x (-1, W) and
    for non-finite positions.
    """
    geometry = _check_common(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                             dilation_w, group, group_channels, offset_scale, remove_center)
    batch, out_h, out_w, points = geometry
    check_tensor(offset, "offset", 4, "[N, H_out, W_out, group*K*2]")
    check_tensor(mask, "mask", 4, "[N, H_out, W_out, group*K]")
    check_like(offset, "offset", input)
    check_like(mask, "mask", input)
    expected = (batch, out_h, out_w, group * points * 2)
    if tuple(offset.shape) != expected:
        raise ValueError(f"offset must have shape {expected} [N, H_out, W_out, group*K*2] with K = "
                         f"{points} points, got {tuple(offset.shape)}")
    expected = (batch, out_h, out_w, group * points)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected} [N, H_out, W_out, group*K] with K = "
                         f"{points} points, got {tuple(mask.shape)}")
    return _dispatch.call(
        "dcnv3_core", input, offset, mask, [kernel_h, kernel_w], [stride_h, stride_w], [pad_h, pad_w],
        [dilation_h, dilation_w], group, group_channels, float(offset_scale), bool(remove_center))


def dcnv4_packed_width(group: int, points: int) -> int:
    """Last dimension of DCNv4's offset_mask: group*points*3 rounded up to a multiple of 8."""
    return math.ceil(group * points * 3 / 8) * 8


def dcnv4_core(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
               stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
               group: int, group_channels: int, offset_scale: float,
               remove_center: bool = False) -> Tensor:
    """DCNv4's sampling core: DCNv3's sampling with offsets and weights in one packed tensor.

    Args:
        input: [N, H, W, group*group_channels], channels-last.
        offset_mask: [N, H_out, W_out, P]: for each group g, entries [g*3K, g*3K + 2K) are the
            K points' (x, y) offsets (DCNv3's order) and the next K their weights, used raw
            (no softmax); P = group*K*3 rounded up to a multiple of 8, the tail being padding
            (its gradient is zero).
        The other arguments are `dcnv3_core`'s.

    Returns:
        [N, H_out, W_out, group*group_channels].
    """
    batch, out_h, out_w, points = _check_common(
        input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
        group_channels, offset_scale, remove_center)
    check_tensor(offset_mask, "offset_mask", 4, "[N, H_out, W_out, P]")
    check_like(offset_mask, "offset_mask", input)
    width = dcnv4_packed_width(group, points)
    expected = (batch, out_h, out_w, width)
    if tuple(offset_mask.shape) != expected:
        used = group * points * 3
        if offset_mask.shape[-1] == used:
            raise ValueError(f"offset_mask is not padded: its last dimension must be group*K*3 = {used} "
                             f"rounded up to a multiple of 8 ({width}; DCNv4's packing), shape "
                             f"{expected}, got {tuple(offset_mask.shape)}")
        raise ValueError(f"offset_mask must have shape {expected} [N, H_out, W_out, P] with P = "
                         f"group*K*3 = {used} rounded up to a multiple of 8, K = {points} points, "
                         f"got {tuple(offset_mask.shape)}")
    return _dispatch.call(
        "dcnv4_core", input, offset_mask, [kernel_h, kernel_w], [stride_h, stride_w], [pad_h, pad_w],
        [dilation_h, dilation_w], group, group_channels, float(offset_scale), bool(remove_center))


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {rule}, got {value}")
    return value


def _check_common(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                  group, group_channels, offset_scale, remove_center) -> tuple[int, int, int, int]:
    """Checks shared by both ops; returns (N, H_out, W_out, K)."""
    check_tensor(input, "input", 4, "[N, H, W, group*group_channels]")
    for name, value in (("kernel_h", kernel_h), ("kernel_w", kernel_w), ("stride_h", stride_h),
                        ("stride_w", stride_w), ("dilation_h", dilation_h), ("dilation_w", dilation_w),
                        ("group", group), ("group_channels", group_channels)):
        _check_int(value, name, 1)
    _check_int(pad_h, "pad_h", 0)
    _check_int(pad_w, "pad_w", 0)
    if isinstance(offset_scale, bool) or not isinstance(offset_scale, (int, float)):
        raise TypeError(f"offset_scale must be a float, got {offset_scale!r}")
    if not math.isfinite(offset_scale):
        raise ValueError(f"offset_scale must be finite, got {offset_scale}")
    batch, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(f"input has {channels} channels (its last dimension, channels-last "
                         f"[N, H, W, C]) but group * group_channels = {group} * {group_channels} = "
                         f"{group * group_channels}")
    points = kernel_h * kernel_w - int(bool(remove_center))
    if points == 0:
        raise ValueError("remove_center leaves no point of a 1x1 kernel (kernel_h = kernel_w = 1)")
    out_h = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"input of spatial size {height}x{width} is too small for a {kernel_h}x{kernel_w} "
                         f"kernel with padding ({pad_h}, {pad_w}) and dilation ({dilation_h}, {dilation_w})")
    return batch, out_h, out_w, points


def _output_size(input, kernel_size, stride, padding, dilation):
    out_h = (input.shape[1] + 2 * padding[0] - (dilation[0] * (kernel_size[0] - 1) + 1)) // stride[0] + 1
    out_w = (input.shape[2] + 2 * padding[1] - (dilation[1] * (kernel_size[1] - 1) + 1)) // stride[1] + 1
    return out_h, out_w


def _fake_v3(input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
             offset_scale, remove_center):
    out_h, out_w = _output_size(input, kernel_size, stride, padding, dilation)
    return input.new_empty((input.shape[0], out_h, out_w, input.shape[3]))


def _fake_v4(input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels,
             offset_scale, remove_center):
    out_h, out_w = _output_size(input, kernel_size, stride, padding, dilation)
    return input.new_empty((input.shape[0], out_h, out_w, input.shape[3]))


def _register() -> None:
    """Fake kernels and autograd of the extension's ops."""
    torch.library.register_fake("detkit::dcnv3_core", _fake_v3)
    torch.library.register_fake("detkit::dcnv4_core", _fake_v4)

    @torch.library.register_fake("detkit::dcnv3_core_backward")
    def _fake_v3_backward(grad_output, input, offset, mask, kernel_size, stride, padding, dilation, group,
                          group_channels, offset_scale, remove_center):
        return (torch.empty_like(input, memory_format=torch.contiguous_format),
                torch.empty_like(offset, memory_format=torch.contiguous_format),
                torch.empty_like(mask, memory_format=torch.contiguous_format))

    @torch.library.register_fake("detkit::dcnv4_core_backward")
    def _fake_v4_backward(grad_output, input, offset_mask, kernel_size, stride, padding, dilation, group,
                          group_channels, offset_scale, remove_center):
        return (torch.empty_like(input, memory_format=torch.contiguous_format),
                torch.empty_like(offset_mask, memory_format=torch.contiguous_format))

    def setup_context_v3(ctx, inputs, output):
        input, offset, mask, *geometry = inputs
        ctx.save_for_backward(input, offset, mask)
        ctx.geometry = geometry

    def backward_v3(ctx, grad_output):
        input, offset, mask = ctx.saved_tensors
        grad_input, grad_offset, grad_mask = torch.ops.detkit.dcnv3_core_backward(
            grad_output, input, offset, mask, *ctx.geometry)
        return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.geometry)

    def setup_context_v4(ctx, inputs, output):
        input, offset_mask, *geometry = inputs
        ctx.save_for_backward(input, offset_mask)
        ctx.geometry = geometry

    def backward_v4(ctx, grad_output):
        input, offset_mask = ctx.saved_tensors
        grad_input, grad_offset_mask = torch.ops.detkit.dcnv4_core_backward(
            grad_output, input, offset_mask, *ctx.geometry)
        return (grad_input, grad_offset_mask) + (None,) * len(ctx.geometry)

    torch.library.register_autograd("detkit::dcnv3_core", backward_v3, setup_context=setup_context_v3)
    torch.library.register_autograd("detkit::dcnv4_core", backward_v4, setup_context=setup_context_v4)


if _extension.LOADED:
    _register()
_dispatch.define_pure_op("dcnv3_core", _fake_v3)
_dispatch.define_pure_op("dcnv4_core", _fake_v4)
