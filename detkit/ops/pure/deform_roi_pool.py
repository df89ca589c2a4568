"""deform_roi_pool (plain, deformable, modulated) from torch operations: the path without the
compiled kernels.

The same sampling as csrc/cpu/deform_roi_pool_cpu.cpp (RoIAlign with aligned=True: the
half-pixel shift), vectorised over every sample of every bin of every RoI at once:

- bin (i, j) of RoI k starts at (start_y + i*bin_h + shift_y, start_x + j*bin_w + shift_x),
  with the learned shift gamma * offset * roi size, and averages a grid_h x grid_w grid of
  bilinear samples; sampling_ratio 0 takes ceil(bin size) per side, capped at
  `MAX_ADAPTIVE_GRID`, per RoI;
- a sample outside [-1, H] x [-1, W] (or at a non-finite position) reads zero; inside, a
  position below 0 reads as 0 and one past the last pixel as that pixel, with no gradient
  along that axis (RoIAlign's clamping, exactly as the kernels do);
- every bin is one bag of `embedding_bag` over the channels-last input: 4 weighted rows per
  sample, the weights divided by the sample count, and the mask multiplies the bin.

With a fixed sampling_ratio the sample grid is the same for every RoI, so the shapes are
static (torch.compile traces it whole). With sampling_ratio 0 (adaptive), each RoI's bins
hold exactly their own samples (ragged bags; torchvision's `_roi_align` instead samples a
grid as big as the feature map and masks most of it): the total is read back once, a host
synchronisation, as the kernels' RoI checks already do.

RoIs are data, not parameters: no gradient flows to them (as with the kernels).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from detkit.ops.pure._bags import weighted_rows

#: The kernels' cap on samples per bin side when sampling_ratio = 0 (csrc/roi_checks.h).
MAX_ADAPTIVE_GRID = 1024


def _format(value: float) -> str:
    """A double as C++'s ostream writes it (6 significant digits): 5, -0.5, nan, 1e+30."""
    return f"{value:g}"


def check_roi_values(rois: Tensor, batch: int, op: str = "deform_roi_pool") -> None:
    """`detkit::check_roi_values` (csrc/roi_checks.h): RuntimeError naming the first RoI that
    is not finite or whose batch index lies outside [0, batch), with the kernels' message."""
    if rois.shape[0] == 0:
        return
    index = rois[:, 0]
    ok = torch.isfinite(rois).all() & (index >= 0).all() & (index < batch).all()
    if bool(ok):
        return
    host = rois.detach().to("cpu", torch.float64).tolist()
    for k, roi in enumerate(host):
        for i, value in enumerate(roi):
            if not math.isfinite(value):
                raise RuntimeError(f"{op}: rois[{k}, {i}] is not finite ({_format(value)}); RoI "
                                   "coordinates must be finite (float16 holds at most 65504)")
        if not 0 <= roi[0] < batch:
            raise RuntimeError(f"{op}: rois[{k}, 0] (batch index) is {_format(roi[0])} but the input "
                               f"holds {batch} images: it must lie in [0, {batch})")


