"""Datasets from a `data` config node (configs/data/*.yaml): the node builds a
`detkit.data.sources.DataSource` (`build_data_source`), which prepares the data and makes the
datasets.

`build_data_source(data_cfg)` builds the node through detkit's registry of config targets
(`_target_` looked up, never imported; `detkit.engine.stored_config.build_stored`), for a
run's own config and for the `data_config` stored in a checkpoint alike. A node without
`_target_`, as detkit stored them before data nodes had one (`kind: synthetic|coco`), gets
the class of its kind (`detkit.data.sources.KIND_TARGETS`).

The functions below it (`data_root`, `synthetic_config`, `prepare_data`, `split_paths`,
`build_dataset`) are the interface of before, kept for their callers: each builds the source
and asks it. Problems with the data on disk raise `DatasetError` (a ValueError) with a
one-line message.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detkit.data import CocoDetection, SyntheticConfig
from detkit.data.sources import KIND_TARGETS, DataSource, synthetic_generator_config

__all__ = ["KINDS", "build_data_source", "data_root", "synthetic_config", "prepare_data", "split_paths",
           "build_dataset", "data_config_for_checkpoint"]

KINDS = tuple(KIND_TARGETS)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_data_source(data_cfg: DictConfig | Mapping[str, Any], source: str = "the data config",
                      root: str = "data") -> DataSource:
    """The `DataSource` a data node describes (an OmegaConf node is resolved first). A node
    without `_target_` is mapped from its `kind`; a `defaults` key (a data yaml read with
    OmegaConf.load instead of composed) is ignored. Errors are one-line ValueErrors
    (CheckpointError naming `source` and the node for what the registry refuses)."""
    from detkit.engine.stored_config import build_stored

    config = dict(_plain(data_cfg) or {})
    config.pop("defaults", None)
    if "_target_" not in config:
        kind = config.get("kind")
        if kind not in KIND_TARGETS:
            raise ValueError(f"data.kind must be one of {list(KINDS)}; got {kind!r}")
        config = {"_target_": KIND_TARGETS[kind], **config}
    built = build_stored(config, source, root=root)
    if not isinstance(built, DataSource):
        raise ValueError(f"{source}: {config['_target_']} built a {type(built).__name__}, not a data source")
    return built


def data_root(data_cfg: Mapping[str, Any]) -> Path:
    """data.root with `~` expanded."""
    return build_data_source(data_cfg).root


def synthetic_config(data_cfg: Mapping[str, Any]) -> SyntheticConfig:
    """The `SyntheticConfig` of a synthetic data node (its `generator` fields)."""
    return synthetic_generator_config(data_cfg.get("generator"))


def prepare_data(data_cfg: Mapping[str, Any]) -> None:
    """`DataSource.prepare`: synthetic, rank 0 generates the dataset if needed while the others
    wait at a barrier; COCO, checks that the root folder exists (the datasets check the rest)."""
    build_data_source(data_cfg).prepare()


def split_paths(data_cfg: Mapping[str, Any], split: str) -> tuple[Path, Path]:
    """(image_dir, annotation_file) of split "train" or "val" of the configured dataset."""
    return build_data_source(data_cfg).split_paths(split)


def build_dataset(data_cfg: Mapping[str, Any], split: str, train: bool,
                  category_ids: Sequence[int] | None = None) -> CocoDetection:
    """The configured dataset's `split`, with training (resize + flip, images without
    boxes dropped) or test transforms (resize only, every image kept).

    `category_ids`: the category ids it must have (DatasetError otherwise).
    """
    return build_data_source(data_cfg).dataset(split, train, category_ids=category_ids)


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
    from detkit.cli import CONFIG_DIR

    default = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml"), resolve=True)
    default.pop("defaults", None)
    return default, "the default synthetic data (the checkpoint stores no data config)"
