"""The typed schemas of detkit.config.schemas: every shipped schedule and data config is typed
by its schema, an unknown key or a wrong type fails when the config is composed with a message
naming the key, and `check_train_config` keeps the ranges and cross-field rules."""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from detkit.config.compose import check_config
from detkit.config.schemas import (SCHEMA_GROUP, SCHEMAS, CocoDataConfig, DataConfig, ScheduleConfig,
                                  SyntheticDataConfig, TrainConfig, check_train_config, register_configs)
from detkit.data.synthetic_config import SyntheticConfig
from detkit.study.schemas import STUDY_SCHEMAS, AblateConfig, register_study_configs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SCHEDULES = sorted(str(p.relative_to(CONFIGS / "schedule"))[:-5] for p in (CONFIGS / "schedule").rglob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
TRAIN_SCHEMA_ENTRY = "  - /schema/train@_here_"
ABLATE_SCHEMA_DEFAULTS = "defaults:\n  - /schema/ablate@_here_\n  - _self_\n"

register_configs()  # what the CLI does before composing (the tests compose in-process)
register_study_configs()  # what the study's ablate tool does before composing configs/ablate.yaml


def composed(overrides: list[str], config_dir: Path = CONFIGS, name: str = "train"):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def scratch_configs(tmp_path_factory) -> Path:
    """configs/ with train.yaml's defaults list starting with the top-level schema (the entry the
    orchestrator adds to configs/train.yaml; kept if already there), ablate.yaml with its schema,
    and experiments with typos."""
    root = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(CONFIGS, root)
    train = root / "train.yaml"
    text = train.read_text()
    if TRAIN_SCHEMA_ENTRY not in text:
        assert "defaults:\n" in text
        text = text.replace("defaults:\n", f"defaults:\n{TRAIN_SCHEMA_ENTRY}\n", 1)
        train.write_text(text)
    ablate = root / "ablate.yaml"
    if "/schema/ablate@_here_" not in ablate.read_text():
        ablate.write_text(ABLATE_SCHEMA_DEFAULTS + ablate.read_text())
    typos = root / "experiment" / "typo"
    typos.mkdir()
    for name, body in {"schedule_key": "schedule:\n  max_iter: 5\n",
                       "schedule_type": "schedule:\n  warmup_iters: many\n",
                       "generator_key": "data:\n  generator:\n    num_trian: 5\n",
                       "generator_type": "data:\n  generator:\n    clutter: lots\n",
                       "top_key": "eval_perod: 5\n",
                       "top_type": "num_workers: two\n"}.items():
        (typos / f"{name}.yaml").write_text(f"# @package _global_\n{body}")
    return root


SCHEMA_ENTRY = re.compile(r"^\s*- /schema/\w+@_here_\b.*\n", re.M)


@pytest.fixture(scope="module")
def untyped_configs(tmp_path_factory) -> Path:
    """configs/ with every schema entry removed from the defaults lists: what the configs
    compose to without the schemas, an independent source for the values the typed ones give."""
    root = tmp_path_factory.mktemp("untyped") / "configs"
    shutil.copytree(CONFIGS, root)
    removed = 0
    for path in root.rglob("*.yaml"):
        text, count = SCHEMA_ENTRY.subn("", path.read_text())
        if count:
            path.write_text(text)
            removed += count
    assert removed >= 10  # train, ablate, every data and schedule config
    return root


def test_register_configs_is_idempotent():
    """The library's schemas and the study's, each stored once under its own name; the
    study's tool schema lives in the study (nothing in the library names it)."""
    register_configs()
    register_configs()
    register_study_configs()
    repo = ConfigStore.instance().repo[SCHEMA_GROUP]
    schemas = {**SCHEMAS, **STUDY_SCHEMAS}
    assert len(schemas) == len(SCHEMAS) + len(STUDY_SCHEMAS) and "ablate" not in SCHEMAS
    assert set(repo) == {f"{name}.yaml" for name in schemas}
    assert all(repo[f"{name}.yaml"].node._metadata.object_type is node for name, node in schemas.items())


def test_the_generator_schema_is_the_generators_own_options():
    """One definition: the data schemas type `generator` with the generator's SyntheticConfig."""
    hints = {cls: typing.get_type_hints(cls) for cls in (DataConfig, SyntheticDataConfig)}
    assert hints[DataConfig]["generator"] == typing.Optional[SyntheticConfig]
    assert hints[SyntheticDataConfig]["generator"] is SyntheticConfig


def test_schemas_load_without_torch():
    """The tools compose and check configs before torch loads: the schemas, the generator's
    options they use and the composition helpers import no torch (nor numpy)."""
    code = ("import sys, detkit.config.schemas, detkit.config.compose, detkit.data.synthetic_config; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_typed(name):
    cfg = composed([f"schedule={name}"])
    assert OmegaConf.get_type(cfg.schedule) is ScheduleConfig
    assert isinstance(cfg.schedule.base_lr, float) and isinstance(cfg.schedule.max_iters, int)
    assert cfg.schedule.optimizer.base_lr == cfg.schedule.base_lr   # the nodes follow the flat keys
    assert cfg.schedule.scheduler.steps == cfg.schedule.steps


@pytest.mark.parametrize("name", DATA)
def test_every_data_config_is_typed(name):
    cfg = composed([f"data={name}", "data.root=/data/x"])
    expected = CocoDataConfig if name == "coco" else SyntheticDataConfig
    assert OmegaConf.get_type(cfg.data) is expected
    assert cfg.data._target_ == expected._target_ and cfg.data.kind == expected.kind
    if expected is SyntheticDataConfig:
        assert OmegaConf.get_type(cfg.data.generator) is SyntheticConfig
        assert isinstance(cfg.data.generator.min_object_size, float)   # 16 in the yaml, a float field


@pytest.mark.parametrize("override, key", [
    ("schedule.max_iters=abc", "schedule.max_iters"),
    ("schedule.lr_mult.deform_conv=fast", "schedule.lr_mult.deform_conv"),
    ("schedule.steps=[1,x]", "schedule.steps"),
    ("schedule.max_iter=3", "schedule.max_iter"),
    ("data.generator.num_train=many", "data.generator.num_train"),
    ("data.generator.num_trian=3", "data.generator.num_trian"),
    ("data.aspect_grouping=sometimes", "data.aspect_grouping"),
])
def test_bad_overrides_fail_at_composition_naming_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)) as excinfo:
        check_config("train", [override])
    message = str(excinfo.value)
    assert "\n" not in message and key in message, message