def _axis(position: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RoIAlign along one axis of length `size`: (inside, low index, high index, fraction).

    Outside [-1, size] (NaN included) is not inside; a position <= 0 reads as 0 and one at or
    past the last pixel as that pixel, with no gradient (`torch.where` with a constant)."""
    inside = (position >= -1) & (position <= size)
    position = torch.where(inside, position, 0.0)
    position = torch.where(position > 0, position, 0.0)
    low = position.detach().floor()
    last = low >= size - 1
    low = torch.where(last, float(size - 1), low)
    position = torch.where(last, low, position)
    high = torch.where(last, low, low + 1)
    return inside, low.long(), high.long(), position - low


def _adaptive_grid(bin_size: Tensor) -> Tensor:
    """ceil(bin_size) clamped to [0, MAX_ADAPTIVE_GRID]; NaN and non-positive sizes give 0."""
    cells = torch.ceil(bin_size.clamp(max=MAX_ADAPTIVE_GRID))
    return torch.where(cells > 0, cells, 0.0).long()


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None,
                    pooled_h: int, pooled_w: int, spatial_scale: float, sampling_ratio: int,
                    gamma: float) -> Tensor:
    """`detkit.ops.deform_roi_pool` for arguments its wrapper accepted: [K, C, ph, pw].

    RoIs that are not finite or name no image of the batch raise the kernels' RuntimeError;
    traced by torch.compile (where that check would need the values) they pool to zero instead,
    as the CUDA kernels do under graph capture. sampling_ratio 0 reads the sample count back
    from the device, which a trace with fullgraph=True refuses: use a fixed ratio there (detkit's
    configs use 2)."""
    batch, channels, height, width = input.shape
    num_rois, bins = rois.shape[0], pooled_h * pooled_w
    device, dtype = input.device, input.dtype
    rois = rois.detach()
    # Traced (torch.compile, torch.export, AOT autograd: fake or functional tensors, a
    # subclass), the values are unknown: bad RoIs then pool to zero instead (`valid` below).
    if not torch.compiler.is_compiling() and type(rois) is torch.Tensor:
        check_roi_values(rois, batch)
    if num_rois == 0 or channels == 0 or height == 0 or width == 0:
        out = input.new_zeros(num_rois, channels, pooled_h, pooled_w)
        # Keep the graph connected so backward yields (zero) gradients, as the kernels do.
        for t in (input, offset, mask):
            if t is not None and t.requires_grad:
                out = out + t.sum() * 0
        return out

    valid = torch.isfinite(rois).all(1) & (rois[:, 0] >= 0) & (rois[:, 0] < batch)
    rois = torch.where(valid.unsqueeze(1), rois, 0.0)
    image = rois[:, 0].long()
    start_x = rois[:, 1] * spatial_scale - 0.5
    start_y = rois[:, 2] * spatial_scale - 0.5
    roi_w = (rois[:, 3] - rois[:, 1]) * spatial_scale
    roi_h = (rois[:, 4] - rois[:, 2]) * spatial_scale
    bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h

    # Where each bin begins, [K, ph, pw]: the kernel's start + i * bin size + learned shift.
    rows = torch.arange(pooled_h, device=device, dtype=dtype)
    cols = torch.arange(pooled_w, device=device, dtype=dtype)
    begin_y = (start_y[:, None] + rows * bin_h[:, None])[:, :, None].expand(-1, -1, pooled_w)
    begin_x = (start_x[:, None] + cols * bin_w[:, None])[:, None, :].expand(-1, pooled_h, -1)
    if offset is not None:
        begin_x = begin_x + gamma * offset[:, 0] * roi_w[:, None, None]
        begin_y = begin_y + gamma * offset[:, 1] * roi_h[:, None, None]

    if sampling_ratio > 0:
        # One grid for all RoIs: y [K, ph, pw, n, 1], x [K, ph, pw, 1, n] -> bags of n*n*4.
        steps = torch.arange(sampling_ratio, device=device, dtype=dtype) + 0.5
        y = (begin_y.unsqueeze(-1) + steps * bin_h[:, None, None, None] / sampling_ratio).unsqueeze(-1)
        x = (begin_x.unsqueeze(-1) + steps * bin_w[:, None, None, None] / sampling_ratio).unsqueeze(-2)
        count = torch.full((num_rois, 1, 1, 1, 1), float(max(sampling_ratio * sampling_ratio, 1)),
                           device=device, dtype=dtype)
        bag_offsets = None
        image_of_sample = image.view(-1, 1, 1, 1, 1)
        valid_of_sample = valid.view(-1, 1, 1, 1, 1)
    else:
        # Ragged bags: RoI k's bins each hold grid_h[k] * grid_w[k] samples.
        grid_h = torch.where(valid, _adaptive_grid(bin_h), 0)
        grid_w = torch.where(valid, _adaptive_grid(bin_w), 0)
        per_bag = (grid_h * grid_w).repeat_interleave(bins)                   # [K*bins]
        bag_offsets = torch.cumsum(per_bag, 0) - per_bag
        total = int(per_bag.sum())
        bag = torch.repeat_interleave(torch.arange(num_rois * bins, device=device), per_bag,
                                      output_size=total)                     # [S]
        roi = bag // bins
        local = torch.arange(total, device=device) - bag_offsets[bag]
        gw = grid_w[roi]
        gh = grid_h[roi]
        iy, ix = (local // gw).to(dtype), (local % gw).to(dtype)
        y = begin_y.reshape(-1)[bag] + (iy + 0.5) * bin_h[roi] / gh.to(dtype)
        x = begin_x.reshape(-1)[bag] + (ix + 0.5) * bin_w[roi] / gw.to(dtype)
        count = (gh * gw).clamp(min=1).to(dtype)
        image_of_sample = image[roi]
        valid_of_sample = valid[roi]

    inside_y, y0, y1, ly = _axis(y, height)
    inside_x, x0, x1, lx = _axis(x, width)
    hy, hx = 1 - ly, 1 - lx
    keep = (inside_y & inside_x & valid_of_sample).to(dtype) / count
    weights = torch.stack(torch.broadcast_tensors(hy * hx, hy * lx, ly * hx, ly * lx), -1) * keep.unsqueeze(-1)
    base = image_of_sample * (height * width)
    index = torch.stack(torch.broadcast_tensors(base + y0 * width + x0, base + y0 * width + x1,
                                                base + y1 * width + x0, base + y1 * width + x1), -1)
    table = input.permute(0, 2, 3, 1).reshape(-1, channels)                   # [B*H*W, C]
    if bag_offsets is None:
        out = weighted_rows(table, index.reshape(num_rois * bins, -1), weights.reshape(num_rois * bins, -1))
    else:
        out = weighted_rows(table, index.reshape(-1), weights.reshape(-1), bag_offsets * 4)
    out = out.view(num_rois, pooled_h, pooled_w, channels).permute(0, 3, 1, 2)
    if mask is not None:
        out = out * mask
    return out.contiguous()


def _sizes(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


#: dtypes as c10::ScalarType prints them, for the kernels' messages.
_SCALAR_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                 torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int"}


def _dtype(t: Tensor) -> str:
    return _SCALAR_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))


def check_op_arguments(input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None,
                       pooled_h: int, pooled_w: int) -> None:
    """The checks of the kernels' `describe` (csrc/cpu/deform_roi_pool_cpu.cpp), with their
    RuntimeError messages, for calls of the op that skip the Python wrapper (the RoI values
    are checked by `deform_roi_pool` itself)."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise RuntimeError(f"deform_roi_pool: {message}")

    def same(t: Tensor, name: str) -> None:
        check(t.device == input.device, f"{name} is on {t.device} but input is on {input.device}")
        check(t.dtype == input.dtype, f"{name} has dtype {_dtype(t)} but input has dtype {_dtype(input)}")

    check(input.dim() == 4, f"input must be [B, C, H, W], got {_sizes(input)}")
    same(rois, "rois")
    check(rois.dim() == 2 and rois.shape[1] == 5,
          f"rois must be [K, 5] = (batch_index, x1, y1, x2, y2), got {_sizes(rois)}")
    check(pooled_h > 0 and pooled_w > 0, "output_size must be positive")
    num_rois = rois.shape[0]
    if offset is not None:
        same(offset, "offset")
        check(tuple(offset.shape) == (num_rois, 2, pooled_h, pooled_w),
              f"offset must be [{num_rois}, 2, {pooled_h}, {pooled_w}], got {_sizes(offset)}")
    if mask is not None:
        same(mask, "mask")
        check(tuple(mask.shape) == (num_rois, 1, pooled_h, pooled_w),
              f"mask must be [{num_rois}, 1, {pooled_h}, {pooled_w}], got {_sizes(mask)}")


def deform_roi_pool_op(input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None,
                       pooled_height: int, pooled_width: int, spatial_scale: float,
                       sampling_ratio: int, gamma: float) -> Tensor:
    """`torch.ops.detkit.deform_roi_pool` (the op's argument order, csrc/schemas.cpp) on the
    pure path, checking its arguments as the kernels do."""
    check_op_arguments(input, rois, offset, mask, pooled_height, pooled_width)
    return deform_roi_pool(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                           sampling_ratio, gamma)
