"""DCNv3 / DCNv4 sampling from torch operations: the path without the compiled kernels.

`dcnv3_core_pure` / `dcnv4_core_pure` compute what csrc/cpu/dcnv3_cpu.cpp computes, vectorised
over every sample at once, with the kernel's arithmetic:

- point (i, j) of output pixel (ho, wo) samples at x = ox + (i*dil_w + dx) * offset_scale with
  ox = (wo*stride_w - pad_w + c_w) - c_w * offset_scale, c_w = dil_w*(kernel_w - 1) // 2, y
  likewise (the integer parts exact, the rest in the input's dtype, in the kernel's order);
- a sample outside (-1, H) x (-1, W), or at a non-finite position, reads zero and gets no
  offset or mask gradient; inside, its four bilinear corners are read from a zero-bordered copy
  of the input with the kernel's floor, so that a sample on a pixel centre (zero offsets: every
  DCNv3/DCNv4 layer at initialisation) takes its offset gradient from the same pixel cell as
  the kernels do;
- float16 / bfloat16 inputs are computed in float32 and the result rounded, as the CUDA kernels
  accumulate in float32;
- the output [N, H_out, W_out, G*D] is one `embedding_bag` (detkit.ops.pure._bags) over that
  bordered input: one bag of 4*K weighted rows per (pixel, group), the mask folded into the
  weights; it comes out contiguous, in the kernels' (and the fake kernels') layout.

Autograd runs through all of it (no hand-written backward); torch.compile traces it.
`dcnv3_core_op` / `dcnv4_core_op` take the ops' own arguments (csrc/schemas.cpp) and check them
as the kernels do; they are what `detkit.ops._dispatch` runs.

`dcnv3_core_grid_sample` / `dcnv4_core_grid_sample` are the official `dcnv3_core_pytorch`
formulation (one `grid_sample` call for all points): benchmarks/bench_dcnv3.py times the
kernels against them. They are not used by the dispatch: grid_sample rescales positions to
[-1, 1] and back, which can move a pixel-exact sample into the neighbouring cell and give a
different offset gradient than the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.ops.pure._bags import weighted_rows
from detkit.ops.pure.deform_conv2d import _dtype, _sizes


def _point_grid(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int,
                remove_center: bool) -> tuple[list[int], list[int]]:
    """(i*dil_w, j*dil_h) of the kernel points in the official order (x index i outer, y index
    j inner), without the centre with remove_center."""
    centre = (kernel_w // 2, kernel_h // 2)
    pairs = [(i, j) for i in range(kernel_w) for j in range(kernel_h)
             if not (remove_center and (i, j) == centre)]
    return [i * dilation_w for i, _ in pairs], [j * dilation_h for _, j in pairs]


def _output_size(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                 dilation_w) -> tuple[int, int]:
    out_h = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    return out_h, out_w


def _sample(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
            stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
            group: int, group_channels: int, offset_scale: float, remove_center: bool) -> Tensor:
    """The shared core. offset: [N, Ho, Wo, G, K, 2] (x, y); mask: [N, Ho, Wo, G, K] (views of
    any strides)."""
    batch, height, width, channels = input.shape
    out_h, out_w = _output_size(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                dilation_h, dilation_w)
    result_dtype = input.dtype
    if result_dtype in (torch.float16, torch.bfloat16):
        # As the CUDA kernels: positions, weights and sums in float32, the result in the input's dtype.
        input, offset, mask = input.float(), offset.float(), mask.float()
    device, dtype = input.device, input.dtype
    xs, ys = _point_grid(kernel_h, kernel_w, dilation_h, dilation_w, remove_center)
    points = len(xs)
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    # The kernel's scalars in the input's dtype: offset_scale rounded once, the origin
    # p0 - half*scale, then origin + (point + offset) * scale.
    scale = torch.full((), offset_scale, dtype=dtype, device=device)
    p0_w = torch.arange(out_w, device=device) * stride_w + (half_w - pad_w)
    p0_h = torch.arange(out_h, device=device) * stride_h + (half_h - pad_h)
    origin_x = p0_w.to(dtype) - half_w * scale                                  # [Wo]
    origin_y = p0_h.to(dtype) - half_h * scale                                  # [Ho]
    point_x = torch.tensor(xs, dtype=dtype, device=device)                      # [K]
    point_y = torch.tensor(ys, dtype=dtype, device=device)
    x = origin_x.view(1, 1, out_w, 1, 1) + (point_x + offset[..., 0]) * scale   # [N, Ho, Wo, G, K]
    y = origin_y.view(1, out_h, 1, 1, 1) + (point_y + offset[..., 1]) * scale

    # The kernel's test: any comparison with NaN is false, so a NaN position lands outside.
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, 0.0)
    x = torch.where(inside, x, 0.0)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    m = mask * inside.to(dtype)
    weights = torch.stack([m * hy * hx, m * hy * lx, m * ly * hx, m * ly * lx], dim=-1)  # [N, Ho, Wo, G, K, 4]

    # Rows of the bordered input [N, H+2, W+2, G] x D: corner (y0, x0) is pixel (y0 + 1, x0 + 1)
    # there, and the other three follow it.
    padded_w = width + 2
    image = torch.arange(batch, device=device).view(-1, 1, 1, 1, 1) * ((height + 2) * padded_w * group)
    first = image + ((y0.long() + 1) * padded_w + (x0.long() + 1)) * group \
        + torch.arange(group, device=device).view(-1, 1)                          # [N, Ho, Wo, G, K]
    corners = torch.tensor([0, group, padded_w * group, (padded_w + 1) * group], device=device)
    index = first.unsqueeze(-1) + corners                                       # [N, Ho, Wo, G, K, 4]
    table = F.pad(input, (0, 0, 1, 1, 1, 1)).reshape(-1, group_channels)
    out = weighted_rows(table, index.reshape(-1, points * 4), weights.reshape(-1, points * 4))
    # [N*Ho*Wo*G, D] is [N, Ho, Wo, G*D] contiguous: the kernels' (and the fake kernels') layout.
    return out.view(batch, out_h, out_w, channels).to(result_dtype)


def dcnv3_core_pure(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                    dilation_w: int, group: int, group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """`detkit.ops.dcnv3_core` without compiled code, for arguments it accepted (no checks)."""
    batch, out_h, out_w = offset.shape[:3]
    points = kernel_h * kernel_w - int(bool(remove_center))
    return _sample(input, offset.reshape(batch, out_h, out_w, group, points, 2),
                   mask.reshape(batch, out_h, out_w, group, points), kernel_h, kernel_w, stride_h,
                   stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                   float(offset_scale), bool(remove_center))


def dcnv4_core_pure(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                    dilation_w: int, group: int, group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """`detkit.ops.dcnv4_core` without compiled code, for arguments it accepted (no checks).
    The padding at the end of offset_mask's rows gets a zero gradient."""
    points = kernel_h * kernel_w - int(bool(remove_center))
    packed = offset_mask[..., :group * points * 3].unflatten(-1, (group, 3 * points))
    offset = packed[..., :2 * points].unflatten(-1, (points, 2))
    mask = packed[..., 2 * points:]
    return _sample(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                   dilation_h, dilation_w, group, group_channels, float(offset_scale),
                   bool(remove_center))


