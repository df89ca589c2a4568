"""Building from config nodes: the model (`build_model`), the data source (`build_data_source`)
and the optimizer with its LR schedule (`build_from_config`), every `_target_` looked up in
detkit's registry of config targets (`detkit.config.registry`), never imported by name
(`detkit.config.stored`), for a run's own config and for the configs stored in a checkpoint
alike. `build_model` and `build_data_source` take a node either as plain data or an OmegaConf
node, which they check first, or as a `CheckedConfig` that was checked already (a training
run's, `detkit.config.schemas.check_train_config`), which they build as it is.

A data node without `_target_`, as detkit stored them before data nodes had one
(`kind: synthetic|coco`), gets the class of its kind (`detkit.data.sources.KIND_TARGETS`).
The source prepares the data (`prepare()`) and makes the datasets (`dataset(split, train)`,
`split_paths(split)`). Problems with the data on disk raise `DatasetError` (a ValueError)
with a one-line message.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.config.compose import CONFIG_DIR
from detkit.config.stored import CheckedConfig, CheckpointError, build_partial, check_node
from detkit.data.sources import KIND_TARGETS, DataSource

__all__ = ["KINDS", "build_data_source", "data_config_for_checkpoint", "build_model", "build_from_config"]

KINDS = tuple(KIND_TARGETS)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_data_source(data_cfg: CheckedConfig | DictConfig | Mapping[str, Any], source: str = "the data config",
                      root: str = "data") -> DataSource:
    """The `DataSource` a data node describes. A node that is not a `CheckedConfig` is checked
    first (an OmegaConf node resolved before): without `_target_` it is mapped from its `kind`,
    and a `defaults` key (a data yaml read with OmegaConf.load instead of composed) is ignored.
    Errors are one-line ValueErrors (CheckpointError naming `source` and the node for what the
    registry refuses)."""
    if isinstance(data_cfg, CheckedConfig):
        checked = data_cfg
        if not isinstance(checked.tree, dict) or "_target_" not in checked.tree:
            raise ValueError(f"{checked.source}: {checked.root or 'data'} names no data source (_target_)")
    else:
        config = dict(_plain(data_cfg) or {})
        config.pop("defaults", None)
        if "_target_" not in config:
            kind = config.get("kind")
            if kind not in KIND_TARGETS:
                raise ValueError(f"data.kind must be one of {list(KINDS)}; got {kind!r}")
            config = {"_target_": KIND_TARGETS[kind], **config}
        checked = check_node(config, source, root=root)
    built = checked.build()
    if not isinstance(built, DataSource):
        raise ValueError(f"{checked.source}: {checked.tree['_target_']} built a {type(built).__name__}, "
                         f"not a data source")
    return built


def data_config_for_checkpoint(data: DictConfig | Mapping[str, Any] | None,
                               checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The data config a tool reading a checkpoint works on, and a phrase saying where it came
    from: `data` (the tool's own `data=` choice) when given, else the checkpoint's stored
    data config (checked by load_checkpoint), else configs/data/synthetic.yaml (its keys,
    without the defaults list)."""
    if data is not None:
        config = _plain(data)
        return config, f"the data= config ({config.get('kind')} data in {config.get('root')})"
    if checkpoint.get("data_config"):
        return dict(checkpoint["data_config"]), "the checkpoint's data config"
    default = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml"), resolve=True)
    default.pop("defaults", None)
    return default, "the default synthetic data (the checkpoint stores no data config)"


def build_model(model_config: CheckedConfig | DictConfig | Mapping[str, Any], source: str = "model config", *,
                root: str = "", allow_files: bool = True) -> nn.Module:
    """Build a model from its config node (a mapping with `_target_`).

    Only detkit's builders run: a node that is not a `CheckedConfig` is checked first
    (`check_stored_config`: every `_target_` at any depth must be a name of
    `detkit.config.registry.targets()`, no other Hydra options, no interpolations; an
    OmegaConf node, the caller's own config and never something read from a checkpoint, is
    resolved before), and the tree is built by looking the targets up in that registry, never
    by importing a name (`CheckedConfig.build`). `allow_files=False` also refuses builder
    arguments naming files (backbone.weights), as for configs read from checkpoints. `source`
    and `root` (the node's key path) name the config in errors; a `CheckedConfig` holds its
    own."""
    if isinstance(model_config, CheckedConfig):
        checked = model_config
        _check_model_shape(checked.tree, checked.source, checked.root)
    else:
        if isinstance(model_config, DictConfig):
            model_config = OmegaConf.to_container(model_config, resolve=True, throw_on_missing=True)
        _check_model_shape(model_config, source, root)
        checked = check_node(dict(model_config), source, root=root, allow_files=allow_files)
    model = checked.build()
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{checked.source}: {checked.tree['_target_']} built a {type(model).__name__}, "
                              f"not a model")
    return model


def _check_model_shape(node: Any, source: str, root: str) -> None:
    """A model config is a mapping with a `_target_`; anything else is a one-line CheckpointError."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise CheckpointError(f"{source}: refused {root or '<root>'}: a model config is a mapping with a "
                              f"_target_, got {type(node).__name__}")


def build_from_config(schedule_cfg: DictConfig | Mapping[str, Any], model: nn.Module,
                      source: str = "the schedule config", root: str = "schedule"
                      ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(optimizer, scheduler) of a schedule config node: its `optimizer` node called with
    `model`, its `scheduler` node with that optimizer (both `_partial_: true`, `_target_` in
    detkit's registry; module docstring). Errors are one-line ValueErrors naming the node.
    (A training run checks the two nodes with the rest of its config and builds them from
    there: `detkit.config.schemas.CheckedTrainConfig`.)"""
    if isinstance(schedule_cfg, DictConfig):
        schedule_cfg = OmegaConf.to_container(schedule_cfg, resolve=True, throw_on_missing=True)
    optimizer = build_partial(schedule_cfg.get("optimizer"), source, model, root=f"{root}.optimizer")
    scheduler = build_partial(schedule_cfg.get("scheduler"), source, optimizer, root=f"{root}.scheduler")
    return optimizer, scheduler
