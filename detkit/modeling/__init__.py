"""Detector models: backbones (`detkit.modeling.backbone`) and, later, necks and heads."""
