"""Layers built on the deformable ops, each owning its offset branch.

An offset branch is the sub-network that predicts where a layer samples. It is
always the submodule `offset_branch`, zero-initialised in its last layer so a
fresh layer behaves exactly like its plain counterpart (a conv, RoIAlign).
`offset_branch_parameters` finds these parameters so an optimizer can give them
their own learning-rate multiplier.

Under autocast the offset branches and the ops run in float32 while the rest of
the network runs in float16 / bfloat16: offsets and masks rounded to bfloat16
would move the samples in steps of up to 1/8 px at 20 px (docs/ops.md, "Mixed
precision").
"""
from __future__ import annotations

import math
import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from detkit.ops._checks import as_pair
from detkit.ops.deform_conv import deform_conv2d
from detkit.ops.deform_roi_pool import deform_roi_pool


def _float32_offsets(input: Tensor) -> tuple[contextlib.AbstractContextManager, Tensor]:
    """(context, input) for running an offset branch: autocast off and the input in float32
    when autocast is on for the input's device; otherwise no change."""
    device_type = input.device.type
    # Autocast exists for these; asking about others ("meta" in shape-only runs) raises.
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext(), input
    return torch.autocast(device_type, enabled=False), input.float()


class SamplingGeometry(NamedTuple):
    """The regular conv grid a deformable layer's `sampling_offsets` are relative to: tap (i, j)
    of output (ho, wo) samples the input at (ho*stride - padding + (i, j)*dilation + offset),
    in input pixel-index coordinates, for each of `groups` groups of channels."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


class DeformConv2d(nn.Module):
    """Deformable convolution with its own offset (and, modulated, mask) predictor.

    The predictor is a plain conv over the same input with this layer's kernel,
    stride, padding and dilation, producing 2*G*kh*kw offsets (plus G*kh*kw mask
    logits through a sigmoid when `modulated`, DCNv2). It starts at zero, so the
    layer starts as a regular conv (DCNv2: a conv scaled by sigmoid(0) = 0.5).

    Shapes: input [B, C_in, H, W] -> output [B, C_out, H_out, W_out].
    """

    offset_branch_kind = "deform_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        if in_channels % offset_groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.groups, self.offset_groups, self.modulated = groups, offset_groups, modulated
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = offset_groups * kh * kw
        self.offset_branch = nn.Conv2d(
            in_channels, taps * (3 if modulated else 2), self.kernel_size, self.stride,
            self.padding, self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The main weight as nn.Conv2d initialises its own; the offset branch at zero.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset_branch.weight)
        nn.init.zeros_(self.offset_branch.bias)

    def predict_offsets(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """Offsets [B, 2*G*kh*kw, H_out, W_out] and mask [B, G*kh*kw, H_out, W_out] or None
        (float32 under autocast)."""
        context, branch_input = _float32_offsets(input)
        with context:
            out = self.offset_branch(branch_input)
        if not self.modulated:
            return out, None
        split = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :split], torch.sigmoid(out[:, split:])

    @property
    def sampling_geometry(self) -> SamplingGeometry:
        return SamplingGeometry(self.kernel_size, self.stride, self.padding, self.dilation, self.offset_groups)

    def sampling_offsets(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """Where the layer samples (the interface every deformable conv layer shares):
        offsets [B, 2*G*kh*kw, Ho, Wo] relative to `sampling_geometry` and per-tap weights
        [B, G*kh*kw, Ho, Wo] (the DCNv2 mask; None for DCNv1)."""
        return self.predict_offsets(input)

    def forward(self, input: Tensor) -> Tensor:
        offset, mask = self.predict_offsets(input)
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, offset_groups={self.offset_groups}, "
                f"bias={self.bias is not None}, modulated={self.modulated}")


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling (DCNv1) or modulated deformable RoI pooling (DCNv2).

    A first, plain pass (RoIAlign, aligned=True) feeds the offset branch: fc layers
    (`num_hidden` x `hidden_dim`, ReLU, Gaussian std 0.01 init) then a
    zero-initialised fc to 2*ph*pw offsets, or 3*ph*pw when `modulated` (the last
    ph*pw through a sigmoid as the bin weights). A second pass pools with them.

    Shapes: input [B, C, H, W], rois [K, 5] = (batch_index, x1, y1, x2, y2) in
    image pixels -> [K, C, ph, pw].
    """

    offset_branch_kind = "deform_roi_pool"

    def __init__(
        self,
        in_channels: int,
        output_size: int | Sequence[int] = 7,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        modulated: bool = False,
        hidden_dim: int = 1024,
        num_hidden: int = 2,
    ) -> None:
        super().__init__()
        self.output_size = as_pair(output_size, "output_size")
        self.spatial_scale, self.sampling_ratio = float(spatial_scale), int(sampling_ratio)
        self.gamma, self.modulated, self.in_channels = float(gamma), modulated, in_channels
        bins = self.output_size[0] * self.output_size[1]
        layers: list[nn.Module] = []
        width = in_channels * bins
        for _ in range(num_hidden):
            fc = nn.Linear(width, hidden_dim)
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU(inplace=True)]
            width = hidden_dim
        last = nn.Linear(width, bins * (3 if modulated else 2))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.offset_branch = nn.Sequential(*layers, last)

    def predict_offsets(self, input: Tensor, rois: Tensor) -> tuple[Tensor, Tensor | None]:
        """Offsets [K, 2, ph, pw] and mask [K, 1, ph, pw] or None (float32 under autocast)."""
        ph, pw = self.output_size
        plain = deform_roi_pool(input, rois, None, None, self.output_size, self.spatial_scale,
                                self.sampling_ratio, self.gamma)
        context, branch_input = _float32_offsets(plain)
        with context:
            out = self.offset_branch(branch_input.flatten(1))
        offset = out[:, : 2 * ph * pw].reshape(-1, 2, ph, pw)
        if not self.modulated:
            return offset, None
        return offset, torch.sigmoid(out[:, 2 * ph * pw :]).reshape(-1, 1, ph, pw)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        offset, mask = self.predict_offsets(input, rois)
        return deform_roi_pool(input, rois, offset, mask, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
                f"gamma={self.gamma}, modulated={self.modulated}")


