"""Every model config under configs/model/ composes and builds the detector it describes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detkit.config.build import build_model
from detkit.modeling.detector import FasterRCNN
from detkit.ops import DeformConv2d, offset_branch_parameters

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
MODEL_CONFIGS = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def load(name: str, num_classes: int = 5) -> dict:
    config = OmegaConf.load(MODEL_DIR / f"{name}.yaml")
    config.num_classes = num_classes
    return OmegaConf.to_container(config, resolve=True)


def test_there_are_model_configs():
    assert {"faster_rcnn_r50_fpn", "faster_rcnn_r50_single_scale", "faster_rcnn_r18_fpn_cpu"} <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_builds(name):
    config = load(name)
    model = build_model(config)
    assert isinstance(model, FasterRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == config["num_classes"]
    deform_blocks = config["backbone"].get("deform_blocks") or {}
    has_deform_conv = any(isinstance(m, DeformConv2d) for m in model.backbone.modules())
    assert has_deform_conv == bool(deform_blocks)
    kinds = {kind for kind, _, _ in offset_branch_parameters(model)}
    assert ("deform_roi_pool" in kinds) == (config["pooler_kind"] in ("deform", "mdeform"))


def test_single_scale_config_is_the_papers_layout():
    model = build_model(load("faster_rcnn_r50_single_scale"))
    assert model.backbone.strides["res5"] == 16          # dilated res5
    assert list(model.rpn_in_features) == ["res4"]


@pytest.mark.parametrize("overrides", [
    {"pooler_kind": "deform", "backbone.deform_blocks": {"res5": [-1]}},
    {"pooler_kind": "mdeform", "backbone.deform_blocks": {"res5": "all", "res4": [-3, -2, -1]},
     "backbone.deform_kind": "dcnv2"},
])
def test_deformable_overrides_compose(overrides):
    config = OmegaConf.create(load("faster_rcnn_r50_single_scale"))
    for key, value in overrides.items():
        OmegaConf.update(config, key, value, merge=False)
    model = build_model(OmegaConf.to_container(config))
    deformable = [n for n, m in model.backbone.named_modules() if isinstance(m, DeformConv2d)]
    expected = sum(len(v) if isinstance(v, list) else 3 for v in overrides["backbone.deform_blocks"].values())
    assert len(deformable) == expected


def test_cpu_config_trains_a_step():
    torch.manual_seed(0)
    config = load("faster_rcnn_r18_fpn_cpu", num_classes=4)
    config["transform_options"].update(min_size=96, max_size=128)
    model = build_model(config).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 110, 90)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [30.0, 40.0, 80.0, 100.0]]),
                "labels": torch.tensor([2, 3])}]
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for kind, _, p in offset_branch_parameters(model) if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in grads)
