"""Loading a checkpoint runs no code from it (detkit.config.stored, load_model).

In-process and fast: every crafted variant is refused with a one-line CheckpointError naming
the key path and the target, before anything is imported or called (no marker file); the
payloads are live (Hydra's instantiate, the old loading path, runs them); good and old-format
checkpoints still load; the allowlist covers every shipped config and builds what Hydra does.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.config import registry as config_registry
from detkit.config import schemas as config_schemas
from detkit.config.build import build_model
from detkit.engine.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from detkit.config.stored import (MAX_DEPTH, build_stored, check_class_names, check_label_map, check_stored_config,
                                  without_files)
from tests.engine.crafted import VARIANTS, good_state, marker_payload, write_raw, write_variant
from tests.vis.builders import build_tiny, smooth_image, tiny_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def extensions_dir(tmp_path, monkeypatch):
    """A private torch extensions folder: were the load_inline payload ever run, it would
    compile there (and the test would see it), not into the user's cache."""
    folder = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(folder))
    return folder


def refused(excinfo, key_path: str, names: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert f"refused {key_path}: " in message and names in message, message
    return message


# ---------------------------------------------------------------------------- crafted checkpoints

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_crafted_checkpoint_is_refused_before_anything_runs(name, tmp_path, extensions_dir):
    variant = VARIANTS[name]
    marker = tmp_path / "marker"
    path = write_variant(tmp_path / f"{name}.pth", variant, marker)
    with pytest.raises(CheckpointError, match=r": refused ") as excinfo:
        load_model(path)
    message = refused(excinfo, variant.key_path, variant.names)
    assert message.startswith(f"{path}: refused ")
    with pytest.raises(CheckpointError, match=re.escape(message)):  # every reader, not only load_model
        load_checkpoint(path)
    assert not marker.exists()
    assert not extensions_dir.exists() or not any(extensions_dir.iterdir())


def test_the_payloads_are_live(tmp_path):
    """Control: what the crafted files plant does create the marker when Hydra instantiates
    it, as the old load_model did, so the refusals above are what keeps it from running."""
    marker = tmp_path / "marker"
    instantiate(OmegaConf.create(marker_payload(marker)), _convert_="all")
    assert marker.exists()
    marker.unlink()
    state = good_state()
    VARIANTS["target_nested_in_backbone"].plant(state, marker)
    # The marker is created, then build_resnet fails on what the payload left in deform_blocks.
    with pytest.raises(Exception, match=r"Error in call to target 'detkit\.modeling\.build\.build_resnet'"):
        instantiate(OmegaConf.create(state["model_config"]), _convert_="all")
    assert marker.exists()


def test_a_refused_target_is_not_even_imported(tmp_path, monkeypatch):
    """The target names a module on sys.path whose import writes a marker: refusing it must
    not import it (Hydra's lookup of the same name does, as the control shows)."""
    package = tmp_path / "detkit_crafted_probe"
    package.mkdir()
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(**kwargs):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"refused model_config\._target_: ") as excinfo:
        build_stored({"_target_": "detkit_crafted_probe.run", "x": 1}, "file.pth", root="model_config")
    refused(excinfo, "model_config._target_", "'detkit_crafted_probe.run'")
    with pytest.raises(CheckpointError, match=r"refused _target_: _target_ 'detkit_crafted_probe\.run' is not a detkit builder"):
        build_model({"_target_": "detkit_crafted_probe.run", "x": 1})
    assert not marker.exists() and "detkit_crafted_probe" not in sys.modules
    from hydra._internal.utils import _locate

    try:
        _locate("detkit_crafted_probe.run")  # control: a lookup by name imports the module
        assert marker.exists()
    finally:
        sys.modules.pop("detkit_crafted_probe", None)


