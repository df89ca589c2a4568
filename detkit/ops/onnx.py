"""ONNX translations of detkit's ops: standard (default-domain) ONNX operators only.

- `detkit::deform_conv2d` -> ONNX `DeformConv` (opset 19+). Its layout is detkit's
  (torchvision's): offset [N, 2*G*kh*kw, oH, oW] as (dy, dx) per tap, mask
  [N, G*kh*kw, oH, oW], pads [ph, pw, ph, pw]; conv groups and offset groups are read
  from the weight and offset shapes.
- `detkit::dcnv3_core` / `detkit::dcnv4_core` -> ONNX `DeformConv` with one group per
  channel (group = channels), offset_group = the DCNv3 group and unit weights: the input
  and output are transposed from / to channels-last, the offsets and weights are gathered
  from DCNv3's (x, y) point order (or DCNv4's packed tensor) into DeformConv's (dy, dx)
  row-major taps, and offset_scale is folded into them (dy = s*oy + (s - 1)*(j*dil_h -
  half_h), dx alike: DeformConv's tap (j, i) then samples exactly DCNv3's point). A removed
  centre becomes a tap with zero weight. Measured against a GridSample composition in
  onnxruntime (docs/ops.md, "ONNX"), DeformConv was as fast or faster at every InternImage-T
  shape and closer to the op (no [-1, 1] normalisation of the positions).
- `detkit::deform_roi_pool` has no ONNX operator. Without offsets it is ONNX `RoiAlign`
  with coordinate_transformation_mode="half_pixel" (RoIAlign aligned=True, the same
  arithmetic). With offsets every bin (i, j) of a RoI is its own 1x1 RoiAlign over the
  shifted bin box [x_begin, y_begin, x_begin + bin_w, y_begin + bin_h], where
  x_begin = x1*s + j*bin_w + gamma*offset_x*roi_w (the kernel's bin start, before its
  half-pixel shift, which RoiAlign applies): the same samples (RoIAlign's grid per bin,
  its border clamping, its zero outside [-1, H] x [-1, W]) and the same mean, up to
  float rounding of the box corners. The mask then multiplies each bin. One caveat:
  with sampling_ratio=0 the samples per bin are ceil(bin size) of the 1x1 box, which
  can differ from ceil(roi_h / ph) by one when the bin size is an exact integer and the
  box corners round up; detkit's configs use sampling_ratio=2.

Two ways to use them:

- `register_symbolics()`: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`)
  symbolics, opsets 19 and 20 (`detkit.export` converts to 21-22 afterwards, with the RoI
  pooling as gathers, since onnxruntime runs no RoiAlign at those opsets). `detkit.export`
  uses this path for whole detectors: it also carries torchvision's own ONNX translations
  (nms -> NonMaxSuppression, roi_align -> RoiAlign, roi_pool -> MaxRoiPool) and the tracing
  code paths of torchvision's detection parts (dynamic image sizes, proposal counts).
- `custom_translation_table()`: onnxscript functions for the current exporter
  (`torch.onnx.export(..., dynamo=True, custom_translation_table=...)`), opsets 19-22,
  for models whose forward torch.export can trace (a backbone, a single layer).

Without the compiled extension (or with DETKIT_OPS=pure) the same ops are exported: during
an export detkit's functions call `torch.ops.detkit.*` itself, which the pure-PyTorch path
defines when there is no extension (detkit/ops/_dispatch.py), so the graph holds the same
DeformConv / RoiAlign nodes either way.

This module imports torch.onnx machinery and onnxscript lazily: importing detkit never
needs onnx, onnxscript or onnxruntime.
"""
from __future__ import annotations

from typing import Any

import torch

MIN_OPSET = 19                 # ONNX DeformConv
MAX_TORCHSCRIPT_OPSET = 20     # the TorchScript exporter's newest opset
MAX_OPSET = 22                 # DeformConv-22 adds bfloat16

_registered = False


class OnnxExportError(ValueError):
    """A model part that cannot become standard ONNX (raised before any file is written)."""


# --------------------------------------------------------------------- TorchScript symbolics