# ----------------------------------------------------------------------------- the ops

def check_op_arguments(name: str, input: Tensor, offset: Tensor, mask: Tensor | None, kernel_size,
                       stride, padding, dilation, group: int, group_channels: int,
                       remove_center: bool) -> None:
    """The checks of the kernels' `describe` (csrc/cpu/dcnv3_cpu.cpp), with their RuntimeError
    messages, for calls of the ops that skip the Python wrappers (name: "dcnv3_core" or
    "dcnv4_core"; for dcnv4_core, offset is offset_mask and mask is None). The CPU kernel's
    own limits (CPU tensors, float32/float64) are not checked: the pure path has neither."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise RuntimeError(f"{name}: {message}")

    check(input.dim() == 4, f"input must be [N, H, W, group*group_channels], got shape {_sizes(input)}")
    for t, what in ((offset, "offset" if mask is not None else "offset_mask"), (mask, "mask")):
        if t is None:
            continue
        check(t.device == input.device, f"{what} is on {t.device} but input is on {input.device}")
        check(t.dtype == input.dtype, f"{what} has dtype {_dtype(t)} but input has dtype {_dtype(input)}")
        check(t.dim() == 4, f"{what} must be 4-d, got shape {_sizes(t)}")
    check(len(kernel_size) == 2 and len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
          "kernel_size, stride, padding and dilation must have 2 entries")
    check(min(kernel_size) > 0 and min(stride) > 0 and min(dilation) > 0 and min(padding) >= 0,
          "kernel_size, stride and dilation must be positive, padding non-negative")
    check(group > 0 and group_channels > 0, "group and group_channels must be positive")
    batch, height, width, channels = input.shape
    check(channels == group * group_channels,
          f"input has {channels} channels but group * group_channels = {group * group_channels}")
    points = kernel_size[0] * kernel_size[1] - int(bool(remove_center))
    check(points > 0, "remove_center leaves no point of a 1x1 kernel")
    span_h = height + 2 * padding[0] - (dilation[0] * (kernel_size[0] - 1) + 1)
    span_w = width + 2 * padding[1] - (dilation[1] * (kernel_size[1] - 1) + 1)
    check(span_h >= 0 and span_w >= 0, f"input of size {height}x{width} is smaller than the dilated "
          f"kernel with padding")
    out_h, out_w = span_h // stride[0] + 1, span_w // stride[1] + 1
    if mask is not None:
        check(tuple(offset.shape) == (batch, out_h, out_w, group * points * 2),
              f"offset must be [{batch}, {out_h}, {out_w}, {group * points * 2}], got {_sizes(offset)}")
        check(tuple(mask.shape) == (batch, out_h, out_w, group * points),
              f"mask must be [{batch}, {out_h}, {out_w}, {group * points}], got {_sizes(mask)}")
    else:
        packed = (group * points * 3 + 7) // 8 * 8
        check(tuple(offset.shape) == (batch, out_h, out_w, packed),
              f"offset_mask must be [{batch}, {out_h}, {out_w}, {packed}] (group*K*3 rounded up to a "
              f"multiple of 8), got {_sizes(offset)}")


def dcnv3_core_op(input: Tensor, offset: Tensor, mask: Tensor, kernel_size, stride, padding, dilation,
                  group: int, group_channels: int, offset_scale: float, remove_center: bool) -> Tensor:
    """`torch.ops.detkit.dcnv3_core` (the op's arguments, csrc/schemas.cpp) on the pure path,
    checking its arguments as the kernels do."""
    check_op_arguments("dcnv3_core", input, offset, mask, kernel_size, stride, padding, dilation, group,
                       group_channels, remove_center)
    return dcnv3_core_pure(input, offset, mask, *kernel_size, *stride, *padding, *dilation, group,
                           group_channels, offset_scale, remove_center)


def dcnv4_core_op(input: Tensor, offset_mask: Tensor, kernel_size, stride, padding, dilation,
                  group: int, group_channels: int, offset_scale: float, remove_center: bool) -> Tensor:
    """`torch.ops.detkit.dcnv4_core` on the pure path, checking its arguments as the kernels do."""
    check_op_arguments("dcnv4_core", input, offset_mask, None, kernel_size, stride, padding, dilation,
                       group, group_channels, remove_center)
    return dcnv4_core_pure(input, offset_mask, *kernel_size, *stride, *padding, *dilation, group,
                           group_channels, offset_scale, remove_center)


# ------------------------------------------------------------- the grid_sample formulation

def _points(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, remove_center: bool,
            like: Tensor) -> Tensor:
    """[K, 2] (x, y) of the kernel points relative to the kernel centre, official order."""
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    xs = [i * dilation_w - half_w for i in range(kernel_w) for j in range(kernel_h)
          if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]
    ys = [j * dilation_h - half_h for i in range(kernel_w) for j in range(kernel_h)
          if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]
    return torch.tensor([xs, ys], dtype=like.dtype, device=like.device).t()


def dcnv3_core_grid_sample(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                    dilation_w: int, group: int, group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """The official `dcnv3_core_pytorch` formulation, one grid_sample call (benchmark baseline;
    positions rounded through grid_sample's [-1, 1] coordinates; no argument checks)."""
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


def dcnv4_core_grid_sample(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                    dilation_w: int, group: int, group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """`dcnv3_core_grid_sample` with DCNv4's packed offset_mask (benchmark baseline)."""
    k = kernel_h * kernel_w - int(bool(remove_center))
    packed = offset_mask[..., :group * k * 3].unflatten(-1, (group, 3 * k))
    offset, mask = packed[..., :2 * k].flatten(-2), packed[..., 2 * k:].flatten(-2)
    return dcnv3_core_grid_sample(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)
