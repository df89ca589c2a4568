"""DCNv3 (InternImage) and DCNv4 (FlashInternImage) layers over detkit's dcnv3_core / dcnv4_core.

Both layers keep the official modules' options, parameter names and shapes, so a state dict
taken from an InternImage / FlashInternImage checkpoint loads into them by name and gives the
same output. What they add is the interface the rest of detkit uses:

- `forward` takes and returns channels-first feature maps [B, C, H, W] like every backbone
  layer (the official modules take channels-last [N, H, W, C], which `forward_channels_last`
  keeps);
- `stride` > 1 works (the official modules compute offsets at the input resolution and so only
  run at stride 1): the offset branch then samples its input at the output positions, which is
  the official behaviour whenever stride is 1;
- the offset branch (what predicts where the layer samples) is named by
  `offset_branch_prefixes`, so `detkit.ops.offset_branch_parameters` finds it and an optimizer
  can give it its own learning-rate multiplier.

Zero-initialised offset and mask heads make a fresh layer a fixed function of its input: DCNv3
then averages the K points of the regular grid (softmax of zeros = 1/K each), DCNv4 sums them
with weight 0 (its weights are raw) — the layer starts at its output projection's bias.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.ops.dcnv3 import dcnv3_core, dcnv4_core
from detkit.ops.modules import SamplingGeometry, _float32_offsets

__all__ = ["DCNv3", "DCNv4"]


class _ChannelsFirstToLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class _ChannelsLastToFirst(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def _norm(kind: str, channels: int) -> nn.Sequential:
    """[B, C, H, W] -> normalised [B, H, W, C], as InternImage's build_norm_layer(dim, kind,
    'channels_first', 'channels_last') lays it out (so the parameter names match)."""
    if kind == "LN":
        return nn.Sequential(_ChannelsFirstToLast(), nn.LayerNorm(channels, eps=1e-6))
    if kind == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _ChannelsFirstToLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {kind!r}")


def _act(kind: str) -> nn.Module:
    acts = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}
    if kind not in acts:
        raise ValueError(f"act_layer must be one of {sorted(acts)}, got {kind!r}")
    return acts[kind]()


def _check_geometry(channels: int, group: int, kernel_size: int, stride: int, pad: int,
                    dilation: int, offset_scale: float) -> None:
    for name, value, low in (("channels", channels, 1), ("group", group, 1),
                             ("kernel_size", kernel_size, 1), ("stride", stride, 1),
                             ("pad", pad, 0), ("dilation", dilation, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if channels % group:
        raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
    if not math.isfinite(offset_scale):
        raise ValueError(f"offset_scale must be finite, got {offset_scale!r}")


def _output_size(size: int, kernel_size: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1


def _as_deform_conv_offsets(offset: Tensor, weight: Tensor, group: int, kernel_size: int, dilation: int,
                            offset_scale: float, remove_center: bool) -> tuple[Tensor, Tensor]:
    """Official DCNv3/DCNv4 offsets and point weights -> deform_conv2d's terms for the same
    sampling locations (see `DCNv3.sampling_offsets`).

    offset [N, Ho, Wo, G*K*2] ((x, y) pairs, points x-major, the centre left out with
    remove_center), weight [N, Ho, Wo, G*K] -> offset [N, 2*G*k*k, Ho, Wo] ((dy, dx) per tap,
    taps row-major), weight [N, G*k*k, Ho, Wo] (a removed centre: offset 0, weight 0).
    """
    n, ho, wo, _ = offset.shape
    k = kernel_size
    # Tap (i, j) of a conv with padding `pad` samples y = ho*s - pad + i*d + dy; the official
    # point (i, j) samples y = ho*s - pad + c + (i*d - c + off_y) * offset_scale, c = d(k-1)//2.
    c = (dilation * (k - 1)) // 2
    grid = torch.arange(k, dtype=offset.dtype, device=offset.device) * dilation - c
    off = offset.reshape(n, ho, wo, group, -1, 2)
    w = weight.reshape(n, ho, wo, group, -1)
    if remove_center:  # put the centre back (x-major index k*k // 2) with offset 0 and weight 0
        mid = k * k // 2
        off = torch.cat([off[..., :mid, :], off.new_zeros(n, ho, wo, group, 1, 2), off[..., mid:, :]], dim=-2)
        w = torch.cat([w[..., :mid], w.new_zeros(n, ho, wo, group, 1), w[..., mid:]], dim=-1)
    # x-major (j, i) -> row-major (i, j)
    off = off.reshape(n, ho, wo, group, k, k, 2).transpose(4, 5)
    w = w.reshape(n, ho, wo, group, k, k).transpose(4, 5)
    dy = grid.view(k, 1) * (offset_scale - 1) + off[..., 1] * offset_scale
    dx = grid.view(1, k) * (offset_scale - 1) + off[..., 0] * offset_scale
    dydx = torch.stack([dy, dx], dim=-1).reshape(n, ho, wo, -1).permute(0, 3, 1, 2)
    return dydx, w.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)


def _center_feature_scale_parameters(module: nn.Module, group: int, channels: int) -> None:
    # Zero weight and bias: the gate starts at sigmoid(0) = 0.5, half sampled, half projected.
    module.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
    module.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))


def _mix_center(module: nn.Module, sampled: Tensor, projected: Tensor, query: Tensor) -> Tensor:
    """sampled * (1 - s) + projected * s with the per-group gate s = sigmoid(Linear(query)).

    sampled, projected [N, Ho, Wo, C]; query [N, Ho, Wo, C] -> [N, Ho, Wo, C]."""
    gate = F.linear(query, module.center_feature_scale_proj_weight,
                    module.center_feature_scale_proj_bias).sigmoid()
    # Each group's gate over its channels (expand, not repeat_interleave: that one exports to
    # ONNX through ops whose shapes onnx's inference loses).
    gate = gate.unsqueeze(-1).expand(*gate.shape, module.group_channels).flatten(-2)
    return sampled * (1 - gate) + projected * gate


class DCNv3(nn.Module):
    """InternImage's DCNv3 layer: input_proj -> dcnv3_core -> output_proj, with offsets and
    per-group softmax weights predicted from a depthwise conv -> norm -> activation branch.

    Args (the official module's): channels (C, in and out), kernel_size, dw_kernel_size (of
    the branch's depthwise conv; default kernel_size), stride, pad, dilation, group (G;
    C / G channels share each group's sampling points), offset_scale (scales the grid and the
    learned offsets), act_layer ("GELU", "ReLU", "SiLU"), norm_layer ("LN", "BN"),
    center_feature_scale (gate the sampled features against the projected input).

    Parameters, named as in InternImage: dw_conv.0 (Conv2d, depthwise), dw_conv.1 (norm),
    offset (Linear C -> G*K*2), mask (Linear C -> G*K), input_proj, output_proj (Linear C -> C),
    center_feature_scale_proj_weight [G, C] / _bias [G] when center_feature_scale.

    Shapes: forward x [B, C, H, W] -> [B, C, Ho, Wo]; forward_channels_last x [N, H, W, C]
    -> [N, Ho, Wo, C], Ho = (H + 2 pad - dilation (k - 1) - 1) // stride + 1.
    """

    offset_branch_kind = "deform_conv"
    offset_branch_prefixes = ("dw_conv.", "offset.", "mask.")

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: int | None = None,
                 stride: int = 1, pad: int = 1, dilation: int = 1, group: int = 4,
                 offset_scale: float = 1.0, act_layer: str = "GELU", norm_layer: str = "LN",
                 center_feature_scale: bool = False) -> None:
        super().__init__()
        _check_geometry(channels, group, kernel_size, stride, pad, dilation, offset_scale)
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        if isinstance(dw_kernel_size, bool) or not isinstance(dw_kernel_size, int) or dw_kernel_size < 1 \
                or dw_kernel_size % 2 == 0:
            raise ValueError(f"dw_kernel_size must be an odd int >= 1, got {dw_kernel_size!r}")
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.stride, self.pad, self.dilation = stride, pad, dilation
        self.group, self.group_channels = group, channels // group
        self.offset_scale, self.center_feature_scale = float(offset_scale), center_feature_scale
        points = group * kernel_size * kernel_size
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                      groups=channels),
            _norm(norm_layer, channels),
            _act(act_layer))
        self.offset = nn.Linear(channels, points * 2)
        self.mask = nn.Linear(channels, points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            _center_feature_scale_parameters(self, group, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for head in (self.offset, self.mask):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        for proj in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _query(self, x: Tensor) -> Tensor:
        """x [N, H, W, C] -> the branch's features [N, Ho, Wo, C] at the output positions (its
        depthwise conv has this layer's stride; a padding other than the kernel's "same"
        padding crops it to [Ho, Wo])."""
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        ho, wo = (_output_size(n, k, s, p, d) for n in x.shape[1:3])
        return self.dw_conv(x.permute(0, 3, 1, 2))[:, :ho, :wo]

    def _heads(self, query: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.mask(query).unflatten(-1, (self.group, -1)).softmax(-1).flatten(-2)
        return self.offset(query), mask

    def predict_offsets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, H, W, C] -> offsets [N, Ho, Wo, G*K*2] ((x, y) pairs, official point order)
        and softmax weights [N, Ho, Wo, G*K] (summing to 1 over each group's K points);
        float32 under autocast."""
        context, branch_input = _float32_offsets(x)
        with context:
            return self._heads(self._query(branch_input))

    @property
    def sampling_geometry(self) -> SamplingGeometry:
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        return SamplingGeometry((k, k), (s, s), (p, p), (d, d), self.group)

    def sampling_offsets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> where the layer samples, in deform_conv2d's terms relative to a
        conv of `sampling_geometry`: offsets [B, 2*G*k*k, Ho, Wo] ((dy, dx) per tap, taps
        row-major, offset_scale folded in) and the softmax point weights [B, G*k*k, Ho, Wo]."""
        offset, mask = self.predict_offsets(x.permute(0, 2, 3, 1))
        return _as_deform_conv_offsets(offset, mask, self.group, self.kernel_size, self.dilation,
                                       self.offset_scale, False)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """x [N, H, W, C] -> [N, Ho, Wo, C]: the official module's forward."""
        projected = self.input_proj(x)
        context, branch_input = _float32_offsets(x)  # offsets in float32 under autocast
        with context:
            query = self._query(branch_input)
            offset, mask = self._heads(query)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        out = dcnv3_core(projected, offset.to(projected.dtype), mask.to(projected.dtype), k, k, s, s,
                         p, p, d, d, self.group, self.group_channels, self.offset_scale)
        if self.center_feature_scale:
            ho, wo = out.shape[1:3]
            out = _mix_center(self, out, projected[:, ::s, ::s][:, :ho, :wo], query)
        return self.output_proj(out)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, Ho, Wo]."""
        return self.forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"pad={self.pad}, dilation={self.dilation}, group={self.group}, "
                f"offset_scale={self.offset_scale}, center_feature_scale={self.center_feature_scale}")


class DCNv4(nn.Module):
    """FlashInternImage's DCNv4 layer: value_proj -> dcnv4_core -> output_proj, with offsets
    and raw (unnormalised) point weights packed in one Linear `offset_mask` of the input.

    Args (the official module's): channels, kernel_size, stride, pad, dilation, group,
    offset_scale, dw_kernel_size (None: the branch reads the input itself; else a depthwise
    conv `offset_mask_dw` first), center_feature_scale, remove_center (drop the centre point:
    K = k*k - 1), output_bias, without_pointwise (no value_proj / output_proj). Unlike the
    official kernels, any group_channels works (no multiple-of-16 rule).

    Parameters, named as in DCNv4: value_proj, output_proj (Linear C -> C), offset_mask
    (Linear C -> ceil(G*K*3 / 8) * 8; per group 2K offsets then K weights), offset_mask_dw
    (Conv2d, depthwise) when dw_kernel_size, center_feature_scale_proj_weight / _bias.

    Shapes: forward x [B, C, H, W] -> [B, C, Ho, Wo]; forward_channels_last [N, H, W, C]
    -> [N, Ho, Wo, C].
    """

    offset_branch_kind = "deform_conv"
    offset_branch_prefixes = ("offset_mask.", "offset_mask_dw.")

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1,
                 dilation: int = 1, group: int = 4, offset_scale: float = 1.0,
                 dw_kernel_size: int | None = None, center_feature_scale: bool = False,
                 remove_center: bool = False, output_bias: bool = True,
                 without_pointwise: bool = False) -> None:
        super().__init__()
        _check_geometry(channels, group, kernel_size, stride, pad, dilation, offset_scale)
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(f"remove_center needs an odd kernel_size (a centre point), got {kernel_size}")
        if dw_kernel_size is not None and (isinstance(dw_kernel_size, bool) or not isinstance(dw_kernel_size, int)
                                           or dw_kernel_size < 1 or dw_kernel_size % 2 == 0):
            raise ValueError(f"dw_kernel_size must be None or an odd int >= 1, got {dw_kernel_size!r}")
        if center_feature_scale and without_pointwise:
            raise ValueError("center_feature_scale mixes in the value projection, which without_pointwise removes")
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.stride, self.pad, self.dilation = stride, pad, dilation
        self.group, self.group_channels = group, channels // group
        self.offset_scale, self.center_feature_scale = float(offset_scale), center_feature_scale
        self.remove_center, self.without_pointwise = bool(remove_center), without_pointwise
        self.points = kernel_size * kernel_size - int(self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, stride,
                                            (dw_kernel_size - 1) // 2, groups=channels)
        self.offset_mask = nn.Linear(channels, math.ceil(group * self.points * 3 / 8) * 8)
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        if center_feature_scale:
            _center_feature_scale_parameters(self, group, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            for proj in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    def predict_offsets(self, x: Tensor) -> Tensor:
        """x [N, H, W, C] -> packed offset_mask [N, Ho, Wo, ceil(G*K*3/8)*8] (per group 2K
        offsets as (x, y) pairs, then K raw weights; the padding at the end is unused);
        float32 under autocast."""
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        ho, wo = (_output_size(n, k, s, p, d) for n in x.shape[1:3])
        context, x = _float32_offsets(x)
        with context:
            if self.dw_kernel_size is not None:
                query = self.offset_mask_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            else:
                query = x[:, ::s, ::s]
            return self.offset_mask(query[:, :ho, :wo])

    @property
    def sampling_geometry(self) -> SamplingGeometry:
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        return SamplingGeometry((k, k), (s, s), (p, p), (d, d), self.group)

    def sampling_offsets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> offsets [B, 2*G*k*k, Ho, Wo] and raw point weights [B, G*k*k, Ho, Wo]
        in deform_conv2d's terms (see `DCNv3.sampling_offsets`); with remove_center the centre
        tap is there with offset 0 and weight 0."""
        packed = self.predict_offsets(x.permute(0, 2, 3, 1))
        per_group = packed[..., :self.group * self.points * 3].unflatten(-1, (self.group, 3 * self.points))
        offset = per_group[..., :2 * self.points].flatten(-2)
        weight = per_group[..., 2 * self.points:].flatten(-2)
        return _as_deform_conv_offsets(offset, weight, self.group, self.kernel_size, self.dilation,
                                       self.offset_scale, self.remove_center)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """x [N, H, W, C] -> [N, Ho, Wo, C]: the official module's forward."""
        value = x if self.without_pointwise else self.value_proj(x)
        offset_mask = self.predict_offsets(x).to(value.dtype)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        out = dcnv4_core(value, offset_mask, k, k, s, s, p, p, d, d, self.group,
                         self.group_channels, self.offset_scale, self.remove_center)
        ho, wo = out.shape[1:3]
        if self.center_feature_scale:
            out = _mix_center(self, out, value[:, ::s, ::s][:, :ho, :wo], out)
        return out if self.without_pointwise else self.output_proj(out)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, Ho, Wo]."""
        return self.forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"pad={self.pad}, dilation={self.dilation}, group={self.group}, "
                f"offset_scale={self.offset_scale}, remove_center={self.remove_center}, "
                f"without_pointwise={self.without_pointwise}")