@pytest.mark.parametrize("node, key_path, names", [
    ({"_target_": "pathlib.Path.touch", "_partial_": True}, "m._target_", "'pathlib.Path.touch'"),
    ({"_target_": "detkit.modeling.build.build_resnet", "_recursive_": False}, "m._recursive_", "_recursive_"),
    ({"_target_": "detkit.modeling.build.build_resnet", "_convert_": "none"}, "m._convert_", "_convert_"),
    ({"_target_": "detkit.modeling.build.build_resnet", "_set_": 1}, "m._set_", "_set_"),  # a later Hydra's key
    ({"a": {"_args_": [1]}}, "m.a._args_", "_args_ without _target_"),
    ({"_target_": "detkit.modeling.build.build_resnet", "_args_": "x"}, "m._args_", "_args_ must be a list"),
    ({"_target_": ["detkit.modeling.build.build_resnet"]}, "m._target_", "['detkit.modeling.build.build_resnet']"),
    ({"_target_": "detkit.modeling.build.build_resnet", "norm": "${now:%H}"}, "m.norm", "${now:%H}"),
    ({"x": ["ok", {"y": "a${oc.env:HOME}"}]}, "m.x[1].y", "${oc.env:HOME}"),
    ({"x": {"${oc.env:HOME}": 1}}, "m.x['${oc.env:HOME}']", "interpolation in a key"),
    ({"x": torch.zeros(2)}, "m.x", "Tensor"),
    ({"x": {1, 2}}, "m.x", "set"),
    ({"x": b"bytes"}, "m.x", "bytes"),
    ({"x": {(1, 2): 3}}, "m.x[(1, 2)]", "tuple key"),
    ({"_target_": "detkit.modeling.build.build_resnet", "weights": "/etc/hostname"}, "m.weights", "names a file"),
    ({"_target_": "detkit.modeling.build.build_resnet", "bad key": 1}, "m['bad key']", "cannot be an argument"),
])
def test_check_stored_config_refuses(node, key_path, names):
    with pytest.raises(CheckpointError, match=r"f\.pth: refused ") as excinfo:
        check_stored_config(node, "f.pth", root="m")
    refused(excinfo, key_path, names)


def test_deep_nesting_and_long_targets_stay_one_line():
    node: dict = {"leaf": 1}
    for _ in range(MAX_DEPTH + 5):
        node = {"a": node}
    with pytest.raises(CheckpointError, match="nested deeper than"):
        check_stored_config(node, "f.pth")
    with pytest.raises(CheckpointError, match=r"f\.pth: refused ") as excinfo:
        check_stored_config({"_target_": "x\n" * 10_000}, "f.pth")
    assert "\n" not in str(excinfo.value) and len(str(excinfo.value)) < 600


def test_other_checkpoint_entries_are_checked(tmp_path):
    state = good_state()
    cases = {
        "label_to_category_id": ({1: "1"}, "label_to_category_id[1]"),
        "class_names": ({1: torch.zeros(1)}, "class_names[1]"),
        "data_config": ({"kind": "synthetic", "root": "${oc.env:HOME}"}, "data_config.root"),
        "iteration": (torch.tensor(3), "iteration"),
    }
    for key, (value, key_path) in cases.items():
        path = write_raw(tmp_path / f"{key}.pth", {**state, key: value})
        with pytest.raises(CheckpointError, match=r": refused ") as excinfo:
            load_checkpoint(path)
        assert f"refused {key_path}" in str(excinfo.value), str(excinfo.value)
    write_raw(tmp_path / "weights.pth", {**state, "model": [1, 2]})
    with pytest.raises(CheckpointError, match="refused model: the weights"):
        load_model(tmp_path / "weights.pth")
    write_raw(tmp_path / "list.pth", {**state, "model_config": ["not", "a", "model"]})
    with pytest.raises(CheckpointError, match="a model config is a mapping with a _target_"):
        load_model(tmp_path / "list.pth")


@pytest.mark.parametrize("name", ["target_top", "oc_env_interpolation", "data_config_target"])
def test_save_checkpoint_refuses_what_loading_would_refuse(name, tmp_path):
    state = good_state()
    VARIANTS[name].plant(state, tmp_path / "marker")
    with pytest.raises(CheckpointError, match=re.escape(f"refused {VARIANTS[name].key_path}: ")):
        save_checkpoint(tmp_path / "out.pth", state)
    assert list(tmp_path.iterdir()) == []   # nothing written, no temporary file left


def test_class_mappings():
    assert check_label_map({1: 5, 2: 7}, "f", "m") == {1: 5, 2: 7}
    assert check_class_names(["a", "b"], "f", "n") == ["a", "b"]
    with pytest.raises(CheckpointError, match=r"f: refused m\[True\]: True: 1 is not an int -> int entry"):
        check_label_map({True: 1}, "f", "m")
    with pytest.raises(CheckpointError, match=r"f: refused m: a list, not a mapping of ints to ints"):
        check_label_map([1, 2], "f", "m")
    with pytest.raises(CheckpointError, match=r"f: refused n\[1\]: 3 is not a string"):
        check_class_names(["a", 3], "f", "n")


# ---------------------------------------------------------------------------- good checkpoints

