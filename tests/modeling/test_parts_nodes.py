"""The RoI pooler, the FPN neck and the RPN as optional `_target_` nodes of a model config:
absent, every shipped model config builds the model it built before; given as nodes holding
the flat options, the same weights from the same seed (registry and Hydra alike); a flat
option left off its default next to its node is refused; another builder gets the sizes
build_faster_rcnn computes."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.config.build import build_model
from detkit.engine.checkpoint import CheckpointError
from detkit.config.registry import allowed_targets
from detkit.modeling.build import build_faster_rcnn
from detkit.modeling.heads.poolers import RoIPooler, RoIPoolerBuilder
from detkit.modeling.heads.rpn import RPNBuilder
from detkit.modeling.neck.fpn import FPN, FPNBuilder
from tests.modeling.test_box_head import MODELS, model_config, same_weights
from tests.modeling.test_detector import NUM_CLASSES, SMALL, TinyBackbone, images_and_targets

POOLER = "detkit.modeling.heads.poolers.RoIPoolerBuilder"
NECK = "detkit.modeling.neck.fpn.FPNBuilder"
RPN = "detkit.modeling.heads.rpn.RPNBuilder"
POOLER_KEYS = {"pooler_kind": "kind", "pooler_output_size": "output_size",
               "pooler_sampling_ratio": "sampling_ratio", "deform_gamma": "gamma", "deform_hidden_dim": "hidden_dim"}


def with_part_nodes(config: dict) -> dict:
    """The config with its pooler, neck (fpn layout) and RPN spelled out as nodes: the flat
    options moved into them."""
    config = dict(config)
    pooler = {"_target_": POOLER, **{option: config.pop(key) for key, option in POOLER_KEYS.items()
                                     if key in config}}
    rpn = {"_target_": RPN, **(config.pop("rpn_options", None) or {})}
    for key in ("anchor_sizes", "aspect_ratios"):
        if key in config:
            rpn[key] = config.pop(key)
    config.update(pooler=pooler, rpn=rpn)
    if config.get("layout", "fpn") == "fpn":
        config["neck"] = {"_target_": NECK, "out_channels": config.pop("fpn_channels", 256)}
    return config


@pytest.mark.parametrize("name", MODELS)
def test_part_nodes_build_the_weights_of_the_flat_options(name):
    config = model_config(name)
    nodes = with_part_nodes(config)
    assert not set(POOLER_KEYS) & set(nodes) and "rpn_options" not in nodes
    torch.manual_seed(0)
    default = build_model(config)
    torch.manual_seed(0)
    explicit = build_model(nodes)
    assert repr(default) == repr(explicit) and same_weights(default, explicit)
    pooler = explicit.roi_heads.box_roi_pool
    assert isinstance(pooler, RoIPooler) and pooler.kind == config.get("pooler_kind", "align")
    assert (explicit.neck is None) == (config.get("layout") == "single_scale")
    torch.manual_seed(0)
    hydra_built = instantiate(OmegaConf.create(nodes), _convert_="all")
    assert same_weights(default, hydra_built)


def test_nodes_at_the_defaults_equal_no_nodes():
    torch.manual_seed(0)
    plain = build_faster_rcnn(TinyBackbone(), 3, "fpn")
    torch.manual_seed(0)
    nodes = build_faster_rcnn(TinyBackbone(), 3, "fpn", pooler=RoIPoolerBuilder(), neck=FPNBuilder(),
                              rpn=RPNBuilder())
    assert repr(plain) == repr(nodes) and same_weights(plain, nodes)
    assert nodes.roi_heads.box_roi_pool.sampling_ratio == 2 and nodes.neck.out_channels["p2"] == 256


@pytest.mark.parametrize("flat, node", [
    ({"pooler_kind": "deform"}, {"pooler": RoIPoolerBuilder("mdeform")}),
    ({"deform_hidden_dim": 16}, {"pooler": RoIPoolerBuilder()}),
    ({"fpn_channels": 16}, {"neck": FPNBuilder(16)}),
    ({"anchor_sizes": [[16], [32], [64], [128], [256]]}, {"rpn": RPNBuilder()}),
    ({"rpn_options": {"pre_nms_top_n_train": 64}}, {"rpn": RPNBuilder(pre_nms_top_n_train=64)}),
])
def test_a_flat_option_off_its_default_and_its_node_do_not_mix(flat, node):
    (key,), (name,) = flat, node
    with pytest.raises(ValueError, match=rf"{key} is an option of the default {name}; with a {name} node"):
        build_faster_rcnn(TinyBackbone(), 3, "fpn", **flat, **node)


def test_flat_options_at_their_defaults_are_ignored_next_to_a_node():
    model = build_faster_rcnn(TinyBackbone(), 3, "fpn", "align", pooler_sampling_ratio=2, aspect_ratios=[0.5, 1, 2],
                              rpn_options={}, pooler=RoIPoolerBuilder("pool", 5), rpn=RPNBuilder(aspect_ratios=[1.0]))
    assert model.roi_heads.box_roi_pool.kind == "pool" and model.roi_heads.box_roi_pool.output_size == 5
    assert model.rpn.anchor_generator.num_anchors_per_location() == [1] * 5


def test_a_neck_node_needs_the_fpn_layout():
    with pytest.raises(ValueError, match="a neck node needs the fpn layout"):
        build_faster_rcnn(TinyBackbone(dilated_res5=True), 3, "single_scale", neck=FPNBuilder(16))


@dataclass(frozen=True)
class RecordingPooler(RoIPoolerBuilder):
    calls: list | None = None

    def __call__(self, feature_names, strides, in_channels):
        self.calls.append((list(feature_names), list(strides), in_channels))
        return super().__call__(feature_names, strides, in_channels)


@dataclass(frozen=True)
class RecordingNeck(FPNBuilder):
    calls: list | None = None

    def __call__(self, in_channels, in_strides):
        self.calls.append((dict(in_channels), {n: in_strides[n] for n in in_channels}))
        return super().__call__(in_channels, in_strides)


@dataclass(frozen=True)
class RecordingRPN(RPNBuilder):
    calls: list | None = None

    def __call__(self, in_channels, feature_names, default_anchor_sizes):
        self.calls.append((in_channels, list(feature_names), default_anchor_sizes))
        return super().__call__(in_channels, feature_names, default_anchor_sizes)


@pytest.mark.parametrize("layout", ["fpn", "single_scale"])
def test_builders_get_the_computed_maps(layout):
    calls: dict = {"pooler": [], "neck": [], "rpn": []}
    options = {key: value for key, value in SMALL.items() if key not in ("fpn_channels", "deform_hidden_dim")}
    options.pop("rpn_options")
    neck = {"neck": RecordingNeck(24, calls=calls["neck"])} if layout == "fpn" else {}
    torch.manual_seed(0)
    model = build_faster_rcnn(TinyBackbone(dilated_res5=layout == "single_scale"), NUM_CLASSES, layout,
                              pooler=RecordingPooler("mdeform", 5, hidden_dim=16, calls=calls["pooler"]),
                              rpn=RecordingRPN(post_nms_top_n_train=16, calls=calls["rpn"]), **neck, **options)
    if layout == "fpn":
        assert calls["neck"] == [({"res2": 8, "res3": 12, "res4": 16, "res5": 20},
                                  {"res2": 4, "res3": 8, "res4": 16, "res5": 32})]
        assert calls["pooler"] == [(["p2", "p3", "p4", "p5"], [4, 8, 16, 32], 24)]
        assert calls["rpn"] == [(24, ["p2", "p3", "p4", "p5", "p6"], ((32,), (64,), (128,), (256,), (512,)))]
        assert isinstance(model.neck, FPN) and model.neck.out_channels["p6"] == 24
    else:
        assert calls["pooler"] == [(["res5"], [16], 20)]
        assert calls["rpn"] == [(16, ["res4"], ((32, 64, 128, 256, 512),))]
    assert model.roi_heads.box_head.fc6.in_features == (24 if layout == "fpn" else 20) * 25
    assert model.rpn._post_nms_top_n["training"] == 16
    images, targets = images_and_targets()
    losses = model.train()(images, targets)
    assert torch.isfinite(sum(losses.values()))


def test_part_nodes_are_allowlisted_and_others_refused():
    assert {POOLER, NECK, RPN} <= allowed_targets()
    config = with_part_nodes(model_config("faster_rcnn_r18_fpn_cpu"))
    config["pooler"]["_target_"] = "tests.modeling.test_parts_nodes.RecordingPooler"
    with pytest.raises(CheckpointError, match=r"refused pooler._target_: _target_ 'tests.modeling"):
        build_model(config)


def test_builders_are_option_holders():
    """Making a builder draws no random numbers (so adding nodes keeps the init order)."""
    state = torch.get_rng_state()
    builders = RoIPoolerBuilder("mdeform", hidden_dim=8), FPNBuilder(8), RPNBuilder([[8]], [1.0])
    assert torch.equal(state, torch.get_rng_state())
    pooler, neck, rpn = builders
    assert pooler(["res5"], [32], 4).deform_pool is not None
    assert neck({"res4": 4, "res5": 6}, {"res4": 16, "res5": 32}).out_channels == {"p4": 8, "p5": 8, "p6": 8}
    assert rpn(4, ["res4"], ((1, 2),)).head.cls_logits.out_channels == 1
    with pytest.raises(ValueError, match="one group per RPN feature map"):
        rpn(4, ["p2", "p3"], ((1,), (2,)))
