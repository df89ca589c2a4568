"""Data nodes as `_target_` nodes (detkit.data.sources, detkit.config.build.build_data_source):
the shipped data configs build their source through the registry as Hydra would, a data
config of an older checkpoint (no `_target_`, `kind: ...`) still builds, the compatibility
functions of detkit.config.build answer as the source does, and refusals name the node."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.data.coco import DatasetError
from detkit.data.sources import CocoFolder, SyntheticShapes
from detkit.data.synthetic_config import SyntheticConfig
from detkit.engine.checkpoint import CheckpointError, load_checkpoint
from detkit.config.schemas import register_configs
from detkit.config.build import build_data_source, data_config_for_checkpoint
from tests.engine.crafted import good_state

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = {"num_train": 3, "num_val": 2, "image_size": 64, "max_objects": 3, "min_object_size": 12,
        "max_object_size": 30}

register_configs()  # what the CLI does before composing


def composed_data(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides)).data


def old_synthetic_config(root: Path) -> dict:
    """A data_config as detkit stored it before data nodes had `_target_`."""
    return {"kind": "synthetic", "root": str(root), "num_classes": 9, "generator": dict(TINY),
            "min_size": 64, "max_size": 96, "flip_prob": 0.5, "aspect_grouping": False}


@pytest.mark.parametrize("name, cls", [("synthetic", SyntheticShapes), ("synthetic_geometry", SyntheticShapes),
                                       ("coco", CocoFolder)])
def test_shipped_data_configs_build_their_source_as_hydra_does(name, cls):
    data = composed_data(f"data={name}", "data.root='~/somewhere'")
    ours = build_data_source(data)
    theirs = instantiate(data, _convert_="all")
    assert type(ours) is type(theirs) is cls and ours.kind == data.kind
    assert vars(ours) == vars(theirs)
    assert ours.root == Path.home() / "somewhere" and ours.num_classes == data.num_classes
    assert (ours.min_size, ours.max_size, ours.flip_prob) == (data.min_size, data.max_size, data.flip_prob)
    if cls is SyntheticShapes:
        assert ours.config == SyntheticConfig(**OmegaConf.to_container(data.generator)).normalized()


def test_old_checkpoint_data_config_builds_the_same_source(tmp_path):
    old = old_synthetic_config(tmp_path / "shapes")
    new = {"_target_": "detkit.data.sources.SyntheticShapes", **old}
    a, b = build_data_source(old), build_data_source(new)
    assert type(a) is SyntheticShapes and vars(a) == vars(b)
    coco = build_data_source({"kind": "coco", "root": str(tmp_path), "train_split": "train2017",
                              "val_split": "val2017", "min_size": 800, "max_size": 1333})
    assert type(coco) is CocoFolder
    with_preset = build_data_source({"kind": "coco", "root": str(tmp_path), "generator": {"num_train": 16}})
    assert vars(with_preset) == vars(build_data_source({"kind": "coco", "root": str(tmp_path)}))  # unused
    assert coco.split_paths("val") == (tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json")
    with pytest.raises(ValueError, match=r"data.kind must be one of \['synthetic', 'coco'\]; got 'voc'"):
        build_data_source({"kind": "voc", "root": str(tmp_path)})


def test_old_checkpoint_with_old_data_config_loads_and_its_data_builds(tmp_path):
    """A checkpoint written before data nodes had `_target_` loads, and a tool reading it
    (no `data=`) prepares and opens the data it names."""
    state = {**good_state(), "data_config": old_synthetic_config(tmp_path / "shapes")}
    torch.save({"format": "detkit-checkpoint", "version": 1, **state}, tmp_path / "old.pth")
    checkpoint = load_checkpoint(tmp_path / "old.pth")
    data_cfg, where = data_config_for_checkpoint(None, checkpoint)
    assert where == "the checkpoint's data config" and data_cfg["kind"] == "synthetic"
    source = build_data_source(data_cfg)
    source.prepare()
    val = source.dataset("val", train=False)
    assert len(val) == TINY["num_val"] and min(val[0][0].shape[-2:]) == 64


def test_raw_data_yaml_and_default_fallback_build(tmp_path):
    """A data yaml read with OmegaConf.load (not composed: its defaults list is still a key)
    builds the same source as the composed node; so does the tools' fallback config."""
    raw = OmegaConf.load(CONFIGS / "data" / "synthetic.yaml")
    assert "defaults" in raw
    raw.root = str(tmp_path)
    composed = build_data_source(composed_data(f"data.root={tmp_path}"))
    assert vars(build_data_source(raw)) == vars(composed)
    given, where = data_config_for_checkpoint(composed_data(f"data.root={tmp_path}"), {})
    assert where == f"the data= config (synthetic data in {tmp_path})"   # names the folder, not only the kind
    fallback, where = data_config_for_checkpoint(None, {})
    assert "defaults" not in fallback and where.startswith("the default synthetic data")
    assert type(build_data_source(fallback)) is SyntheticShapes


@pytest.mark.parametrize("config, message", [
    ({"_target_": "detkit.data.sources.SyntheticShapes", "kind": "coco", "root": "/x"},
     "kind 'coco' does not match SyntheticShapes"),
    ({"_target_": "detkit.data.sources.CocoFolder", "root": ""}, "data.root is empty"),
    ({"kind": "synthetic", "root": "/x", "generator": {"num_trian": 3}}, "num_trian"),
    ({"_target_": "detkit.data.sources.CocoFolder", "root": "/x", "test_split": "t"}, "test_split"),
])
def test_bad_data_configs_are_one_line_errors(config, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        build_data_source(config)
    assert "\n" not in str(excinfo.value)


def test_a_data_target_outside_the_registry_is_refused_unimported(tmp_path):
    with pytest.raises(CheckpointError, match=r"refused data._target_: _target_ 'os.system' is not a detkit builder"):
        build_data_source({"_target_": "os.system", "command": f"touch {tmp_path / 'marker'}"})
    assert not (tmp_path / "marker").exists()
    # A registered target that is no data source is refused after building (no side effects).
    with pytest.raises(ValueError, match="built a ResNet, not a data source"):
        build_data_source({"_target_": "detkit.modeling.build.build_resnet", "depth": 18, "width": 8})


def test_coco_source_checks_its_root(tmp_path):
    source = build_data_source(composed_data("data=coco", f"data.root={tmp_path / 'missing'}"))
    with pytest.raises(DatasetError, match="COCO root folder not found"):
        source.prepare()
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        source.split_paths("test")