def test_good_checkpoint_loads_and_predicts_the_same(tmp_path):
    model = build_tiny(seed=5)
    state = {**good_state(), "model": model.state_dict()}
    save_checkpoint(tmp_path / "good.pth", state)
    loaded, checkpoint = load_model(tmp_path / "good.pth")
    assert checkpoint["model_config"] == tiny_config()
    assert checkpoint["label_to_category_id"] == {1: 1, 2: 2} and checkpoint["class_names"] == {1: "a", 2: "b"}
    image = smooth_image(80, 100, seed=2)
    with torch.inference_mode():
        expected, got = model([image])[0], loaded([image])[0]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_old_detkit_checkpoint_layout_loads(tmp_path):
    """A file as tools/train.py and tools/import_torchvision.py wrote it before this check
    (plain torch.save of the same layout, the resolved data config of configs/data, the
    training state) still loads."""
    model = build_tiny(seed=1)
    data_config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / "synthetic.yaml"), resolve=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    old = {"format": "detkit-checkpoint", "version": 1, "model": model.state_dict(),
           "model_config": tiny_config(), "label_to_category_id": {1: 3, 2: 9}, "class_names": {1: "x", 2: "y"},
           "data_config": data_config, "optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 6},
           "grad_scaler": None, "iteration": 6, "rng": [{"torch": torch.get_rng_state()}],
           "data": {"seed": 0, "world_size": 1, "next_iteration": 6},
           "source": "torchvision fasterrcnn_resnet50_fpn weights from x.pth"}
    torch.save(old, tmp_path / "old.pth")
    loaded, checkpoint = load_model(tmp_path / "old.pth")
    assert checkpoint["data_config"] == data_config and checkpoint["iteration"] == 6
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_written_before_the_layer_kinds_loads_as_the_same_model(tmp_path):
    """A checkpoint whose backbone config names DCNv2 the old way (deform_modulated: true,
    deform_offset_groups: 2) loads into today's deform_kind: dcnv2, deform_groups: 2 model,
    the same weights and the same detections."""
    from detkit.config.registry import upgrade_config
    new_backbone = {"deform_blocks": {"res4": "all"}, "deform_kind": "dcnv2", "deform_groups": 2,
                    "deform_options": {}}
    model = build_tiny(seed=3, backbone=new_backbone)
    old_config = tiny_config(backbone={"deform_blocks": {"res4": "all"}})
    for key in ("deform_kind", "deform_groups", "deform_options"):
        old_config["backbone"].pop(key, None)
    old_config["backbone"].update(deform_modulated=True, deform_offset_groups=2)
    assert upgrade_config(old_config) == tiny_config(backbone=new_backbone)
    save_checkpoint(tmp_path / "old.pth", {**good_state(), "model": model.state_dict(), "model_config": old_config})
    loaded, checkpoint = load_model(tmp_path / "old.pth")
    assert checkpoint["model_config"]["backbone"]["deform_kind"] == "dcnv2"
    image = smooth_image(80, 100, seed=2)
    with torch.inference_mode():
        expected, got = model([image])[0], loaded([image])[0]
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # Old and new names together are not guessed at: the builder refuses the old one.
    both = {**old_config, "backbone": {**old_config["backbone"], "deform_kind": "dcnv2"}}
    assert upgrade_config(both) == both
    save_checkpoint(tmp_path / "both.pth", {**good_state(), "model": model.state_dict(), "model_config": both})
    with pytest.raises(Exception, match="deform_modulated"):
        load_model(tmp_path / "both.pth")


def test_the_model_config_is_checked_at_training_time():
    """The run's model node is checked as a checkpoint's is when loaded, before any work
    (`check_train_config`); the checkpoints store that checked tree without its weights file."""
    from hydra import compose, initialize_config_dir

    config_schemas.register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["model.backbone.weights=/somewhere/resnet18.pth"])
    run = config_schemas.check_train_config(cfg, world_size=1)
    assert run.model.tree["backbone"]["weights"] == "/somewhere/resnet18.pth"       # the run loads it
    stored = without_files(run.model.tree)
    assert stored["backbone"]["weights"] is None and stored["_target_"] == "detkit.modeling.build.build_faster_rcnn"
    assert check_stored_config(stored, "f.pth", root="model_config") == stored      # tools load it without files
    assert {k: v for k, v in stored.items() if k != "backbone"} == {
        k: v for k, v in run.model.tree.items() if k != "backbone"}
    cfg.model.backbone._target_ = "mypackage.MyBackbone"
    with pytest.raises(ValueError, match=r"^the model config: refused model\.backbone\._target_: _target_ "
                                         r"'mypackage.MyBackbone'"):
        config_schemas.check_train_config(cfg, world_size=1)


