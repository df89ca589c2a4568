"""RoIAlign and (modulated) deformable RoI pooling written with gathers, for graphs without RoiAlign.

onnxruntime's CPU provider runs ONNX `RoiAlign` up to opset 21 only, so an opset-22 file
cannot use it. `roi_align_gather` computes the same thing from plain tensor operations
(Floor, Clip, Gather, sums) that any opset has: the sample positions of the kernels, in
the kernels' order of operations, then RoIAlign's bilinear rule (zero outside
[-1, H] x [-1, W], positions clamped to the border pixels) and the mean per bin.

It needs a fixed sampling ratio (every detkit config uses 2): the adaptive one,
ceil(bin size), gives a different number of samples per RoI, which a fixed-shape gather
cannot do (the export refuses it at opset 22).

It sits beside the pooler it stands in for: `RoIPooler.gather_pool` (detkit.modeling.heads.poolers)
is each pooler kind's pooling in this form, next to its own, and `GatherRoIPooler` is a pooler
that pools through it, which the ONNX export swaps in for opset 22.
"""
from __future__ import annotations

import torch
from torch import Tensor


def roi_align_gather(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                     sampling_ratio: int, aligned: bool = True, offset: Tensor | None = None,
                     mask: Tensor | None = None, gamma: float = 0.1) -> Tensor:
    """input [B, C, H, W], rois [K, 5] -> [K, C, ph, pw].

    aligned=True with offset/mask is `detkit.ops.deform_roi_pool`; aligned=False (no offset)
    is `torchvision.ops.roi_align(..., aligned=False)`. sampling_ratio must be positive.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align_gather needs a positive sampling_ratio")
    ph, pw = output_size
    grid = int(sampling_ratio)
    channels = input.shape[1]
    dtype = input.dtype
    # Sizes as tensors, so that a trace keeps them dynamic.
    shape = torch._shape_as_tensor(input)
    height, width = shape[2], shape[3]
    scale = torch.tensor(spatial_scale, dtype=dtype)
    half = torch.tensor(0.5 if aligned else 0.0, dtype=dtype)
    start_x = rois[:, 1] * scale - half                                     # [K]
    start_y = rois[:, 2] * scale - half
    if aligned:
        roi_w = (rois[:, 3] - rois[:, 1]) * scale
        roi_h = (rois[:, 4] - rois[:, 2]) * scale
    else:  # torchvision's aligned=False: end - start, at least one pixel
        roi_w = torch.clamp(rois[:, 3] * scale - start_x, min=1.0)
        roi_h = torch.clamp(rois[:, 4] * scale - start_y, min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    i = torch.arange(ph, dtype=dtype).view(1, ph, 1)                       # bins along y
    j = torch.arange(pw, dtype=dtype).view(1, 1, pw)
    begin_y = start_y.view(-1, 1, 1) + i * bin_h.view(-1, 1, 1)             # [K, ph, 1]
    begin_x = start_x.view(-1, 1, 1) + j * bin_w.view(-1, 1, 1)             # [K, 1, pw]
    if offset is not None:
        begin_y = begin_y + gamma * offset[:, 1] * roi_h.view(-1, 1, 1)    # [K, ph, pw]
        begin_x = begin_x + gamma * offset[:, 0] * roi_w.view(-1, 1, 1)
    begin_y = begin_y.expand(-1, ph, pw)
    begin_x = begin_x.expand(-1, ph, pw)
    steps = torch.arange(grid, dtype=dtype) + 0.5                           # [g]
    # Sample (iy, ix) of bin (i, j): [K, ph, pw, g, 1] and [K, ph, pw, 1, g].
    y = begin_y.unsqueeze(-1).unsqueeze(-1) + (steps.view(grid, 1) * bin_h.view(-1, 1, 1, 1, 1)) / grid
    x = begin_x.unsqueeze(-1).unsqueeze(-1) + (steps.view(1, grid) * bin_w.view(-1, 1, 1, 1, 1)) / grid
    y, x = y.expand(-1, ph, pw, grid, grid), x.expand(-1, ph, pw, grid, grid)
    h_f, w_f = height.to(dtype), width.to(dtype)
    inside = (y >= -1) & (y <= h_f) & (x >= -1) & (x <= w_f)
    # RoIAlign's clamping: below 0 reads row/column 0, past the last pixel reads the last one.
    y = torch.minimum(torch.clamp(y, min=0.0), h_f - 1)
    x = torch.minimum(torch.clamp(x, min=0.0), w_f - 1)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    y1 = torch.minimum(y0 + 1, h_f - 1)
    x1 = torch.minimum(x0 + 1, w_f - 1)
    zero = torch.zeros((), dtype=dtype)
    weight_ok = torch.where(inside, torch.ones((), dtype=dtype), zero)
    hy, hx = 1 - ly, 1 - lx
    base = rois[:, 0].to(torch.int64).view(-1, 1, 1, 1, 1) * (height * width)
    flat = input.permute(0, 2, 3, 1).reshape(-1, channels)                 # [B*H*W, C]

    def corner(cy: Tensor, cx: Tensor) -> Tensor:
        index = base + cy.to(torch.int64) * width + cx.to(torch.int64)
        return flat.index_select(0, index.reshape(-1)).reshape(-1, ph, pw, grid, grid, channels)

    value = (corner(y0, x0) * (hy * hx * weight_ok).unsqueeze(-1)
             + corner(y0, x1) * (hy * lx * weight_ok).unsqueeze(-1)
             + corner(y1, x0) * (ly * hx * weight_ok).unsqueeze(-1)
             + corner(y1, x1) * (ly * lx * weight_ok).unsqueeze(-1))
    pooled = value.sum(dim=(3, 4)) / (grid * grid)                          # [K, ph, pw, C]
    pooled = pooled.permute(0, 3, 1, 2)
    if mask is not None:
        pooled = pooled * mask
    return pooled