@pytest.mark.parametrize("experiment, key, kind", [
    ("schedule_key", "schedule.max_iter", "not in 'ScheduleConfig'"),
    ("schedule_type", "schedule.warmup_iters", "could not be converted to Integer"),
    ("generator_key", "data.generator.num_trian", "not in 'SyntheticConfig'"),
    ("generator_type", "data.generator.clutter", "could not be converted to Float"),
    ("top_key", "eval_perod", "not in 'TrainConfig'"),
    ("top_type", "num_workers", "could not be converted to Integer"),
])
def test_bad_config_files_fail_at_composition_naming_the_key(scratch_configs, experiment, key, kind):
    with pytest.raises(Exception, match=re.escape(kind)) as excinfo:
        composed([f"experiment=typo/{experiment}"], scratch_configs)
    message = str(excinfo.value)
    assert f"full_key: {key}\n" in message + "\n" and kind in message, message


def test_top_level_schema_types_train_yaml(scratch_configs, untyped_configs):
    cfg = composed(["experiment=smoke", "+extra_key=1"], scratch_configs)   # '+' still adds keys
    assert OmegaConf.get_type(cfg) is TrainConfig and cfg.extra_key == 1
    assert list(cfg)[:len(dataclasses.fields(TrainConfig))] == [f.name for f in dataclasses.fields(TrainConfig)]
    # The composed values are those of the configs without any schema.
    untyped = composed(["experiment=smoke"], untyped_configs)
    assert OmegaConf.get_type(untyped) is dict and OmegaConf.get_type(untyped.schedule) is dict
    plain = OmegaConf.to_container(untyped, resolve=True)
    typed = OmegaConf.to_container(composed(["experiment=smoke"], scratch_configs), resolve=True)
    # The only additions: the generator keys the YAML leaves out, at SyntheticConfig's defaults.
    added = set(typed["data"]["generator"]) - set(plain["data"]["generator"])
    assert added and added <= {f.name for f in dataclasses.fields(SyntheticConfig)}
    for f in dataclasses.fields(SyntheticConfig):
        if f.name in added:
            plain["data"]["generator"][f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    assert typed == plain
    with pytest.raises(Exception, match="seed"):
        composed(["seed=zero"], scratch_configs)


def test_ablate_schema_types_ablate_yaml(scratch_configs, untyped_configs):
    typed = composed(["table=all", "seeds=[0,1]"], scratch_configs, name="ablate")
    assert OmegaConf.get_type(typed) is AblateConfig
    plain = composed(["table=all", "seeds=[0,1]"], untyped_configs, name="ablate")
    assert OmegaConf.get_type(plain) is dict
    assert OmegaConf.to_container(typed, resolve=True) == OmegaConf.to_container(plain, resolve=True)
    assert list(typed) == [f.name for f in dataclasses.fields(AblateConfig)]
    composed(["table=dcnv1_table1", "seeds=3", "threads_per_job=1"], scratch_configs, name="ablate")
    for override, key in (("jobs=two", "jobs"), ("threads_per_job=one", "threads_per_job")):
        with pytest.raises(Exception, match=f"override {key}="):
            composed(["table=all", override], scratch_configs, name="ablate")


# ---------------------------------------------------------------------------- check_train_config

@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed must be a number >= 0; got -1"),
    ("num_workers=-2", "num_workers must be a number >= 0"),
    ("eval_batch_size=0", "eval_batch_size must be a number >= 1"),
    ("log_period=-1", "log_period must be a number >= 0"),
    ("schedule.max_iters=0", "schedule.max_iters must be a number >= 1"),
    ("schedule.base_lr=-0.1", "schedule.base_lr must be a number >= 0"),
    ("schedule.grad_clip=-1", "schedule.grad_clip must be a number >= 0"),
    ("schedule.lr_mult.deform_conv=-1", "schedule.lr_mult.deform_conv must be a number >= 0"),
    ("model.num_classes=1", "model.num_classes must be a number >= 2"),
    ("amp=fp8", "amp must be null, bf16 or fp16"),
])
def test_ranges_the_types_cannot_express(override, message):
    cfg = composed([override])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_train_config(cfg, world_size=1)


