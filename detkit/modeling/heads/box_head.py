"""Box head of the Faster R-CNN RoI head: torchvision's modules, and the builders a model
config names to choose them.

- `TwoMLPHead(in_channels, representation_size)`: flatten the pooled RoI features
  [K, C, s, s] (in_channels = C * s * s) then fc6, ReLU, fc7, ReLU -> [K, representation_size].
  This is the DCN papers' "2fc" head (two 1024-d fc layers).
- `FastRCNNPredictor(in_channels, num_classes)`: `cls_score` -> [K, num_classes] logits
  (class 0 is background) and `bbox_pred` -> [K, 4 * num_classes] box deltas.

Parameter names (fc6, fc7, cls_score, bbox_pred) are torchvision's, so torchvision
Faster R-CNN checkpoints map onto `roi_heads.box_head.*` and `roi_heads.box_predictor.*`.

A model config chooses them with the optional nodes `box_head` and `box_predictor` of
`detkit.modeling.build.build_faster_rcnn`:

    box_head: {_target_: detkit.modeling.heads.box_head.TwoMLPHeadBuilder, representation_size: 1024}
    box_predictor: {_target_: detkit.modeling.heads.box_head.FastRCNNPredictorBuilder}

Such a node builds a *builder* (it holds options only, no parameters, so making it draws no
random numbers); `build_roi_heads` calls it with the sizes it computes:
`box_head(in_channels=C, resolution=s)` -> a module [K, C, s, s] -> [K, box_head.out_features],
then `box_predictor(in_features=box_head.out_features, num_classes)`. A new head is a new
builder class (with `out_features` and that call) plus its entry in the registry of config
targets (`detkit.config.schemas`); nothing in build.py changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

__all__ = ["FastRCNNPredictor", "TwoMLPHead", "BoxHeadBuilder", "BoxPredictorBuilder", "TwoMLPHeadBuilder",
           "FastRCNNPredictorBuilder"]


class BoxHeadBuilder(Protocol):
    """What a `box_head` node builds."""

    out_features: int

    def __call__(self, in_channels: int, resolution: int) -> nn.Module:
        """A module mapping pooled RoI features [K, in_channels, resolution, resolution] to
        [K, out_features]."""


class BoxPredictorBuilder(Protocol):
    """What a `box_predictor` node builds."""

    def __call__(self, in_features: int, num_classes: int) -> nn.Module:
        """A module mapping [K, in_features] to (class logits [K, num_classes], box deltas
        [K, 4 * num_classes]), class 0 being background."""


@dataclass(frozen=True)
class TwoMLPHeadBuilder:
    """`TwoMLPHead(in_channels * resolution ** 2, representation_size)`: the 2fc head."""

    representation_size: int = 1024

    @property
    def out_features(self) -> int:
        return int(self.representation_size)

    def __call__(self, in_channels: int, resolution: int) -> TwoMLPHead:
        return TwoMLPHead(int(in_channels) * int(resolution) ** 2, int(self.representation_size))


@dataclass(frozen=True)
class FastRCNNPredictorBuilder:
    """`FastRCNNPredictor(in_features, num_classes)`: one fc for the class logits, one for the
    per-class box deltas."""

    def __call__(self, in_features: int, num_classes: int) -> FastRCNNPredictor:
        return FastRCNNPredictor(int(in_features), int(num_classes))