def _static_size(value, dim: int, what: str) -> int:
    from torch.onnx import symbolic_helper

    size = symbolic_helper._get_tensor_dim_size(value, dim)
    if size is None:
        raise OnnxExportError(f"detkit deform_conv2d: the {what} (dimension {dim}) must be known "
                              "when exporting to ONNX DeformConv")
    return int(size)


def _deform_conv2d_symbolic(g, input, offset, weight, mask, bias, stride, padding, dilation):
    from torch.onnx import symbolic_helper

    stride = symbolic_helper._get_const(stride, "is", "stride")
    padding = symbolic_helper._get_const(padding, "is", "padding")
    dilation = symbolic_helper._get_const(dilation, "is", "dilation")
    kh, kw = _static_size(weight, 2, "kernel height"), _static_size(weight, 3, "kernel width")
    in_channels = _static_size(input, 1, "input channels")
    group_in = _static_size(weight, 1, "weight's input channels per group")
    offset_channels = _static_size(offset, 1, "offset channels")
    inputs = [input, weight, offset]
    has_mask = not symbolic_helper._is_none(mask)
    if not symbolic_helper._is_none(bias):
        inputs.append(bias)
    elif has_mask:
        inputs.append(symbolic_helper._optional_input_placeholder_tensor(g))
    if has_mask:
        inputs.append(mask)
    return g.op(
        "DeformConv", *inputs,
        kernel_shape_i=[kh, kw], strides_i=list(stride), pads_i=[padding[0], padding[1], padding[0], padding[1]],
        dilations_i=list(dilation), group_i=in_channels // group_in,
        offset_group_i=offset_channels // (2 * kh * kw))


def _const(g, value, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _deform_roi_pool_symbolic(g, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                              sampling_ratio, gamma):
    from torch.onnx import symbolic_helper

    ph = int(symbolic_helper._get_const(pooled_height, "i", "pooled_height"))
    pw = int(symbolic_helper._get_const(pooled_width, "i", "pooled_width"))
    scale = float(symbolic_helper._get_const(spatial_scale, "f", "spatial_scale"))
    ratio = max(int(symbolic_helper._get_const(sampling_ratio, "i", "sampling_ratio")), 0)
    gamma = float(symbolic_helper._get_const(gamma, "f", "gamma"))
    dtype = rois.type().dtype() if rois.type().dtype() is not None else torch.float32

    def const_f(value):
        return _const(g, value, dtype)

    def column(index):  # rois[:, index] -> [K, 1]
        return g.op("Slice", rois, _const(g, [index]), _const(g, [index + 1]), _const(g, [1]))

    batch_index = g.op("Cast", g.op("Squeeze", column(0), _const(g, [1])), to_i=7)  # int64 [K]
    has_offset = not symbolic_helper._is_none(offset)
    has_mask = not symbolic_helper._is_none(mask)
    if not has_offset:
        boxes = g.op("Slice", rois, _const(g, [1]), _const(g, [5]), _const(g, [1]))
        out = g.op("RoiAlign", input, boxes, batch_index, coordinate_transformation_mode_s="half_pixel",
                   mode_s="avg", output_height_i=ph, output_width_i=pw, sampling_ratio_i=ratio,
                   spatial_scale_f=scale)
    else:
        x1, y1, x2, y2 = (column(i) for i in range(1, 5))
        s = const_f(scale)
        roi_w = g.op("Mul", g.op("Sub", x2, x1), s)                       # [K, 1]
        roi_h = g.op("Mul", g.op("Sub", y2, y1), s)
        bin_w = g.op("Div", roi_w, const_f(float(pw)))
        bin_h = g.op("Div", roi_h, const_f(float(ph)))
        # Bin (i, j), flattened as i * pw + j: its index along y and x, [1, ph * pw].
        bins_i = const_f([[float(b // pw) for b in range(ph * pw)]])
        bins_j = const_f([[float(b % pw) for b in range(ph * pw)]])

        def offset_channel(c):  # offset[:, c] -> [K, ph*pw]
            part = g.op("Slice", offset, _const(g, [c]), _const(g, [c + 1]), _const(g, [1]))
            return g.op("Reshape", part, _const(g, [-1, ph * pw]))

        off_x, off_y = offset_channel(0), offset_channel(1)
        gamma_c = const_f(gamma)
        shift_x = g.op("Mul", g.op("Mul", gamma_c, off_x), roi_w)         # [K, ph*pw]
        shift_y = g.op("Mul", g.op("Mul", gamma_c, off_y), roi_h)
        # The kernel's bin start (start = x1*s - 0.5) plus 0.5, which RoiAlign takes off again.
        begin_x = g.op("Add", g.op("Add", g.op("Mul", x1, s), g.op("Mul", bins_j, bin_w)), shift_x)
        begin_y = g.op("Add", g.op("Add", g.op("Mul", y1, s), g.op("Mul", bins_i, bin_h)), shift_y)
        end_x = g.op("Add", begin_x, bin_w)
        end_y = g.op("Add", begin_y, bin_h)
        boxes = g.op("Concat", *(g.op("Unsqueeze", t, _const(g, [2])) for t in (begin_x, begin_y, end_x, end_y)),
                     axis_i=2)                                            # [K, ph*pw, 4]
        boxes = g.op("Reshape", boxes, _const(g, [-1, 4]))
        bin_batch = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", batch_index, _const(g, [1])),
                                         _const(g, [1, ph * pw])), _const(g, [-1]))
        # ratio 0 (adaptive): ceil(bin size) of the 1x1 box, i.e. ceil(roi size / bins) up to rounding.
        pooled = g.op("RoiAlign", input, boxes, bin_batch, coordinate_transformation_mode_s="half_pixel",
                      mode_s="avg", output_height_i=1, output_width_i=1, sampling_ratio_i=ratio,
                      spatial_scale_f=1.0)                                # [K*ph*pw, C, 1, 1]
        channels = symbolic_helper._get_tensor_dim_size(input, 1)
        if channels is None:
            raise OnnxExportError("detkit deform_roi_pool: the input channels must be known to export")
        pooled = g.op("Reshape", pooled, _const(g, [-1, ph, pw, channels]))
        out = g.op("Transpose", pooled, perm_i=[0, 3, 1, 2])             # [K, C, ph, pw]
    if has_mask:
        out = g.op("Mul", out, mask)
    return out


def dcn_deform_conv_plan(kernel_size, dilation, group: int, offset_scale: float, remove_center: bool,
                         packed: bool, sampling_width: int) -> dict[str, Any]:
    """How dcnv3_core / dcnv4_core become a depthwise DeformConv: channel indices into the
    sampling tensor(s), per group and row-major tap (r, c), for DeformConv's offsets (dy, dx)
    and mask, and the constant added to the offsets after scaling them by offset_scale.

    `sampling_width` is the last dimension of the tensor the offsets come from (DCNv3's
    offset, DCNv4's offset_mask); index `sampling_width` (resp. the mask's width) is a zero
    channel that the export appends when a centre tap has no point (remove_center)."""
    from detkit.ops.reference import dcnv3_points

    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    dh, dw = int(dilation[0]), int(dilation[1])
    points = dcnv3_points(kh, kw, remove_center)
    k = len(points)
    index_of = {ij: n for n, ij in enumerate(points)}
    half_h, half_w = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    offset_width = sampling_width
    mask_width = sampling_width if packed else group * k
    offset_index, mask_index, const = [], [], []
    for g in range(group):
        offset_base = g * 3 * k if packed else g * 2 * k
        mask_base = g * 3 * k + 2 * k if packed else g * k
        for r in range(kh):
            for c in range(kw):
                point = index_of.get((c, r))
                if point is None:  # the removed centre: zero offset, zero weight
                    offset_index += [offset_width, offset_width]
                    mask_index.append(mask_width)
                    const += [0.0, 0.0]
                    continue
                offset_index += [offset_base + 2 * point + 1, offset_base + 2 * point]  # (dy, dx)
                mask_index.append(mask_base + point)
                const += [(offset_scale - 1) * (r * dh - half_h), (offset_scale - 1) * (c * dw - half_w)]
    return {"offset_index": offset_index, "mask_index": mask_index, "const": const,
            "scaled": offset_scale != 1.0, "kernel_shape": [kh, kw]}


def _dcn_symbolic(g, input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
                  offset_scale, remove_center, packed: bool):
    from torch.onnx import symbolic_helper

    kernel_size = symbolic_helper._get_const(kernel_size, "is", "kernel_size")
    stride = symbolic_helper._get_const(stride, "is", "stride")
    padding = symbolic_helper._get_const(padding, "is", "padding")
    dilation = symbolic_helper._get_const(dilation, "is", "dilation")
    group = int(symbolic_helper._get_const(group, "i", "group"))
    group_channels = int(symbolic_helper._get_const(group_channels, "i", "group_channels"))
    scale = float(symbolic_helper._get_const(offset_scale, "f", "offset_scale"))
    remove_center = bool(symbolic_helper._get_const(remove_center, "b", "remove_center"))
    width = symbolic_helper._get_tensor_dim_size(offset, 3)
    if width is None:
        raise OnnxExportError("detkit dcnv3_core / dcnv4_core: the offset width must be known to export")
    plan = dcn_deform_conv_plan(kernel_size, dilation, group, scale, remove_center, packed, int(width))
    channels = group * group_channels

    def with_zero_channel(t):
        if not remove_center:
            return t
        return g.op("Pad", t, _const(g, [0, 0, 0, 0, 0, 0, 0, 1]))

    offset_source = with_zero_channel(offset)
    mask_source = offset_source if packed else with_zero_channel(mask)
    taps = g.op("Gather", offset_source, _const(g, plan["offset_index"]), axis_i=3)     # [N, Ho, Wo, G*T*2]
    if plan["scaled"]:
        taps = g.op("Add", g.op("Mul", taps, g.op("CastLike", _const(g, scale, torch.float32), taps)),
                    g.op("CastLike", _const(g, plan["const"], torch.float32), taps))
    weights = g.op("Gather", mask_source, _const(g, plan["mask_index"]), axis_i=3)      # [N, Ho, Wo, G*T]
    x = g.op("Transpose", input, perm_i=[0, 3, 1, 2])
    ones = g.op("CastLike", g.op("ConstantOfShape", _const(g, [channels, 1, *plan["kernel_shape"]]),
                                 value_t=torch.tensor([1.0])), x)
    out = g.op("DeformConv", x, ones, g.op("Transpose", taps, perm_i=[0, 3, 1, 2]),
               symbolic_helper._optional_input_placeholder_tensor(g),
               g.op("Transpose", weights, perm_i=[0, 3, 1, 2]),
               kernel_shape_i=plan["kernel_shape"], strides_i=list(stride),
               pads_i=[padding[0], padding[1], padding[0], padding[1]], dilations_i=list(dilation),
               group_i=channels, offset_group_i=group)
    return g.op("Transpose", out, perm_i=[0, 2, 3, 1])


def _dcnv3_core_symbolic(g, input, offset, mask, kernel_size, stride, padding, dilation, group,
                         group_channels, offset_scale, remove_center):
    return _dcn_symbolic(g, input, offset, mask, kernel_size, stride, padding, dilation, group,
                         group_channels, offset_scale, remove_center, packed=False)


def _dcnv4_core_symbolic(g, input, offset_mask, kernel_size, stride, padding, dilation, group,
                         group_channels, offset_scale, remove_center):
    return _dcn_symbolic(g, input, offset_mask, None, kernel_size, stride, padding, dilation, group,
                         group_channels, offset_scale, remove_center, packed=True)


def register_symbolics() -> None:
    """Register the TorchScript-exporter symbolics of detkit's ops (opsets 19 and 20), once.

    Also loads torchvision's (nms, roi_align, roi_pool), which importing torchvision.ops
    registers. Safe to call many times."""
    global _registered
    if _registered:
        return
    import torchvision.ops  # noqa: F401  (registers torchvision's symbolics)

    import detkit.ops  # noqa: F401  (defines torch.ops.detkit.*: the extension's, or the pure path's)

    torch.onnx.register_custom_op_symbolic("detkit::deform_conv2d", _deform_conv2d_symbolic, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("detkit::deform_roi_pool", _deform_roi_pool_symbolic, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("detkit::dcnv3_core", _dcnv3_core_symbolic, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("detkit::dcnv4_core", _dcnv4_core_symbolic, MIN_OPSET)
    _registered = True


# --------------------------------------------------------------------- onnxscript translation

def _onnxscript_opset(opset: int):
    import onnxscript

    if opset not in range(MIN_OPSET, MAX_OPSET + 1):
        raise OnnxExportError(f"ONNX DeformConv needs opset {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    return getattr(onnxscript, f"opset{opset}")


def custom_translation_table(opset: int = MIN_OPSET) -> dict[Any, Any]:
    """{torch.ops.detkit.<op>.default: onnxscript function} (deform_conv2d, dcnv3_core,
    dcnv4_core) for
    `torch.onnx.export(..., dynamo=True, opset_version=opset, custom_translation_table=...)`.

    Needs onnxscript; the shapes of weight and offset (static in any real model) give the
    kernel size, conv groups and offset groups."""
    import detkit.ops  # noqa: F401  (defines torch.ops.detkit.*: the extension's, or the pure path's)

    op = _onnxscript_opset(opset)

    def deform_conv2d(input, offset, weight, mask=None, bias=None, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1)):
        kh, kw = int(weight.shape[2]), int(weight.shape[3])
        in_channels, group_in = int(input.shape[1]), int(weight.shape[1])
        offset_groups = int(offset.shape[1]) // (2 * kh * kw)
        attrs = dict(kernel_shape=[kh, kw], strides=list(stride), dilations=list(dilation),
                     pads=[padding[0], padding[1], padding[0], padding[1]], group=in_channels // group_in,
                     offset_group=offset_groups)
        if mask is None:
            return op.DeformConv(input, weight, offset, bias, **attrs)
        return op.DeformConv(input, weight, offset, bias, mask, **attrs)

    def dcn(input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
            offset_scale, remove_center, packed):
        plan = dcn_deform_conv_plan(kernel_size, dilation, group, offset_scale, remove_center, packed,
                                    int(offset.shape[3]))
        channels = group * group_channels
        zero_pad = op.Constant(value_ints=[0, 0, 0, 0, 0, 0, 0, 1])
        offset_source = op.Pad(offset, zero_pad) if remove_center else offset
        if packed:
            mask_source = offset_source
        else:
            mask_source = op.Pad(mask, zero_pad) if remove_center else mask
        taps = op.Gather(offset_source, op.Constant(value_ints=plan["offset_index"]), axis=3)
        if plan["scaled"]:
            taps = op.Add(op.Mul(taps, op.CastLike(op.Constant(value_float=float(offset_scale)), taps)),
                          op.CastLike(op.Constant(value_floats=plan["const"]), taps))
        weights = op.Gather(mask_source, op.Constant(value_ints=plan["mask_index"]), axis=3)
        x = op.Transpose(input, perm=[0, 3, 1, 2])
        ones = op.CastLike(op.Expand(op.Constant(value_float=1.0),
                                     op.Constant(value_ints=[channels, 1, *plan["kernel_shape"]])), x)
        out = op.DeformConv(x, ones, op.Transpose(taps, perm=[0, 3, 1, 2]), None,
                            op.Transpose(weights, perm=[0, 3, 1, 2]), kernel_shape=plan["kernel_shape"],
                            strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
                            dilations=list(dilation), group=channels, offset_group=group)
        return op.Transpose(out, perm=[0, 2, 3, 1])

    def dcnv3_core(input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
                   offset_scale, remove_center=False):
        return dcn(input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
                   offset_scale, remove_center, packed=False)

    def dcnv4_core(input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels,
                   offset_scale, remove_center=False):
        return dcn(input, offset_mask, None, kernel_size, stride, padding, dilation, group, group_channels,
                   offset_scale, remove_center, packed=True)

    return {torch.ops.detkit.deform_conv2d.default: deform_conv2d,
            torch.ops.detkit.dcnv3_core.default: dcnv3_core,
            torch.ops.detkit.dcnv4_core.default: dcnv4_core}
