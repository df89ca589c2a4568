"""Backbones: ResNet-18/34/50/101 with deformable 3x3 convs placed by configuration."""
from detkit.modeling.backbone.resnet import (
    FEATURE_NAMES,
    STAGE_NAMES,
    ResNet,
    block_counts,
    deformable_layers,
    last_blocks,
    load_torchvision_weights,
)

__all__ = [
    "FEATURE_NAMES",
    "STAGE_NAMES",
    "ResNet",
    "block_counts",
    "deformable_layers",
    "last_blocks",
    "load_torchvision_weights",
]
