"""DCNv3 / DCNv4 sampling in plain PyTorch: one `grid_sample` call for all points.

The same arguments, layouts and results as `detkit.ops.dcnv3_core` / `dcnv4_core` (up to float
rounding of the positions, which go through grid_sample's [-1, 1] coordinates), with autograd
through torch's ops, on any device and dtype grid_sample supports. It is the "grid_sample
formulation" that benchmarks/bench_dcnv3.py times the kernels against (the shape of the
official `dcnv3_core_pytorch`), and the path for machines without detkit's compiled ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _points(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, remove_center: bool,
            like: Tensor) -> Tensor:
    """[K, 2] (x, y) of the kernel points relative to the kernel centre, official order."""
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    xs = [i * dilation_w - half_w for i in range(kernel_w) for j in range(kernel_h)
          if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]
    ys = [j * dilation_h - half_h for i in range(kernel_w) for j in range(kernel_h)
          if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]
    return torch.tensor([xs, ys], dtype=like.dtype, device=like.device).t()


def dcnv3_core_pure(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                    dilation_w: int, group: int, group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """`detkit.ops.dcnv3_core` without compiled code (no argument checks)."""
    batch, height, width, channels = input.shape
    out_h = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    points = _points(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, offset)
    k = points.shape[0]
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    # Kernel centres in input pixels (integers are pixel centres), [Ho, Wo, 1, 1, 2] as (x, y).
    centre_x = torch.arange(out_w, dtype=offset.dtype, device=offset.device) * stride_w + (half_w - pad_w)
    centre_y = torch.arange(out_h, dtype=offset.dtype, device=offset.device) * stride_h + (half_h - pad_h)
    centre = torch.stack(torch.broadcast_tensors(centre_x.view(1, -1), centre_y.view(-1, 1)), -1)
    loc = centre.view(out_h, out_w, 1, 1, 2) + (points + offset.reshape(batch, out_h, out_w, group, k, 2)) \
        * offset_scale                                                     # [N, Ho, Wo, G, K, 2]
    # grid_sample's align_corners=False coordinates: pixel x <-> (2x + 1) / W - 1. Non-finite
    # positions go far outside, where the sample is zero (as in the kernels).
    size = torch.tensor([width, height], dtype=loc.dtype, device=loc.device)
    grid = (2 * loc + 1) / size - 1
    grid = torch.where(torch.isfinite(grid), grid, torch.full_like(grid, -4.0))
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(batch * group, out_h * out_w, k, 2)
    value = input.reshape(batch, height, width, group, group_channels).permute(0, 3, 4, 1, 2) \
        .reshape(batch * group, group_channels, height, width)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)                          # [N*G, D, Ho*Wo, K]
    weights = mask.reshape(batch, out_h * out_w, group, k).permute(0, 2, 1, 3) \
        .reshape(batch * group, 1, out_h * out_w, k)
    out = (sampled * weights).sum(-1)                                      # [N*G, D, Ho*Wo]
    return out.view(batch, group, group_channels, out_h, out_w).permute(0, 3, 4, 1, 2) \
        .reshape(batch, out_h, out_w, channels)


def dcnv4_core_pure(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                    dilation_w: int, group: int, group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """`detkit.ops.dcnv4_core` without compiled code (no argument checks)."""
    k = kernel_h * kernel_w - int(bool(remove_center))
    packed = offset_mask[..., :group * k * 3].unflatten(-1, (group, 3 * k))
    offset, mask = packed[..., :2 * k].flatten(-2), packed[..., 2 * k:].flatten(-2)
    return dcnv3_core_pure(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)
