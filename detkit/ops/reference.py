"""Slow, plain-PyTorch references of the deformable ops, written for clarity.

They define what the compiled kernels compute and are what the tests compare
them against (in float64, gradients through autograd). They are never used as a
fallback: they are orders of magnitude slower.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from detkit.ops._checks import as_pair


def _bilinear_zero_padded(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear samples of image [B, C, H, W] at y, x [B, Ho, Wo] -> [B, C, Ho, Wo].

    Corners outside the image read zero; a point with y or x outside (-1, H) /
    (-1, W), or not finite, reads zero (deformable convolution's convention).
    """
    batch, channels, height, width = image.shape
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y).detach(), torch.floor(x).detach()
    ly, lx = y - y0, x - x0
    flat = image.reshape(batch, channels, height * width)

    def corner(cy: Tensor, cx: Tensor) -> Tensor:
        valid = inside & (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
        index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long()
        values = torch.gather(flat, 2, index.reshape(batch, 1, -1).expand(-1, channels, -1))
        return values.reshape(batch, channels, *y.shape[1:]) * valid.unsqueeze(1)

    return ((1 - ly) * (1 - lx)).unsqueeze(1) * corner(y0, x0) \
        + ((1 - ly) * lx).unsqueeze(1) * corner(y0, x0 + 1) \
        + (ly * (1 - lx)).unsqueeze(1) * corner(y0 + 1, x0) \
        + (ly * lx).unsqueeze(1) * corner(y0 + 1, x0 + 1)


def deform_conv2d_reference(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                            stride=1, padding=0, dilation=1, mask: Tensor | None = None) -> Tensor:
    """Same arguments and result as `detkit.ops.deform_conv2d`, one kernel tap at a time."""
    (sh, sw), (ph, pw), (dh, dw) = as_pair(stride, "stride"), as_pair(padding, "padding"), \
        as_pair(dilation, "dilation")
    batch, in_channels, _, _ = input.shape
    out_channels, group_in, kh, kw = weight.shape
    groups, taps = in_channels // group_in, kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    per_offset_group = in_channels // offset_groups
    out_h, out_w = offset.shape[2], offset.shape[3]
    rows = torch.arange(out_h, dtype=input.dtype, device=input.device).view(1, -1, 1) * sh - ph
    cols = torch.arange(out_w, dtype=input.dtype, device=input.device).view(1, 1, -1) * sw - pw

    sampled = []  # per tap: [B, C_in, Ho, Wo]
    for k in range(taps):
        i, j = divmod(k, kw)
        per_group = []
        for g in range(offset_groups):
            gk = g * taps + k
            y = rows + i * dh + offset[:, 2 * gk]
            x = cols + j * dw + offset[:, 2 * gk + 1]
            channels = input[:, g * per_offset_group:(g + 1) * per_offset_group]
            value = _bilinear_zero_padded(channels, y, x)
            if mask is not None:
                value = value * mask[:, gk].unsqueeze(1)
            per_group.append(value)
        sampled.append(torch.cat(per_group, dim=1))
    columns = torch.stack(sampled, dim=2)  # [B, C_in, K, Ho, Wo]

    group_out = out_channels // groups
    outputs = []
    for g in range(groups):
        w = weight[g * group_out:(g + 1) * group_out].reshape(group_out, group_in, taps)
        c = columns[:, g * group_in:(g + 1) * group_in]
        outputs.append(torch.einsum("oik,bikhw->bohw", w, c))
    out = torch.cat(outputs, dim=1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _roi_align_bilinear(plane: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """RoIAlign's bilinear sample of plane [C, H, W] at scalar tensors y, x -> [C].

    Outside [-1, H] x [-1, W] it reads zero; positions below 0 clamp to 0 and
    positions past the last pixel clamp to it (no gradient where clamped).
    """
    _, height, width = plane.shape
    y_value, x_value = float(y.detach()), float(x.detach())  # positions decide branches only
    if not (-1 <= y_value <= height and -1 <= x_value <= width):
        return plane.new_zeros(plane.shape[0])
    if y_value <= 0:
        y = torch.zeros_like(y)
    if x_value <= 0:
        x = torch.zeros_like(x)
    y0, x0 = int(max(y_value, 0.0)), int(max(x_value, 0.0))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = torch.full_like(y, float(y0))
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = torch.full_like(x, float(x0))
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * plane[:, y0, x0] + hy * lx * plane[:, y0, x1] \
        + ly * hx * plane[:, y1, x0] + ly * lx * plane[:, y1, x1]


#: The kernels' cap on samples per bin side when sampling_ratio = 0 (csrc/roi_checks.h).
MAX_ADAPTIVE_GRID = 1024


def _adaptive_grid(sampling_ratio: int, bin_size: float) -> int:
    """sampling_ratio if > 0, else ceil(bin_size) clamped to [0, MAX_ADAPTIVE_GRID]."""
    if sampling_ratio > 0:
        return sampling_ratio
    if not bin_size > 0:  # negative, zero or NaN
        return 0
    return min(math.ceil(min(bin_size, MAX_ADAPTIVE_GRID)), MAX_ADAPTIVE_GRID)


def deform_roi_pool_reference(input: Tensor, rois: Tensor, offset: Tensor | None = None,
                              mask: Tensor | None = None, output_size=7, spatial_scale: float = 1.0,
                              sampling_ratio: int = 0, gamma: float = 0.1) -> Tensor:
    """Same arguments and result as `detkit.ops.deform_roi_pool`, one sample at a time."""
    pooled_h, pooled_w = as_pair(output_size, "output_size")
    pooled = []
    for k in range(rois.shape[0]):
        image = input[int(rois[k, 0])]
        start_x = rois[k, 1] * spatial_scale - 0.5
        start_y = rois[k, 2] * spatial_scale - 0.5
        roi_w = (rois[k, 3] - rois[k, 1]) * spatial_scale
        roi_h = (rois[k, 4] - rois[k, 2]) * spatial_scale
        bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
        grid_h = _adaptive_grid(sampling_ratio, float(bin_h.detach()))
        grid_w = _adaptive_grid(sampling_ratio, float(bin_w.detach()))
        count = max(grid_h * grid_w, 1)
        bins = []
        for i in range(pooled_h):
            for j in range(pooled_w):
                shift_x = gamma * offset[k, 0, i, j] * roi_w if offset is not None else 0.0
                shift_y = gamma * offset[k, 1, i, j] * roi_h if offset is not None else 0.0
                total = input.new_zeros(input.shape[1])
                for iy in range(grid_h):
                    y = start_y + i * bin_h + shift_y + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + j * bin_w + shift_x + (ix + 0.5) * bin_w / grid_w
                        total = total + _roi_align_bilinear(image, y, x)
                value = total / count
                if mask is not None:
                    value = value * mask[k, 0, i, j]
                bins.append(value)
        pooled.append(torch.stack(bins, dim=1).reshape(-1, pooled_h, pooled_w))
    if not pooled:
        return input.new_zeros(0, input.shape[1], pooled_h, pooled_w)
    return torch.stack(pooled)


def dcnv3_points(kernel_h: int, kernel_w: int, remove_center: bool = False) -> list[tuple[int, int]]:
    """The (i, j) = (x index, y index) of DCNv3/DCNv4's kernel points in the official order:
    i over the kernel width outside, j over its height inside (point k = i*kernel_h + j), the
    centre point (kernel_w // 2, kernel_h // 2) left out with remove_center."""
    return [(i, j) for i in range(kernel_w) for j in range(kernel_h)
            if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]


def dcnv3_core_reference(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int,
                         stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                         dilation_w: int, group: int, group_channels: int, offset_scale: float,
                         remove_center: bool = False) -> Tensor:
    """Same arguments and result as `detkit.ops.dcnv3_core`, one (group, point) at a time.

    For output pixel (ho, wo), group g and point k = (i, j) (`dcnv3_points`), with
    half_w = dilation_w*(kernel_w - 1) // 2 (and half_h alike) and (dx, dy) the point's offset:
        x = wo*stride_w - pad_w + half_w + (i*dilation_w - half_w + dx) * offset_scale
        y = ho*stride_h - pad_h + half_h + (j*dilation_h - half_h + dy) * offset_scale
    in input pixels (integers are pixel centres); the sample is bilinear, zero outside
    (-1, H) x (-1, W), and out[..., g*D:(g+1)*D] sums mask * sample over the points.
    """
    batch, height, width, _ = input.shape
    points = dcnv3_points(kernel_h, kernel_w, remove_center)
    out_h = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    rows = torch.arange(out_h, dtype=input.dtype, device=input.device).view(1, -1, 1) * stride_h
    cols = torch.arange(out_w, dtype=input.dtype, device=input.device).view(1, 1, -1) * stride_w
    offset = offset.reshape(batch, out_h, out_w, group, len(points), 2)
    mask = mask.reshape(batch, out_h, out_w, group, len(points))
    outputs = []
    for g in range(group):
        image = input[..., g * group_channels:(g + 1) * group_channels].permute(0, 3, 1, 2)
        total = input.new_zeros(batch, group_channels, out_h, out_w)
        for k, (i, j) in enumerate(points):
            x = cols - pad_w + half_w + (i * dilation_w - half_w + offset[:, :, :, g, k, 0]) * offset_scale
            y = rows - pad_h + half_h + (j * dilation_h - half_h + offset[:, :, :, g, k, 1]) * offset_scale
            total = total + _bilinear_zero_padded(image, y, x) * mask[:, :, :, g, k].unsqueeze(1)
        outputs.append(total.permute(0, 2, 3, 1))
    return torch.cat(outputs, dim=-1)


def dcnv4_unpack(offset_mask: Tensor, group: int, points: int) -> tuple[Tensor, Tensor]:
    """DCNv4's packed [N, Ho, Wo, P] -> DCNv3's offset [N, Ho, Wo, group*points*2] and mask
    [N, Ho, Wo, group*points]: per group 2*points offsets ((x, y) per point), then points
    weights; the entries past group*points*3 are padding."""
    used = offset_mask[..., :group * points * 3].unflatten(-1, (group, 3 * points))
    return used[..., :2 * points].flatten(-2), used[..., 2 * points:].flatten(-2)


def dcnv4_core_reference(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int,
                         stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                         dilation_w: int, group: int, group_channels: int, offset_scale: float,
                         remove_center: bool = False) -> Tensor:
    """Same arguments and result as `detkit.ops.dcnv4_core`: DCNv3's sampling with the weights
    used as given, read from the packed tensor (`dcnv4_unpack`)."""
    points = kernel_h * kernel_w - int(bool(remove_center))
    offset, mask = dcnv4_unpack(offset_mask, group, points)
    return dcnv3_core_reference(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
                                remove_center)