# ---------------------------------------------------------------------------- the allowlist

def shipped_targets() -> set[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_":
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in CONFIGS.rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return found


def test_every_shipped_target_is_allowed_and_nothing_more():
    targets = shipped_targets()
    assert targets, "no _target_ found under configs/"
    allowed = config_registry.allowed_targets()
    assert targets == allowed    # no target that no config names (a second spelling of a flat key)
    assert allowed == set(config_registry.targets())
    assert all(name.startswith("detkit.") for name in allowed)
    # One registry for every config: the model's builders, the data sources, the schedule's.
    assert {"detkit.modeling.build.build_faster_rcnn", "detkit.data.sources.SyntheticShapes",
            "detkit.data.sources.CocoFolder", "detkit.solver.optim.build_optimizer",
            "detkit.solver.optim.build_scheduler"} <= targets


def test_data_config_targets_are_checked_like_the_model_configs(tmp_path):
    """A data_config naming anything but a detkit data source, or with a Hydra option, is
    refused on loading; the data config a training run stores (the composed node, resolved)
    loads and rebuilds its source."""
    state = good_state()
    for data_config, key_path, names in [
        ({"_target_": "os.system", "command": "true"}, "data_config._target_", "'os.system'"),
        ({"_target_": "detkit.data.sources.SyntheticShapes", "_partial_": True, "root": "/x"},
         "data_config._partial_", "_partial_"),
        ({"_target_": "detkit.data.sources.CocoFolder", "_convert_": "all", "root": "/x"},
         "data_config._convert_", "_convert_"),
    ]:
        path = write_raw(tmp_path / "bad.pth", {**state, "data_config": data_config})
        with pytest.raises(CheckpointError, match=r": refused ") as excinfo:
            load_checkpoint(path)
        refused(excinfo, key_path, names)
    from hydra import compose, initialize_config_dir

    from detkit.data.sources import SyntheticShapes
    from detkit.config.build import build_data_source

    config_schemas.register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        data = compose("train", overrides=[f"data.root={tmp_path}"]).data
    stored = OmegaConf.to_container(data, resolve=True)
    save_checkpoint(tmp_path / "new.pth", {**state, "data_config": stored})
    loaded = load_checkpoint(tmp_path / "new.pth")["data_config"]
    assert loaded == stored and loaded["_target_"] == "detkit.data.sources.SyntheticShapes"
    source = build_data_source(loaded, str(tmp_path / "new.pth"), root="data_config")
    assert type(source) is SyntheticShapes and source.root == tmp_path


def test_each_allowed_name_is_the_import_path_of_its_builder():
    from hydra._internal.utils import _locate

    for name, builder in config_registry.targets().items():
        assert _locate(name) is builder, name


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_registry_builds_what_hydra_builds(name):
    """The same modules and, from the same seed, the same initial weights as Hydra's
    instantiate (the training path before), so training runs are unchanged."""
    config = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    config.num_classes = 4
    torch.manual_seed(0)
    ours = build_model(config)
    torch.manual_seed(0)
    theirs = instantiate(config, _convert_="all")
    assert repr(ours) == repr(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_reads_run_folders_without_resolving(tmp_path):
    """The ablation report reads run folders as plain data: an interpolation is refused, not resolved."""
    from detkit.study.report import collect_runs

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text('{"bbox/AP": 1.0}')
    (run / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  run:\n    dir: outputs/${now:%Y}\n  runtime:\n    choices:\n      experiment: smoke\n")
    (run / "config.yaml").write_text("seed: 3\n")
    [result] = collect_runs([run])
    assert (result.experiment, result.seed) == ("smoke", 3)
    (run / "config.yaml").write_text("seed: ${oc.env:DETKIT_SEED}\n")
    with pytest.raises(CheckpointError, match=r"config.yaml: refused seed: interpolation"):
        collect_runs([run])


def test_stored_config_module_does_not_import_torch():
    code = "import sys, detkit.config.stored; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_builder_errors_are_one_line_and_name_the_node():
    config = tiny_config()
    config["backbone"]["no_such_option"] = 1
    with pytest.raises(CheckpointError, match=r"f\.pth: cannot build model_config\.backbone") as excinfo:
        build_model(config, "f.pth", root="model_config")
    message = str(excinfo.value)
    assert message.startswith("f.pth: cannot build model_config.backbone with detkit.modeling.build.build_resnet: ")
    assert "no_such_option" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="layout must be one of"):
        build_model({**tiny_config(), "layout": "nope"})
