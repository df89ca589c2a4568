"""Crafted checkpoints for the checkpoint-safety tests (tests/engine, tests/tools).

Each variant is a checkpoint of the tiny detector (tests/vis/builders.py) whose weights fit,
with one thing planted in a config. The payloads are live: given to Hydra's `instantiate`
(what `load_model` used to do), `marker_payload` creates its marker file
(test_checkpoint_safety.py checks that), and `load_inline_payload` would compile and load
C++ that writes the marker.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from detkit.engine.checkpoint import FORMAT, VERSION
from tests.vis.builders import build_tiny, tiny_config

LABELS = {1: 1, 2: 2}
NAMES = {1: "a", 2: "b"}


def marker_payload(marker: Path) -> dict[str, Any]:
    """`pathlib.Path(marker).touch()` as a Hydra node (not on Hydra's blocklist)."""
    return {"_target_": "pathlib.Path.touch", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}]}


def load_inline_payload(marker: Path) -> dict[str, Any]:
    """torch.utils.cpp_extension.load_inline of C++ whose static initializer writes `marker`."""
    source = ('#include <fstream>\n'
              f'static int planted = [] {{ std::ofstream("{marker}") << "ran"; return 0; }}();\n'
              'int crafted() { return planted; }\n')
    return {"_target_": "torch.utils.cpp_extension.load_inline", "name": "detkit_crafted_extension",
            "cpp_sources": [source], "functions": ["crafted"], "verbose": False}


@dataclass(frozen=True)
class Variant:
    name: str
    plant: Callable[[dict, Path], None]   # (checkpoint dict, marker) -> None, changes the dict in place
    key_path: str                          # the key path the one-line error must name
    names: str                             # and what it must name there (the target, the option ...)


def _top(state, marker):
    state["model_config"] = marker_payload(marker)


def _nested(state, marker):
    state["model_config"]["backbone"]["deform_blocks"] = {"res4": "all", "res5": [marker_payload(marker)]}


def _load_inline(state, marker):
    state["model_config"] = load_inline_payload(marker)


def _in_args(state, marker):
    backbone = state["model_config"]["backbone"]
    backbone.pop("weights")
    backbone["_args_"] = [marker_payload(marker)]       # build_resnet's first argument, `weights`


def _oc_env(state, marker):
    state["model_config"]["backbone"]["norm"] = "${oc.env:DETKIT_CRAFTED_NORM,bn}"


def _partial(state, marker):
    state["model_config"]["backbone"]["_partial_"] = True


def _data_target(state, marker):
    state["data_config"] = {"kind": "synthetic", "root": str(marker.parent / "data"),
                            "generator": {"num_train": 4, "seed": marker_payload(marker)}}


VARIANTS = {v.name: v for v in [
    Variant("target_top", _top, "model_config._target_", "'pathlib.Path.touch'"),
    Variant("target_nested_in_backbone", _nested, "model_config.backbone.deform_blocks.res5[0]._target_",
            "'pathlib.Path.touch'"),
    Variant("load_inline", _load_inline, "model_config._target_", "'torch.utils.cpp_extension.load_inline'"),
    Variant("target_in_args", _in_args, "model_config.backbone._args_[0]._target_", "'pathlib.Path.touch'"),
    Variant("oc_env_interpolation", _oc_env, "model_config.backbone.norm", "${oc.env:DETKIT_CRAFTED_NORM,bn}"),
    Variant("partial", _partial, "model_config.backbone._partial_", "_partial_"),
    Variant("data_config_target", _data_target, "data_config.generator.seed._target_", "'pathlib.Path.touch'"),
]}


def good_state() -> dict[str, Any]:
    """What a detkit run stores, for the tiny detector (weights that fit its config)."""
    model = build_tiny()
    return {"model": model.state_dict(), "model_config": tiny_config(), "label_to_category_id": dict(LABELS),
            "class_names": dict(NAMES), "iteration": 6}


def write_raw(path: Path, state: dict[str, Any]) -> Path:
    """`state` as a detkit checkpoint file, written the way a crafter would: plain torch.save
    (detkit's save_checkpoint refuses to write what loading would refuse)."""
    torch.save({"format": FORMAT, "version": VERSION, **state}, path)
    return path


def write_variant(path: Path, variant: Variant, marker: Path, state: dict[str, Any] | None = None) -> Path:
    state = copy.deepcopy(state if state is not None else good_state())
    variant.plant(state, marker)
    return write_raw(path, state)
