"""Each part of the detector is configured one way: by the flat keys of `build_faster_rcnn`
(docs/models.md). The keys reach the parts they configure; the part nodes of before (pooler,
neck, rpn, box_head, box_predictor: a second spelling of the same keys) are refused in a
config with one line naming the key and the flat keys to use instead, and their builders are
no config targets."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from detkit.config.build import build_model
from detkit.config.registry import allowed_targets
from detkit.config.stored import CheckpointError
from detkit.modeling.build import build_faster_rcnn
from tests.modeling.test_detector import NUM_CLASSES, TinyBackbone, images_and_targets, tiny_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# key -> (the builder its node named, the flat keys the refusal must name)
REMOVED = {
    "pooler": ("detkit.modeling.heads.poolers.RoIPoolerBuilder",
               "pooler_kind, pooler_output_size, pooler_sampling_ratio, deform_gamma, deform_hidden_dim"),
    "neck": ("detkit.modeling.neck.fpn.FPNBuilder", "fpn_channels"),
    "rpn": ("detkit.modeling.heads.rpn.RPNBuilder", "anchor_sizes, aspect_ratios and rpn_options"),
    "box_head": ("detkit.modeling.heads.box_head.TwoMLPHeadBuilder", "representation_size"),
    "box_predictor": ("detkit.modeling.heads.box_head.FastRCNNPredictorBuilder", "representation_size"),
}


def cpu_model_config() -> dict:
    config = yaml.safe_load((CONFIGS / "model" / "faster_rcnn_r18_fpn_cpu.yaml").read_text())
    config["num_classes"] = NUM_CLASSES
    return config


@pytest.mark.parametrize("node", ["builder", "null"])
@pytest.mark.parametrize("key", sorted(REMOVED))
def test_a_removed_part_node_is_refused_naming_the_flat_keys(key, node):
    builder, flat_keys = REMOVED[key]
    config = {**cpu_model_config(), key: {"_target_": builder} if node == "builder" else None}
    expected = (rf"^f\.pth: refused model_config\.{key}: detkit\.modeling\.build\.build_faster_rcnn has no "
                rf"'{key}' option any more: .*{flat_keys}")
    with pytest.raises(CheckpointError, match=expected) as excinfo:
        build_model(config, "f.pth", root="model_config")
    assert "\n" not in str(excinfo.value)


def test_no_slot_and_no_target_for_a_part():
    """build_faster_rcnn takes no part node, and the registry lists none of their builders."""
    assert not set(REMOVED) & set(inspect.signature(build_faster_rcnn).parameters)
    assert not {builder for builder, _ in REMOVED.values()} & allowed_targets()
    with pytest.raises(TypeError, match="pooler"):
        build_faster_rcnn(TinyBackbone(), NUM_CLASSES, pooler=None)


@pytest.mark.parametrize("layout", ["fpn", "single_scale"])
def test_flat_keys_configure_the_parts(layout):
    fpn = layout == "fpn"
    anchor_sizes = [[16], [24], [48], [96], [192]] if fpn else [[16, 48]]
    model = tiny_model(layout, "mdeform", fpn_channels=24, pooler_output_size=5, pooler_sampling_ratio=3,
                       deform_gamma=0.2, deform_hidden_dim=12, representation_size=40, anchor_sizes=anchor_sizes,
                       aspect_ratios=[1.0, 2.0], rpn_options={"post_nms_top_n_train": 16, "nms_thresh": 0.6})
    channels = 24 if fpn else model.backbone.out_channels["res5"]
    if fpn:
        assert model.neck.out_channels == {f"p{level}": 24 for level in range(2, 7)}
    pooler = model.roi_heads.box_roi_pool
    assert (pooler.kind, pooler.in_channels, pooler.output_size, pooler.sampling_ratio, pooler.gamma) == (
        "mdeform", channels, 5, 3, 0.2)
    assert pooler.deform_pool.offset_branch[0].out_features == 12
    assert model.rpn.anchor_generator.sizes == tuple(tuple(sizes) for sizes in anchor_sizes)
    assert model.rpn.anchor_generator.aspect_ratios == ((1.0, 2.0),) * len(anchor_sizes)
    assert model.rpn._post_nms_top_n["training"] == 16 and model.rpn.nms_thresh == 0.6
    head, predictor = model.roi_heads.box_head, model.roi_heads.box_predictor
    assert (head.fc6.in_features, head.fc7.out_features) == (channels * 5 * 5, 40)
    assert (predictor.cls_score.in_features, predictor.cls_score.out_features) == (40, NUM_CLASSES)
    images, targets = images_and_targets()
    losses = model.train()(images, targets)
    assert torch.isfinite(sum(losses.values()))


def test_anchor_sizes_need_one_group_per_rpn_map():
    with pytest.raises(ValueError, match=r"anchor_sizes needs one group per RPN feature map \['p2', 'p3', 'p4', "
                                         r"'p5', 'p6'\], got \[\[32\], \[64\]\]"):
        build_faster_rcnn(TinyBackbone(), NUM_CLASSES, "fpn", anchor_sizes=[[32], [64]])


def test_a_training_config_giving_a_part_node_is_refused_before_any_work():
    from hydra import compose, initialize_config_dir

    from detkit.config.schemas import check_train_config, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["+model.neck.out_channels=16"])
    with pytest.raises(CheckpointError, match=r"^the model config: refused model\.neck: detkit\.modeling\.build\."
                                              r"build_faster_rcnn has no 'neck' option any more: the FPN neck is "
                                              r"configured by the model's flat key fpn_channels$"):
        check_train_config(cfg, world_size=1)