def test_good_configs_and_cross_field_rules():
    check_train_config(composed([]), world_size=1)
    check_train_config(composed(["eval_period=null", "schedule.grad_clip=null", "amp=bf16"]), world_size=2)
    with pytest.raises(ValueError, match=r"schedule.batch_size \(4, .*multiple of the number of processes \(3\)"):
        check_train_config(composed([]), world_size=3)
    frozen = composed(["model=faster_rcnn_r50_fpn"])
    with pytest.raises(ValueError, match="model.backbone.weights is null"):
        check_train_config(frozen, world_size=1)
    check_train_config(composed(["model=faster_rcnn_r50_fpn", "model.backbone.weights=/w/r50.pth"]), world_size=1)
    check_train_config(composed(["model=faster_rcnn_r50_fpn", "resume=true"]), world_size=1)


def test_a_run_checks_its_config_once_and_converts_it_once(tmp_path, monkeypatch):
    """check_train_config turns the composed config into plain data once and checks each node
    that builds something once; the parts are built from that, neither checked nor converted
    again, and the checkpoints store the checked trees (the model's without its weights file)."""
    import torch

    from detkit.config import stored
    from detkit.engine import trainer

    checked, converted = [], []
    check, to_container = stored.check_stored_config, OmegaConf.to_container

    def counted_check(node, source, *, root="", allow_files=False):
        checked.append(root)
        return check(node, source, root=root, allow_files=allow_files)

    def counted_conversion(*args, **kwargs):
        converted.append(args[0])
        return to_container(*args, **kwargs)

    cfg = composed(["experiment=smoke", f"data.root={tmp_path}"])
    monkeypatch.setattr(stored, "check_stored_config", counted_check)
    monkeypatch.setattr(OmegaConf, "to_container", staticmethod(counted_conversion))
    run = check_train_config(cfg, world_size=1)
    parts = trainer.build_training_parts(run, torch.device("cpu"), rank=0, world=1)
    assert checked == ["data", "model", "schedule.optimizer", "schedule.scheduler"]
    assert converted == [cfg]
    assert parts.data_config == run.data.tree == run.plain["data"]
    assert parts.model_config == stored.without_files(run.model.tree)
    assert run.model.tree == run.plain["model"]


def test_a_preset_generator_composes_with_coco_and_is_still_typed():
    """experiment=smoke shrinks data.generator whatever the data choice; with data=coco the
    options are kept (typed) and unused, as before the data nodes had schemas."""
    cfg = composed(["experiment=smoke", "data=coco", "data.root=/data/coco"])
    assert OmegaConf.get_type(cfg.data) is CocoDataConfig and cfg.data.generator.num_train == 16
    assert composed(["data=coco", "data.root=/data/coco"]).data.generator is None
    with pytest.raises(ValueError, match="data.generator.num_train"):
        check_config("train", ["experiment=smoke", "data=coco", "data.root=/x", "data.generator.num_train=many"])
