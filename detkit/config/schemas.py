"""What detkit's configs must look like (the typed schemas) and the one check of a training
run's config (`check_train_config`: the rules types cannot express, and its nodes against the
registry of config targets, `detkit.config.registry`).

**The schemas** (`register_configs()`): dataclasses stored in Hydra's ConfigStore under the
group `schema`, which the yaml files pull in with a defaults-list entry (Hydra's "structured
config as schema" pattern), e.g. configs/schedule/synthetic_cpu.yaml:

    defaults:
      - /schema/schedule@_here_
      - _self_

so that an unknown key or a value of the wrong type fails when the config is composed,
naming the key. Entries: `schema/train` (`TrainConfig`, the top-level keys of
configs/train.yaml), `schema/schedule` (`ScheduleConfig`), `schema/synthetic_data` and
`schema/coco_data` (the data nodes: `SyntheticDataConfig`, whose `generator` is typed by the
generator's own options, `detkit.data.synthetic_config.SyntheticConfig`, and
`CocoDataConfig`, both on `DataConfig`, the keys every data node has), `schema/predict` and
`schema/predict_onnx` (`PredictConfig`, `PredictOnnxConfig`: configs/predict*.yaml). Every
program that composes detkit's configs calls `register_configs()` first (the CLI does; it is
idempotent). The study's tools keep their schemas in `detkit.study.schemas`, registered the
same way (`register_schemas`).

Importing this module imports neither torch nor detkit's model code (from the data package
only the torch-free `detkit.data.synthetic_config`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from detkit.config.stored import CheckedConfig, check_node, check_partial_node
from detkit.data.synthetic_config import SyntheticConfig

__all__ = ["register_configs", "check_train_config", "CheckedTrainConfig",
           "SCHEMA_GROUP", "SCHEMAS", "TrainConfig", "ScheduleConfig",
           "DataConfig", "SyntheticDataConfig", "CocoDataConfig", "PredictConfig", "PredictOnnxConfig",
           "register_schemas"]


# ------------------------------------------------------------------ the schemas
# Field order is the yaml files' key order (a schema's fields come first in the composed node).

@dataclass
class ScheduleConfig:
    """configs/schedule/*.yaml. `optimizer` and `scheduler` are `_partial_` nodes built with the
    model and the optimizer (`detkit.config.build.build_from_config`); they interpolate the
    flat keys above them, which are what users and experiments override."""

    max_iters: int = MISSING
    batch_size: int = MISSING            # images per iteration over all processes
    base_lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    weight_decay_norm: float = MISSING
    warmup_iters: int = MISSING
    warmup_factor: float = MISSING
    steps: List[int] = MISSING
    gamma: float = MISSING
    grad_clip: Optional[float] = MISSING
    lr_mult: Dict[str, float] = MISSING
    checkpoint_period: Optional[int] = MISSING
    eval_period: Optional[int] = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING


@dataclass
class DataConfig:
    """The keys of every data node (configs/data/*.yaml): the arguments of
    `detkit.data.sources.DataSource`, which every data source takes."""

    _target_: str = MISSING
    kind: str = MISSING
    root: str = MISSING
    num_classes: int = MISSING
    min_size: Any = MISSING              # an int, or a list (one drawn per training image)
    max_size: int = MISSING
    flip_prob: float = MISSING
    aspect_grouping: bool = MISSING
    # Typed on every data node so that a preset's generator options (experiment=smoke) are
    # still checked when the data is not synthetic (CocoFolder does not use them).
    generator: Optional[SyntheticConfig] = None


@dataclass
class SyntheticDataConfig(DataConfig):
    """configs/data/synthetic*.yaml: the arguments of `detkit.data.sources.SyntheticShapes`."""

    _target_: str = "detkit.data.sources.SyntheticShapes"
    kind: str = "synthetic"
    generator: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class CocoDataConfig(DataConfig):
    """configs/data/coco.yaml: the arguments of `detkit.data.sources.CocoFolder`."""

    _target_: str = "detkit.data.sources.CocoFolder"
    kind: str = "coco"
    train_split: str = MISSING
    val_split: str = MISSING


@dataclass
class TrainConfig:
    """configs/train.yaml's own keys; `model`, `data` and `schedule` are typed by their files."""

    model: Any = MISSING
    data: Any = MISSING
    schedule: Any = MISSING
    seed: int = MISSING
    device: str = MISSING
    resume: bool = MISSING
    amp: Optional[str] = MISSING
    eval_period: Optional[int] = MISSING
    checkpoint_period: Optional[int] = MISSING
    log_period: Optional[int] = MISSING
    num_workers: int = MISSING
    tensorboard_sampling_images: int = MISSING
    eval_batch_size: int = MISSING


@dataclass
class PredictConfig:
    """configs/predict.yaml (tools/predict.py)."""

    checkpoint: str = MISSING
    input: str = MISSING
    output: str = MISSING
    skip_unreadable: bool = MISSING
    device: str = MISSING
    batch_size: int = MISSING


@dataclass
class PredictOnnxConfig:
    """configs/predict_onnx.yaml (tools/predict_onnx.py)."""

    onnx: str = MISSING
    input: str = MISSING
    output: str = MISSING
    skip_unreadable: bool = MISSING
    threads: Optional[int] = MISSING


SCHEMA_GROUP = "schema"
SCHEMAS: Mapping[str, type] = MappingProxyType({
    "train": TrainConfig,
    "schedule": ScheduleConfig,
    "synthetic_data": SyntheticDataConfig,
    "coco_data": CocoDataConfig,
    "predict": PredictConfig,
    "predict_onnx": PredictOnnxConfig,
})


def register_configs() -> None:
    """Store the library's schemas (`SCHEMAS`) in Hydra's ConfigStore as `schema/<name>`
    (storing again replaces an entry with itself: calling this twice is harmless)."""
    register_schemas(SCHEMAS)


def register_schemas(schemas: Mapping[str, type]) -> None:
    """Store the dataclasses `schemas` ({name: schema}) in Hydra's ConfigStore as
    `schema/<name>`, for the defaults lists of the yaml files to name (the library's:
    `register_configs`; the study's tools register theirs, `detkit.study.schemas`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in schemas.items():
        store.store(group=SCHEMA_GROUP, name=name, node=node, provider="detkit")


# ------------------------------------------------------------------ the one check of a training run

AMP_CHOICES = (None, "bf16", "fp16")


@dataclass(frozen=True)
class CheckedTrainConfig:
    """A composed configs/train.yaml after `check_train_config`, what a training run works from:
    `plain`, the whole config resolved to plain data (dicts, lists, scalars), and its four
    nodes that build something, checked against the registry of config targets
    (`detkit.config.stored.CheckedConfig`, built without a second check): `data` (the data
    source; as checkpoints store it), `model` (with its backbone.weights file; a checkpoint
    stores `detkit.config.stored.without_files(model.tree)`), and the schedule's `optimizer`
    and `scheduler` (`_partial_` nodes, called with the model and the optimizer)."""

    plain: dict[str, Any]
    data: CheckedConfig
    model: CheckedConfig
    optimizer: CheckedConfig
    scheduler: CheckedConfig


def check_train_config(cfg: DictConfig, world_size: int) -> CheckedTrainConfig:
    """The one check of a composed configs/train.yaml, before any work, and its one conversion
    to plain data: the ranges and choices its schema's types cannot say and the rules across
    fields (one-line ValueErrors; types and unknown keys were checked when it was composed:
    `TrainConfig`, `ScheduleConfig`), then its data, model and schedule nodes against the
    registry of config targets (one-line `CheckpointError`s naming the node: "the data config",
    "the model config", "the schedule config"), in the order a run builds them. A config
    composed with its `hydra` node (`detkit.config.compose.check_config`'s) is checked without
    it, as the training job gets it."""
    body = cfg if "hydra" not in cfg else OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    plain = OmegaConf.to_container(body, resolve=True, throw_on_missing=True)
    _check_ranges(plain, world_size)
    _check_frozen_layers_have_weights(plain)
    schedule = plain["schedule"]
    return CheckedTrainConfig(
        plain,
        data=check_node(plain["data"], "the data config", root="data"),
        model=check_node(plain["model"], "the model config", root="model", allow_files=True),
        optimizer=check_partial_node(schedule.get("optimizer"), "the schedule config", root="schedule.optimizer"),
        scheduler=check_partial_node(schedule.get("scheduler"), "the schedule config", root="schedule.scheduler"))


def _select(plain: Mapping[str, Any], key: str) -> Any:
    """The value at the dotted `key` of `plain`, None where a part of it is missing."""
    node: Any = plain
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _check_ranges(plain: Mapping[str, Any], world_size: int) -> None:
    if plain.get("amp") not in AMP_CHOICES:
        raise ValueError(f"amp must be null, bf16 or fp16; got {plain.get('amp')!r}")
    minimum = {"model.num_classes": 2, "seed": 0, "num_workers": 0, "eval_batch_size": 1,
               "eval_period": 0, "checkpoint_period": 0, "log_period": 0,  # 0 or null: only at the end
               "schedule.max_iters": 1, "schedule.batch_size": 1, "schedule.warmup_iters": 0,
               "schedule.base_lr": 0, "schedule.momentum": 0, "schedule.weight_decay": 0,
               "schedule.weight_decay_norm": 0, "schedule.warmup_factor": 0, "schedule.gamma": 0,
               "schedule.grad_clip": 0}
    minimum.update({f"schedule.lr_mult.{kind}": 0 for kind in (plain["schedule"].get("lr_mult") or {})})
    for key, least in minimum.items():
        value = _select(plain, key)
        if value is None and key in ("eval_period", "checkpoint_period", "log_period", "schedule.grad_clip"):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{key} must be a number >= {least}; got {value!r}")
    batch_size = int(plain["schedule"]["batch_size"])
    if batch_size % world_size:
        raise ValueError(f"schedule.batch_size ({batch_size}, images per iteration over all processes) "
                         f"must be a multiple of the number of processes ({world_size})")


def _check_frozen_layers_have_weights(plain: Mapping[str, Any]) -> None:
    backbone = plain["model"].get("backbone") or {}
    frozen = int(backbone.get("freeze_at", 0) or 0) > 0 or backbone.get("norm") == "frozen_bn"
    if frozen and not backbone.get("weights") and not plain["resume"]:
        # Frozen layers (or frozen BN statistics) that were never trained: the run would
        # train a detector on random features without any error.
        raise ValueError(
            f"model.backbone freezes layers (freeze_at={backbone.get('freeze_at')}, norm="
            f"{backbone.get('norm')}) but model.backbone.weights is null, so they would stay random: pass "
            f"model.backbone.weights=/path/resnet{backbone.get('depth', 50)}.pth (torchvision ImageNet "
            f"checkpoint), or train from scratch with model.backbone.freeze_at=0 model.backbone.norm=bn")
