"""deform_conv2d (DCNv1 / DCNv2) from torch operations: the path without the compiled kernels.

The same arithmetic as csrc/cpu/deform_conv2d_cpu.cpp, vectorised over every sample at once:

- a tap of output position (ho, wo) samples at y = (ho*stride_h - pad_h + i*dil_h) + dy,
  x = (wo*stride_w - pad_w + j*dil_w) + dx (the integer part exact, as in the kernel);
- a sample outside (-1, H) x (-1, W), or at a non-finite position, reads zero and gets no
  offset gradient; inside, its four bilinear corners are read from a zero-bordered copy of
  the input (corners off the image read the border), with the kernel's floor, so that a
  sample on a pixel centre (zero offsets: every DCN at initialisation) takes its offset
  gradient from the same pixel cell as the kernels do;
- the im2col columns [B, Ho*Wo, kh*kw, C_in] are one `embedding_bag` over that bordered
  input (4 weighted rows per sample, the mask folded into the weights), and the output is
  one batched matmul per conv group.

Autograd runs through all of it (no hand-written backward); torch.compile traces it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from detkit.ops.pure._bags import weighted_rows


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None,
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                  mask: Tensor | None) -> Tensor:
    """`detkit.ops.deform_conv2d` for arguments that `_check_deform_conv2d` accepted
    (stride, padding, dilation as pairs): [B, C_out, H_out, W_out]."""
    batch, channels, height, width = input.shape
    out_channels, group_in, kh, kw = weight.shape
    groups, taps = channels // group_in, kh * kw
    out_h, out_w = offset.shape[2], offset.shape[3]
    offset_groups = offset.shape[1] // (2 * taps)
    per_offset_group = channels // offset_groups
    positions = out_h * out_w
    device, dtype = input.device, input.dtype
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation

    # Sample positions, laid out [B, Ho, Wo, K, G] (one row of columns per (b, ho, wo), taps
    # then offset groups inside it, so that the gathered rows are the columns in place).
    tap_i = torch.arange(kh, device=device).repeat_interleave(kw) * dh        # [K]
    tap_j = torch.arange(kw, device=device).repeat(kh) * dw                   # [K]
    base_y = (torch.arange(out_h, device=device).view(-1, 1) * sh - ph + tap_i).to(dtype)  # [Ho, K]
    base_x = (torch.arange(out_w, device=device).view(-1, 1) * sw - pw + tap_j).to(dtype)  # [Wo, K]
    pairs = offset.reshape(batch, offset_groups, taps, 2, out_h, out_w).permute(0, 4, 5, 2, 1, 3)
    y = base_y.view(1, out_h, 1, taps, 1) + pairs[..., 0]                    # [B, Ho, Wo, K, G]
    x = base_x.view(1, 1, out_w, taps, 1) + pairs[..., 1]

    # The kernel's test: any comparison with NaN is false, so a NaN position lands outside.
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, 0.0)
    x = torch.where(inside, x, 0.0)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    scale = inside.to(dtype)
    if mask is not None:
        scale = scale * mask.reshape(batch, offset_groups, taps, out_h, out_w).permute(0, 3, 4, 2, 1)
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1) * scale.unsqueeze(-1)

    # Rows of the bordered input [B, G, (H+2)*(W+2), C/G]: corner (y0, x0) is pixel
    # (y0 + 1, x0 + 1) there, and the other three follow it.
    padded_w = width + 2
    plane = (height + 2) * padded_w
    image_group = (torch.arange(batch, device=device).view(-1, 1, 1, 1, 1) * offset_groups
                   + torch.arange(offset_groups, device=device))               # [B, 1, 1, 1, G]
    first = image_group * plane + (y0.long() + 1) * padded_w + (x0.long() + 1)
    corners = torch.tensor([0, 1, padded_w, padded_w + 1], device=device)
    index = first.unsqueeze(-1) + corners                                     # [B, Ho, Wo, K, G, 4]
    table = torch.nn.functional.pad(input, (1, 1, 1, 1)).reshape(
        batch, offset_groups, per_offset_group, plane).transpose(2, 3).reshape(-1, per_offset_group)
    columns = weighted_rows(table, index.reshape(-1, 4), weights.reshape(-1, 4))    # [B*Ho*Wo*K*G, C/G]

    # out[b, g, o, p] = sum over (k, c) of weight[g, o, c, k] * columns[b, p, k, g, c].
    group_out = out_channels // groups
    columns = columns.view(batch * positions, taps, groups, group_in).permute(2, 0, 1, 3).reshape(
        groups, batch * positions, taps * group_in) if groups > 1 else columns.view(1, batch * positions, -1)
    rows = weight.reshape(groups, group_out, group_in, taps).transpose(2, 3).reshape(groups, group_out, -1)
    out = torch.bmm(columns, rows.transpose(1, 2))                            # [groups, B*P, C_out/groups]
    out = out.view(groups, batch, positions, group_out).permute(1, 0, 3, 2).reshape(
        batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.contiguous()  # the kernels' (and the fake kernel's) layout


def _sizes(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


#: dtypes as c10::ScalarType prints them, for the kernels' messages.
_SCALAR_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                 torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int"}


def _dtype(t: Tensor) -> str:
    return _SCALAR_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))


def _check_same(t: Tensor, input: Tensor, name: str) -> None:
    if t.device != input.device:
        raise RuntimeError(f"deform_conv2d: {name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype:
        raise RuntimeError(f"deform_conv2d: {name} has dtype {_dtype(t)} but input has dtype {_dtype(input)}")


def check_op_arguments(input: Tensor, offset: Tensor, weight: Tensor, mask: Tensor | None,
                       bias: Tensor | None, stride, padding, dilation) -> None:
    """The checks of the kernels' `describe` (csrc/cpu/deform_conv2d_cpu.cpp), with their
    RuntimeError messages, for calls of the op that skip the Python wrapper."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise RuntimeError(f"deform_conv2d: {message}")

    check(input.dim() == 4, f"input must be [B, C, H, W], got shape {_sizes(input)}")
    check(weight.dim() == 4, f"weight must be [C_out, C_in/groups, kh, kw], got {_sizes(weight)}")
    check(offset.dim() == 4, f"offset must be [B, 2*G*kh*kw, H_out, W_out], got {_sizes(offset)}")
    _check_same(offset, input, "offset")
    _check_same(weight, input, "weight")
    check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
          "stride, padding and dilation must have 2 entries")
    check(min(stride) > 0, "stride must be positive")
    check(min(padding) >= 0, "padding must be non-negative")
    check(min(dilation) > 0, "dilation must be positive")
    batch, channels, height, width = input.shape
    out_channels, group_in, kh, kw = weight.shape
    check(group_in > 0 and channels % group_in == 0,
          f"input channels ({channels}) must be a multiple of weight.size(1) ({group_in})")
    groups, taps = channels // group_in, kh * kw
    check(out_channels % groups == 0,
          f"weight.size(0) ({out_channels}) must be a multiple of the conv groups ({groups})")
    check(offset.shape[1] > 0 and offset.shape[1] % (2 * taps) == 0,
          f"offset.size(1) must be a positive multiple of 2*kh*kw = {2 * taps}, got {offset.shape[1]}")
    offset_groups = offset.shape[1] // (2 * taps)
    check(channels % offset_groups == 0,
          f"input channels ({channels}) must be a multiple of the offset groups ({offset_groups})")
    span_h = height + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)
    span_w = width + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)
    check(span_h >= 0 and span_w >= 0,
          f"input of size {height}x{width} is smaller than the dilated kernel with padding")
    out_h, out_w = span_h // stride[0] + 1, span_w // stride[1] + 1
    check(offset.shape[0] == batch and offset.shape[2] == out_h and offset.shape[3] == out_w,
          f"offset must be [{batch}, {offset.shape[1]}, {out_h}, {out_w}], got {_sizes(offset)}")
    if mask is not None:
        _check_same(mask, input, "mask")
        check(tuple(mask.shape) == (batch, offset_groups * taps, out_h, out_w),
              f"mask must be [{batch}, {offset_groups * taps}, {out_h}, {out_w}], got {_sizes(mask)}")
    if bias is not None:
        _check_same(bias, input, "bias")
        check(bias.dim() == 1 and bias.shape[0] == out_channels,
              f"bias must be [{out_channels}], got {_sizes(bias)}")


def deform_conv2d_op(input: Tensor, offset: Tensor, weight: Tensor, mask: Tensor | None,
                     bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """`torch.ops.detkit.deform_conv2d` (the op's argument order, csrc/schemas.cpp) on the
    pure path, checking its arguments as the kernels do."""
    check_op_arguments(input, offset, weight, mask, bias, stride, padding, dilation)
    return deform_conv2d(input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation), mask)
