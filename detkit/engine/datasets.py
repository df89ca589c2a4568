"""Datasets from a `data` config node (configs/data/*.yaml), for tools/train.py and tools/eval.py.

Two kinds:

- `kind: synthetic`: detkit's shapes dataset in `root` (a cache folder, `~` expanded),
  generated there first when missing or stale (`data.generator` holds the
  `detkit.data.SyntheticConfig` fields); splits "train" and "val".
- `kind: coco`: the COCO 2017 layout under `root` (root/train2017, root/val2017,
  root/annotations/instances_{train,val}2017.json); `train_split`/`val_split` name them.

Both give `detkit.data.CocoDetection` datasets resized by `ResizeShortestSide(min_size,
max_size)` (flipped with `flip_prob` in training). Problems with the data on disk raise
`DatasetError` (a ValueError) with a one-line message.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detkit.data import (CocoDetection, DatasetError, SyntheticConfig, build_transforms, coco_paths,
                         ensure_synthetic_dataset, synthetic_paths)
from detkit.engine import distributed as dist

__all__ = ["KINDS", "data_root", "synthetic_config", "prepare_data", "split_paths", "build_dataset"]

logger = logging.getLogger(__name__)

KINDS = ("synthetic", "coco")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _kind(data_cfg: Mapping[str, Any]) -> str:
    kind = data_cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"data.kind must be one of {list(KINDS)}; got {kind!r}")
    return kind


def data_root(data_cfg: Mapping[str, Any]) -> Path:
    """data.root with `~` expanded."""
    root = data_cfg.get("root")
    if not root:
        raise ValueError("data.root is empty: pass data.root=PATH")
    return Path(os.path.expanduser(str(root)))


def synthetic_config(data_cfg: Mapping[str, Any]) -> SyntheticConfig:
    """The `SyntheticConfig` of a synthetic data node (its `generator` fields)."""
    options = dict(_plain(data_cfg.get("generator")) or {})
    known = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown data.generator options {unknown}; known: {sorted(known)}")
    if isinstance(options.get("image_size"), list):
        options["image_size"] = tuple(options["image_size"])
    return SyntheticConfig(**options).normalized()


def prepare_data(data_cfg: Mapping[str, Any]) -> None:
    """Make the data available to every process before datasets are built.

    Synthetic: rank 0 generates the dataset if needed while the others wait at a
    barrier. COCO: checks that the root folder exists (the datasets check the rest).
    """
    kind = _kind(data_cfg)
    root = data_root(data_cfg)
    if kind == "synthetic":
        config = synthetic_config(data_cfg)
        if dist.is_main_process():
            logger.info("synthetic dataset in %s (generated first if missing or stale)", root)
            start = time.perf_counter()
            ensure_synthetic_dataset(root, config, verbose=False)  # returns at once when cached
            seconds = time.perf_counter() - start
            if seconds > 1.0:
                logger.info("generated the synthetic dataset (%d train / %d val images) in %s in %.1f s",
                            config.num_train, config.num_val, root, seconds)
        dist.barrier()
    elif not root.is_dir():
        raise DatasetError(f"COCO root folder not found: {root} (expected train2017/, val2017/ and "
                           f"annotations/instances_{{train,val}}2017.json under it)")


def split_paths(data_cfg: Mapping[str, Any], split: str) -> tuple[Path, Path]:
    """(image_dir, annotation_file) of split "train" or "val" of the configured dataset."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    root = data_root(data_cfg)
    if _kind(data_cfg) == "synthetic":
        return synthetic_paths(root, split)
    return coco_paths(root, str(data_cfg.get(f"{split}_split", f"{split}2017")))


def build_dataset(data_cfg: Mapping[str, Any], split: str, train: bool,
                  category_ids: Sequence[int] | None = None) -> CocoDetection:
    """The configured dataset's `split`, with training (resize + flip, images without
    boxes dropped) or test transforms (resize only, every image kept).

    `category_ids`: the category ids it must have (DatasetError otherwise).
    """
    image_dir, annotation_file = split_paths(data_cfg, split)
    transforms = build_transforms(train, min_size=_plain(data_cfg.get("min_size", 800)),
                                  max_size=int(data_cfg.get("max_size", 1333)),
                                  flip_prob=float(data_cfg.get("flip_prob", 0.5)))
    dataset = CocoDetection(image_dir, annotation_file, transforms,
                            remove_images_without_annotations=train, category_ids=category_ids)
    if len(dataset) == 0:
        raise DatasetError(f"the {split} split ({annotation_file}) has no usable images")
    return dataset


def data_config_for_checkpoint(data: DictConfig | Mapping[str, Any] | None,
                               checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The data config a tool reading a checkpoint works on, and a phrase saying where it came
    from: `data` (the tool's own `data=` choice) when given, else the checkpoint's stored
    data config (checked by load_checkpoint), else configs/data/synthetic.yaml."""
    if data is not None:
        config = _plain(data)
        return config, f"data={config.get('kind')}"
    if checkpoint.get("data_config"):
        return dict(checkpoint["data_config"]), "the checkpoint's data config"
    from detkit.cli import CONFIG_DIR

    default = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml"), resolve=True)
    return default, "the default synthetic data (the checkpoint stores no data config)"
