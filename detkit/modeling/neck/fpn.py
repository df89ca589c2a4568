"""Feature Pyramid Network neck over backbone features, naming its outputs by stride.

The computation is torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`
(1x1 lateral convs, nearest-neighbour top-down sum, 3x3 output convs, and a
stride-2 subsampling of the coarsest output as the extra level). It is held as
the submodule `fpn`, so parameter names are torchvision's own below that prefix
(`fpn.inner_blocks.0.0.weight`, `fpn.layer_blocks.3.0.bias`, ...): torchvision's
fasterrcnn_resnet50_fpn calls the same tensors `backbone.fpn.inner_blocks.0.0.weight`.

`detkit.modeling.build.build_faster_rcnn` makes the fpn layout's neck from the model config's
flat `fpn_channels` key.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def level_name(stride: int) -> str:
    """Pyramid level name of a power-of-two stride: 4 -> "p2", 64 -> "p6"."""
    level = math.log2(stride) if stride > 0 else float("nan")
    if not level.is_integer():
        raise ValueError(f"FPN strides must be powers of two, got {stride!r}")
    return f"p{int(level)}"


class FPN(nn.Module):
    """FPN over the backbone features named in `in_channels` (finest first).

    Args:
        in_channels: {backbone feature name: channels}, in order of increasing stride,
            e.g. {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}.
        in_strides: {backbone feature name: stride} for (at least) those names. The
            strides must be distinct powers of two, increasing in `in_channels` order
            (a dilated res5 at stride 16 next to res4 at 16 cannot feed one FPN).
        out_channels: channels of every output level.
        extra_max_pool: add the coarsest level subsampled by 2 (Faster R-CNN's "p6",
            used by the RPN only).

    Attributes:
        out_channels: {"p2": C, ...}; strides: {"p2": 4, ...}, in output order.

    Shapes: {name: [B, in_channels[name], H/s, W/s]} (extra keys are ignored) ->
    OrderedDict {"p<log2 s>": [B, out_channels, H/s, W/s]} finest first, then the extra
    level [B, out_channels, ceil(H/(2 s_max)), ...] when `extra_max_pool`.
    """

    def __init__(self, in_channels: Mapping[str, int], in_strides: Mapping[str, int],
                 out_channels: int = 256, extra_max_pool: bool = True) -> None:
        super().__init__()
        self.in_features = tuple(in_channels)
        if not self.in_features:
            raise ValueError("FPN needs at least one input feature")
        missing = [n for n in self.in_features if n not in in_strides]
        if missing:
            raise ValueError(f"in_strides lacks the strides of {missing}; it has {list(in_strides)}")
        strides = [int(in_strides[n]) for n in self.in_features]
        names = [level_name(s) for s in strides]
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise ValueError("FPN inputs must have strictly increasing strides in the order given, got "
                             f"{dict(zip(self.in_features, strides))}")
        if extra_max_pool:
            strides.append(2 * strides[-1])
            names.append(level_name(strides[-1]))
        self.fpn = FeaturePyramidNetwork(
            [int(in_channels[n]) for n in self.in_features], int(out_channels),
            extra_blocks=LastLevelMaxPool() if extra_max_pool else None)
        self.out_channels = {n: int(out_channels) for n in names}
        self.strides = dict(zip(names, strides))

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        missing = [n for n in self.in_features if n not in features]
        if missing:
            raise ValueError(f"FPN needs features {list(self.in_features)}; missing {missing} "
                             f"(got {list(features)})")
        outputs = self.fpn(OrderedDict((n, features[n]) for n in self.in_features))
        return OrderedDict(zip(self.strides, outputs.values()))