class OffsetSampling(nn.Module):
    """Per-channel offset sampling, the layer of the widely copied Keras `ConvOffset2D`: a
    learned (dy, dx) for every input channel and pixel, then bilinear sampling of that
    channel there (zero outside the image). A regular conv after it makes the "deformable"
    conv of that line of work; in a backbone block it stands in front of the block's conv.

    It is a 1x1 depthwise `deform_conv2d` with unit weights and one offset group per
    channel. The offsets come from `offset_branch`, a 3x3 conv (padding 1) over the input,
    zero-initialised, so a fresh layer is the identity.

    Shapes: input [B, C, H, W] -> [B, C, H, W]; offsets [B, 2*C, H, W] as (dy, dx) per channel.
    """

    offset_branch_kind = "deform_conv"

    def __init__(self, channels: int) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        self.channels = channels
        self.offset_branch = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.register_buffer("unit_weight", torch.ones(channels, 1, 1, 1), persistent=False)
        nn.init.zeros_(self.offset_branch.weight)
        nn.init.zeros_(self.offset_branch.bias)

    def predict_offsets(self, input: Tensor) -> Tensor:
        """Offsets [B, 2*C, H, W] (float32 under autocast)."""
        context, branch_input = _float32_offsets(input)
        with context:
            return self.offset_branch(branch_input)

    @property
    def sampling_geometry(self) -> SamplingGeometry:
        return SamplingGeometry((1, 1), (1, 1), (0, 0), (1, 1), self.channels)

    def sampling_offsets(self, input: Tensor) -> tuple[Tensor, None]:
        """Offsets [B, 2*C, H, W] relative to `sampling_geometry` (a 1x1 grid, one group per
        channel), no weights."""
        return self.predict_offsets(input), None

    def forward(self, input: Tensor) -> Tensor:
        offset = self.predict_offsets(input)
        return deform_conv2d(input, offset, self.unit_weight.to(offset.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def offset_branch_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """Yield (kind, qualified name, parameter) for every offset-branch parameter.

    kind is "deform_conv" (every deformable conv layer: DeformConv2d, DCNv3, DCNv4,
    OffsetSampling) or "deform_roi_pool", so an optimizer can give each kind its own
    learning-rate multiplier (DCNv2: 0.1x for the conv offsets; DCNv1: 1x, and 0.01x for
    the deformable RoI pooling fc). A layer names its branch's parameters by the prefixes
    in `offset_branch_prefixes` (default: its `offset_branch` submodule).
    """
    for module_name, module in model.named_modules():
        kind = getattr(module, "offset_branch_kind", None)
        if kind is None:
            continue
        prefixes = getattr(module, "offset_branch_prefixes", ("offset_branch.",))
        for name, param in module.named_parameters():
            if name.startswith(prefixes):
                yield kind, f"{module_name}.{name}" if module_name else name, param
