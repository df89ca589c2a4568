"""Data sources: what a `data` config node (configs/data/*.yaml) builds.

A data node names its class with `_target_` (looked up in detkit's registry of config
targets, `detkit.config.registry.targets`, never imported by name) and holds the class's
arguments:

    data:
      _target_: detkit.data.sources.SyntheticShapes
      kind: synthetic
      root: ~/.cache/detkit/synthetic_shapes
      num_classes: 9
      generator: {num_train: 2500, ...}       # detkit.data.synthetic_config.SyntheticConfig fields
      min_size: 192
      ...

Two sources, one class each (a new dataset is a new `DataSource` subclass, an entry in the
registry and a config file; nothing switches on a kind string):

- `SyntheticShapes`: detkit's shapes dataset in `root` (a cache folder, `~` expanded),
  generated there first when missing or stale; splits "train" and "val".
- `CocoFolder`: the COCO 2017 layout under `root` (root/train2017, root/val2017,
  root/annotations/instances_{train,val}2017.json); `train_split`/`val_split` name them.

Both give `detkit.data.coco.CocoDetection` datasets resized by `ResizeShortestSide(min_size,
max_size)` (flipped with `flip_prob` in training). Problems with the data on disk raise
`DatasetError` (a ValueError) with a one-line message.

`kind` ("synthetic" / "coco") stays a key of the node, as it was before `_target_`: tools
print it, and a data config stored by an older detkit (no `_target_`) is mapped from it to
its class (`KIND_TARGETS`, `detkit.config.build.build_data_source`).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from detkit.data.coco import CocoDetection, DatasetError, coco_paths
from detkit.data.synthetic import ensure_synthetic_dataset, synthetic_paths
from detkit.data.synthetic_config import SyntheticConfig
from detkit.data.transforms import build_transforms
from detkit.utils import comm as dist

__all__ = ["DataSource", "SyntheticShapes", "CocoFolder", "KIND_TARGETS", "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
# The class of each `kind` of a data config without `_target_` (written by detkit before data
# nodes had one): the `_target_` it gets.
KIND_TARGETS: Mapping[str, str] = {"synthetic": "detkit.data.sources.SyntheticShapes",
                                   "coco": "detkit.data.sources.CocoFolder"}


class DataSource:
    """A dataset with a train and a val split on disk, and the transforms of both.

    Args (the data node's keys; the defaults are those of a data config that lacks the key):
        root: folder of the dataset (`~` expanded).
        num_classes: classes including background the config declares (the trainer checks it
            against the dataset); None when unknown.
        min_size, max_size: `ResizeShortestSide` (min_size may be a list: one drawn per image
            in training, the largest in testing).
        flip_prob: horizontal flip probability in training.
        aspect_grouping: batch wide and tall images separately (read by the trainer).
        kind: the node's `kind` key; must be the class's own (`KIND`).
    """

    KIND: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None,
                 min_size: int | Sequence[int] = 800, max_size: int = 1333, flip_prob: float = 0.5,
                 aspect_grouping: bool = True, kind: str | None = None) -> None:
        if kind is not None and kind != self.KIND:
            raise ValueError(f"kind {kind!r} does not match {type(self).__name__} (kind {self.KIND!r})")
        if not root:
            raise ValueError("data.root is empty: pass data.root=PATH")
        self.root = Path(os.path.expanduser(str(root)))
        self.num_classes = None if num_classes is None else int(num_classes)
        self.min_size = min_size
        self.max_size, self.flip_prob = int(max_size), float(flip_prob)
        self.aspect_grouping = bool(aspect_grouping)

    @property
    def kind(self) -> str:
        return self.KIND

    def prepare(self) -> None:
        """Make the data available to every process before datasets are built (collective
        under torch.distributed: every process calls it)."""
        raise NotImplementedError

    def split_paths(self, split: str) -> tuple[Path, Path]:
        """(image_dir, annotation_file) of split "train" or "val"."""
        raise NotImplementedError

    def dataset(self, split: str, train: bool, category_ids: Sequence[int] | None = None) -> CocoDetection:
        """The `split`, with training (resize + flip, images without boxes dropped) or test
        transforms (resize only, every image kept). `category_ids`: the category ids it must
        have (DatasetError otherwise)."""
        image_dir, annotation_file = self.split_paths(split)
        transforms = build_transforms(train, min_size=self.min_size, max_size=self.max_size,
                                      flip_prob=self.flip_prob)
        dataset = CocoDetection(image_dir, annotation_file, transforms,
                                remove_images_without_annotations=train, category_ids=category_ids)
        if len(dataset) == 0:
            raise DatasetError(f"the {split} split ({annotation_file}) has no usable images")
        return dataset

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, num_classes={self.num_classes})"


class SyntheticShapes(DataSource):
    """detkit's synthetic shapes (`detkit.data.synthetic`), generated into `root` on first use
    and reused while its manifest matches `generator` (the `SyntheticConfig` fields; missing
    ones take SyntheticConfig's defaults). Other args: `DataSource`."""

    KIND = "synthetic"

    def __init__(self, root: str | os.PathLike, generator: Mapping[str, Any] | SyntheticConfig | None = None,
                 num_classes: int | None = None, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 flip_prob: float = 0.5, aspect_grouping: bool = True, kind: str | None = None) -> None:
        super().__init__(root, num_classes, min_size, max_size, flip_prob, aspect_grouping, kind)
        self.config = synthetic_generator_config(generator)

    def prepare(self) -> None:
        """Rank 0 generates the dataset if needed while the others wait at a barrier."""
        if dist.is_main_process():
            logger.info("synthetic dataset in %s (generated first if missing or stale)", self.root)
            start = time.perf_counter()
            ensure_synthetic_dataset(self.root, self.config, verbose=False)  # returns at once when cached
            seconds = time.perf_counter() - start
            if seconds > 1.0:
                logger.info("generated the synthetic dataset (%d train / %d val images) in %s in %.1f s",
                            self.config.num_train, self.config.num_val, self.root, seconds)
        dist.barrier()

    def split_paths(self, split: str) -> tuple[Path, Path]:
        self._check_split(split)
        return synthetic_paths(self.root, split)


class CocoFolder(DataSource):
    """COCO 2017 under `root`: `train_split`/`val_split` name the image folders (and
    annotations/instances_<split>.json). `generator` is accepted and unused: a preset that
    shrinks the synthetic data for any data choice (experiment=smoke sets data.generator)
    composes with data=coco too, as it did before data nodes were typed. Other args:
    `DataSource`."""

    KIND = "coco"

    def __init__(self, root: str | os.PathLike, train_split: str = "train2017", val_split: str = "val2017",
                 num_classes: int | None = None, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 flip_prob: float = 0.5, aspect_grouping: bool = True, kind: str | None = None,
                 generator: Mapping[str, Any] | None = None) -> None:
        super().__init__(root, num_classes, min_size, max_size, flip_prob, aspect_grouping, kind)
        self.splits = {"train": str(train_split), "val": str(val_split)}

    def prepare(self) -> None:
        """Checks that the root folder exists (the datasets check the rest)."""
        if not self.root.is_dir():
            raise DatasetError(f"COCO root folder not found: {self.root} (expected train2017/, val2017/ and "
                               f"annotations/instances_{{train,val}}2017.json under it)")

    def split_paths(self, split: str) -> tuple[Path, Path]:
        self._check_split(split)
        return coco_paths(self.root, self.splits[split])


def synthetic_generator_config(generator: Mapping[str, Any] | SyntheticConfig | None) -> SyntheticConfig:
    """The normalised `SyntheticConfig` of a data node's `generator` (a mapping of its fields,
    plain or OmegaConf; a list image_size becomes a tuple). A field SyntheticConfig does not
    have is a ValueError naming it (composed configs are checked by their schema before, see
    detkit.config.schemas; configs stored in checkpoints only here)."""
    if isinstance(generator, SyntheticConfig):
        return generator.normalized()
    if isinstance(generator, DictConfig):
        generator = OmegaConf.to_container(generator, resolve=True)
    if generator is not None and not isinstance(generator, Mapping):
        raise ValueError(f"data.generator must be a mapping of SyntheticConfig fields; got {generator!r}")
    options = dict(generator or {})
    if isinstance(options.get("image_size"), list):
        options["image_size"] = tuple(options["image_size"])
    try:
        config = SyntheticConfig(**options)
    except TypeError as exc:  # an unexpected keyword argument: the message names it
        raise ValueError(f"data.generator: {exc}") from None
    return config.normalized()
