"""The box head and predictor as optional `_target_` nodes of a model config: absent, every
shipped model config builds the model it built before; given as nodes with the same options,
the same weights from the same seed (registry and Hydra alike); another head is a builder
object, called with the pooled size, whose output width the predictor gets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from detkit.config.build import build_model
from detkit.engine.checkpoint import CheckpointError
from detkit.config.schemas import register_configs
from detkit.modeling.heads.box_head import FastRCNNPredictorBuilder, TwoMLPHead, TwoMLPHeadBuilder
from tests.modeling.test_detector import NUM_CLASSES, images_and_targets, tiny_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODELS = sorted(str(p.relative_to(CONFIGS / "model"))[:-5] for p in (CONFIGS / "model").rglob("*.yaml"))
HEAD = "detkit.modeling.heads.box_head.TwoMLPHeadBuilder"
PREDICTOR = "detkit.modeling.heads.box_head.FastRCNNPredictorBuilder"

register_configs()  # what the CLI does before composing


def model_config(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def with_head_nodes(config: dict) -> dict:
    """The config with its box head spelled out as nodes (representation_size moved into one)."""
    config = dict(config)
    size = config.pop("representation_size", 1024)
    return {**config, "box_head": {"_target_": HEAD, "representation_size": size},
            "box_predictor": {"_target_": PREDICTOR}}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", MODELS)
def test_head_nodes_build_the_weights_of_the_default_head(name):
    config = model_config(name)
    torch.manual_seed(0)
    default = build_model(config)
    torch.manual_seed(0)
    explicit = build_model(with_head_nodes(config))
    assert repr(default) == repr(explicit) and same_weights(default, explicit)
    assert isinstance(explicit.roi_heads.box_head, TwoMLPHead)
    assert explicit.roi_heads.box_head.fc7.out_features == config.get("representation_size", 1024)
    torch.manual_seed(0)
    hydra_built = instantiate(OmegaConf.create(with_head_nodes(config)), _convert_="all")
    assert same_weights(default, hydra_built)


def test_representation_size_and_a_head_node_do_not_mix():
    config = model_config("faster_rcnn_r18_fpn_cpu")
    both = {**with_head_nodes(config), "representation_size": 256}
    with pytest.raises(CheckpointError, match="representation_size is the width of the default box head"):
        build_model(both)


@dataclass(frozen=True)
class OneFCHeadBuilder:
    """A head the registry does not know: one fc layer of `width`."""

    width: int = 24
    calls: list | None = None

    @property
    def out_features(self) -> int:
        return self.width

    def __call__(self, in_channels: int, resolution: int) -> nn.Module:
        if self.calls is not None:
            self.calls.append((in_channels, resolution))
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * resolution ** 2, self.width), nn.ReLU())


@pytest.mark.parametrize("layout, channels", [("fpn", 16), ("single_scale", 20)])
def test_a_new_head_gets_the_pooled_size_and_the_predictor_its_width(layout, channels):
    calls: list = []
    model = tiny_model(layout, representation_size=None, box_head=OneFCHeadBuilder(calls=calls),
                       box_predictor=FastRCNNPredictorBuilder())
    assert calls == [(channels, 7)]        # pooled maps: the FPN's 16 channels / res5's 20, 7 x 7 bins
    assert model.roi_heads.box_predictor.cls_score.in_features == 24
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    images, targets = images_and_targets()
    losses = model.train()(images, targets)
    assert torch.isfinite(sum(losses.values()))
    with torch.inference_mode():
        detections = model.eval()(images)
    assert len(detections) == len(images)


def test_a_head_outside_the_registry_is_refused_in_a_config():
    config = with_head_nodes(model_config("faster_rcnn_r18_fpn_cpu"))
    config["box_head"]["_target_"] = "tests.modeling.test_box_head.OneFCHeadBuilder"
    with pytest.raises(CheckpointError, match=r"refused box_head._target_: _target_ 'tests.modeling"):
        build_model(config)


def test_builders_are_option_holders():
    """Making a builder draws no random numbers (so adding nodes keeps the init order)."""
    state = torch.get_rng_state()
    head, predictor = TwoMLPHeadBuilder(64), FastRCNNPredictorBuilder()
    assert torch.equal(state, torch.get_rng_state())
    assert head.out_features == 64 and head(8, 7).fc6.in_features == 8 * 49
    assert predictor(64, 5).bbox_pred.out_features == 20
