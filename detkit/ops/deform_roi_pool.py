"""Deformable RoI pooling (DCNv1) and modulated deformable RoI pooling (DCNv2).

`deform_roi_pool` checks its arguments and runs `torch.ops.detkit.deform_roi_pool` (C++/CUDA
kernels in csrc/) where a compiled kernel exists for the tensors' device, and the
pure-PyTorch path (detkit/ops/pure/deform_roi_pool.py) elsewhere (detkit/ops/_dispatch.py
decides); autograd and the fake kernel for torch.compile are registered here once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detkit.ops import _dispatch, _extension
from detkit.ops._checks import as_pair, check_like, check_tensor


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    mask: Tensor | None = None,
    output_size: int | Sequence[int] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Pool each RoI into a ph x pw grid of bins whose positions can be shifted.

    Args:
        input: [B, C, H, W] feature map.
        rois: [K, 5] = (batch_index, x1, y1, x2, y2) in input-image pixels;
            `spatial_scale` maps them onto the feature map (1 / stride). Any floating dtype,
            independent of the input's: the kernels read them in the input's accumulation
            type (float32 for float16 / bfloat16 inputs), so pass float32 rois with a
            low-precision input; float16 / bfloat16 rois, whose batch indices round above
            2048 / 256, are refused for a batch with more images than that.
        offset: [K, 2, ph, pw] normalised bin shifts or None. Channel 0 moves bin
            (i, j) along x by gamma * offset * roi_width, channel 1 along y by
            gamma * offset * roi_height (RoI sizes in feature pixels).
        mask: [K, 1, ph, pw] weights multiplying each bin (modulated, DCNv2) or None.
        output_size: ph, pw (int or pair).
        sampling_ratio: bilinear samples per bin side; 0 means ceil(bin size), at most
            1024 (`reference.MAX_ADAPTIVE_GRID`).
        gamma: scale of the normalised offsets (0.1 in the papers).

    Raises:
        RuntimeError (from the kernel, on every device and under torch.compile too; from the
        pure-PyTorch path in eager mode) when a RoI coordinate is not finite or a batch index
        is outside [0, B). The pure path compiled by torch.compile pools such RoIs to zero.

    Returns:
        [K, C, ph, pw]. Each bin is the mean of a regular grid of bilinear samples
        (RoIAlign with aligned=True: the half-pixel shift), times its mask. With
        neither offset nor mask this equals
        `torchvision.ops.roi_align(input, rois, output_size, spatial_scale,
        sampling_ratio, aligned=True)`.
    """
    pooled_h, pooled_w = as_pair(output_size, "output_size")
    check_tensor(input, "input", 4, "[B, C, H, W]")
    check_tensor(rois, "rois", 2, "[K, 5] = (batch_index, x1, y1, x2, y2)")
    if rois.device != input.device:  # any floating dtype: batch indices stay exact (Args)
        raise ValueError(f"rois is on {rois.device} but input is on {input.device}")
    num_rois = rois.shape[0]
    if rois.shape[1] != 5:
        raise ValueError(f"rois must have shape [K, 5] = (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"output_size must be positive, got {(pooled_h, pooled_w)}")
    if offset is not None:
        check_tensor(offset, "offset", 4, f"[K, 2, {pooled_h}, {pooled_w}]")
        check_like(offset, "offset", input)
        if tuple(offset.shape) != (num_rois, 2, pooled_h, pooled_w):
            raise ValueError(f"offset must have shape {(num_rois, 2, pooled_h, pooled_w)} "
                             f"(K, 2, ph, pw), got {tuple(offset.shape)}")
    if mask is not None:
        check_tensor(mask, "mask", 4, f"[K, 1, {pooled_h}, {pooled_w}]")
        check_like(mask, "mask", input)
        if tuple(mask.shape) != (num_rois, 1, pooled_h, pooled_w):
            raise ValueError(f"mask must have shape {(num_rois, 1, pooled_h, pooled_w)} "
                             f"(K, 1, ph, pw), got {tuple(mask.shape)}")
    return _dispatch.call("deform_roi_pool", input, rois, offset, mask, pooled_h, pooled_w,
                          float(spatial_scale), int(sampling_ratio), float(gamma))


def _fake(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


def _register() -> None:
    torch.library.register_fake("detkit::deform_roi_pool", _fake)

    @torch.library.register_fake("detkit::deform_roi_pool_backward")
    def _fake_backward(grad_output, input, rois, offset, mask, pooled_height, pooled_width,
                       spatial_scale, sampling_ratio, gamma):
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty(offset.shape if offset is not None else (0,)),
            input.new_empty(mask.shape if mask is not None else (0,)),
        )

    def setup_context(ctx, inputs, output):
        input, rois, offset, mask = inputs[:4]
        ctx.save_for_backward(input, rois, offset, mask)
        ctx.pool_args = inputs[4:]

    def backward(ctx, grad_output):
        input, rois, offset, mask = ctx.saved_tensors
        grad_input, grad_offset, grad_mask = torch.ops.detkit.deform_roi_pool_backward(
            grad_output, input, rois, offset, mask, *ctx.pool_args)
        return (grad_input, None,
                grad_offset if offset is not None else None,
                grad_mask if mask is not None else None,
                None, None, None, None, None)

    torch.library.register_autograd(
        "detkit::deform_roi_pool", backward, setup_context=setup_context)


if _extension.LOADED:
    _register()
_dispatch.define_pure_op("deform_roi_pool", _fake)
