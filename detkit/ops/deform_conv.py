"""Deformable convolution (DCNv1) and modulated deformable convolution (DCNv2).

`deform_conv2d` checks its arguments and runs `torch.ops.detkit.deform_conv2d` (C++/CUDA
kernels in csrc/) where a compiled kernel exists for the tensors' device, and the
pure-PyTorch path (detkit/ops/pure/deform_conv2d.py) elsewhere: detkit/ops/_dispatch.py
decides. Autograd and the fake (meta) kernel used by torch.compile are registered here,
once, for every device; without the extension the op is defined over the pure path.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detkit.ops import _dispatch, _extension
from detkit.ops._checks import as_pair, check_like, check_tensor

IntPair = int | Sequence[int]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable 2-D convolution, with the semantics of `torchvision.ops.deform_conv2d`.

    Args:
        input: [B, C_in, H, W].
        offset: [B, 2*G*kh*kw, H_out, W_out], a (dy, dx) pair per kernel tap
            (tap k = i*kw + j, offset group g at channels 2*(g*kh*kw + k) and +1),
            in input pixels. G, the offset groups, is inferred from the channels;
            input channel c follows offset group c // (C_in / G).
        weight: [C_out, C_in / groups, kh, kw]; conv groups = C_in / weight.size(1).
        bias: [C_out] or None.
        stride, padding, dilation: int or (h, w).
        mask: [B, G*kh*kw, H_out, W_out] modulation scalars (DCNv2) or None (DCNv1).

    Returns:
        [B, C_out, H_out, W_out] with H_out = (H + 2*pad_h - (dil_h*(kh-1)+1)) // stride_h + 1.

    A tap samples the input bilinearly at (ho*stride_h - pad_h + i*dil_h + dy,
    wo*stride_w - pad_w + j*dil_w + dx); samples outside the input read zero,
    also for non-finite offsets.
    """
    stride_hw, padding_hw, dilation_hw = (
        as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation"))
    _check_deform_conv2d(input, offset, weight, bias, mask, stride_hw, padding_hw, dilation_hw)
    return _dispatch.call("deform_conv2d", input, offset, weight, mask, bias, list(stride_hw),
                          list(padding_hw), list(dilation_hw))


def _check_deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation) -> None:
    check_tensor(input, "input", 4, "[B, C_in, H, W]")
    check_tensor(weight, "weight", 4, "[C_out, C_in/groups, kh, kw]")
    check_tensor(offset, "offset", 4, "[B, 2*G*kh*kw, H_out, W_out]")
    check_like(weight, "weight", input)
    check_like(offset, "offset", input)
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be positive and padding non-negative, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    batch, in_channels, height, width = input.shape
    out_channels, group_in, kh, kw = weight.shape
    if group_in == 0 or in_channels % group_in != 0:
        raise ValueError(f"weight.shape[1] ({group_in}) must divide the input channels ({in_channels})")
    groups = in_channels // group_in
    if out_channels % groups != 0:
        raise ValueError(f"weight.shape[0] ({out_channels}) must be a multiple of the conv groups ({groups})")
    out_h = (height + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (width + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"input of spatial size {height}x{width} is too small for a {kh}x{kw} kernel "
                         f"with padding {padding} and dilation {dilation}")
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(f"offset.shape[1] must be a positive multiple of 2*kh*kw = {2 * taps}, "
                         f"got offset of shape {tuple(offset.shape)}")
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups != 0:
        raise ValueError(f"offset has {offset_groups} offset groups, which must divide the "
                         f"input channels ({in_channels})")
    expected = (batch, 2 * offset_groups * taps, out_h, out_w)
    if tuple(offset.shape) != expected:
        raise ValueError(f"offset must have shape {expected} (B, 2*G*kh*kw, H_out, W_out), "
                         f"got {tuple(offset.shape)}")
    if mask is not None:
        check_tensor(mask, "mask", 4, "[B, G*kh*kw, H_out, W_out]")
        check_like(mask, "mask", input)
        expected = (batch, offset_groups * taps, out_h, out_w)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} (B, G*kh*kw, H_out, W_out) to match "
                             f"offset, got {tuple(mask.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", 1, "[C_out]")
        check_like(bias, "bias", input)
        if bias.shape[0] != out_channels:
            raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")


def _fake(input, offset, weight, mask, bias, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    out_h = (input.shape[2] + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (input.shape[3] + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


def _register() -> None:
    torch.library.register_fake("detkit::deform_conv2d", _fake)

    @torch.library.register_fake("detkit::deform_conv2d_backward")
    def _fake_backward(grad_output, input, offset, weight, mask, bias, stride, padding, dilation):
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(offset, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            input.new_empty(mask.shape if mask is not None else (0,)),
            input.new_empty(bias.shape if bias is not None else (0,)),
        )

    def setup_context(ctx, inputs, output):
        input, offset, weight, mask, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(input, offset, weight, mask, bias)
        ctx.conv_args = (stride, padding, dilation)

    def backward(ctx, grad_output):
        input, offset, weight, mask, bias = ctx.saved_tensors
        grad_input, grad_offset, grad_weight, grad_mask, grad_bias = (
            torch.ops.detkit.deform_conv2d_backward(
                grad_output, input, offset, weight, mask, bias, *ctx.conv_args))
        return (grad_input, grad_offset, grad_weight,
                grad_mask if mask is not None else None,
                grad_bias if bias is not None else None,
                None, None, None)

    torch.library.register_autograd(
        "detkit::deform_conv2d", backward, setup_context=setup_context)


if _extension.LOADED:
    _register()
_dispatch.define_pure_op("deform_conv2d", _fake)
