"""Batching for detection: collate, aspect-ratio grouping, infinite training stream, test sharding.

Training counts iterations, not epochs. `build_train_loader` returns a
DataLoader whose iteration never ends:

- `InfiniteSampler` yields epoch after epoch of a permutation of the dataset,
  epoch e shuffled by a generator seeded with (seed, e); with several
  processes every rank takes the same permutation's slice `perm[rank::world]`,
  so ranks see disjoint images within an epoch (their shard sizes may differ by
  one; nothing is padded or repeated).
- batches are formed by `AspectRatioGroupedBatchSampler` (each batch all wide
  or all tall images, so padding to a common size wastes little; the buckets
  carry over from one epoch into the next) or in order without grouping.
- every sample gets its own seed derived from (seed, rank, iteration, position
  in the batch); Python's `random`, numpy's global RNG and torch's CPU RNG are
  seeded with it while the sample is loaded (and restored afterwards), so
  augmentations do not depend on the number of workers.
- resuming at iteration N (`start_iter=N`) replays the index stream without
  loading anything and drops its first N batches, so the resumed run sees
  exactly the batches, augmentations included, that an uninterrupted run would
  have seen from iteration N on (same seed, batch size and world size).

`build_test_loader` walks the dataset once in order; with several processes
rank r gets the r-th contiguous block (`InferenceSampler`), blocks are disjoint
and cover the dataset exactly, without padding duplicates, so gathering the
ranks' predictions gives every image once.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = [
    "collate_detection",
    "aspect_ratio_groups",
    "AspectRatioGroupedBatchSampler",
    "InfiniteSampler",
    "InferenceSampler",
    "build_train_loader",
    "build_test_loader",
    "targets_to_device",
]


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]
                      ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]); images keep their own sizes."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets


def targets_to_device(targets: Sequence[dict[str, Any]], device: torch.device | str,
                      non_blocking: bool = False) -> list[dict[str, Any]]:
    """Copies of the targets with their tensors moved to `device` (other values kept as they are)."""
    return [{k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
             for k, v in t.items()} for t in targets]


def aspect_ratio_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """Group id per image from width/height: 0 for wide (or square, ratio >= 1), 1 for tall."""
    return [0 if r >= 1.0 else 1 for r in aspect_ratios]


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices from `sampler`, each batch from one aspect group.

    Indices are taken in the sampler's order and put into the bucket of their
    group (wide: width >= height, or tall); a bucket is emitted as a batch as
    soon as it is full. When a finite sampler is exhausted, the partly filled
    buckets are emitted as smaller batches (still one group each; group 0
    first), unless `drop_last`, which drops them. So with drop_last=False every
    index the sampler yields appears in exactly one batch per epoch.

    Works over any sampler of indices, including
    `torch.utils.data.distributed.DistributedSampler` (`set_epoch` is
    forwarded) and the infinite `InfiniteSampler` (then it never ends and has
    no length).

    Args:
        sampler: yields dataset indices.
        aspect_ratios: width / height of every dataset item (index -> ratio).
        batch_size: images per batch.
        drop_last: drop the incomplete batches left at the end of an epoch.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], aspect_ratios: Sequence[float],
                 batch_size: int, drop_last: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        self.sampler = sampler
        self.group_ids = aspect_ratio_groups(aspect_ratios)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        if not self.drop_last:
            for group in sorted(buckets):
                if buckets[group]:
                    yield buckets[group][:]

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for index in self.sampler:  # needs a finite sampler; indices only, cheap
            counts[self.group_ids[index]] = counts.get(self.group_ids[index], 0) + 1
        if self.drop_last:
            return sum(n // self.batch_size for n in counts.values())
        return sum(-(-n // self.batch_size) for n in counts.values())


class InfiniteSampler(Sampler[int]):
    """Endless stream of dataset indices: epoch after epoch of a seeded permutation.

    Epoch e is `numpy.random.default_rng([seed, e]).permutation(size)` (or
    0..size-1 without shuffle); this rank yields its slice `perm[rank::world_size]`.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if size <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices in epoch `epoch`."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.size)
        else:
            order = np.arange(self.size)
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        for epoch in itertools.count():
            yield from self.epoch_indices(epoch).tolist()


class InferenceSampler(Sampler[int]):
    """Rank r's contiguous block of 0..size-1: blocks are disjoint, sizes differ by at most one."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        base, extra = divmod(int(size), int(world_size))
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _sample_seed(seed: int, rank: int, iteration: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, rank, iteration, position]).generate_state(1)[0])


class _SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps an (infinite) batch sampler: skips `start_iter` batches, tags each index with a seed."""

    def __init__(self, batch_sampler, seed: int, rank: int, start_iter: int = 0) -> None:
        self.batch_sampler, self.seed, self.rank = batch_sampler, int(seed), int(rank)
        self.start_iter = int(start_iter)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = itertools.islice(iter(self.batch_sampler), self.start_iter, None)
        for iteration, batch in enumerate(batches, start=self.start_iter):
            yield [(index, _sample_seed(self.seed, self.rank, iteration, j)) for j, index in enumerate(batch)]


class _SeededDataset(Dataset):
    """dataset[(index, seed)]: dataset[index] with random, numpy and torch (CPU) RNGs seeded by `seed`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        torch_state = torch.random.default_generator.get_state()
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.random.default_generator.set_state(torch_state)


def build_train_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0,
                       distributed: bool = False, aspect_grouping: bool = True, start_iter: int = 0,
                       aspect_ratios: Sequence[float] | None = None, pin_memory: bool = False) -> DataLoader:
    """An endless, seeded stream of (images, targets) batches for iteration-based training.

    Args:
        dataset: map-style dataset returning (image, target), e.g. CocoDetection.
        batch_size: images per batch on this process (per GPU).
        num_workers: DataLoader worker processes.
        seed: seeds the shuffling and every sample's augmentation.
        distributed: shard across the ranks of the initialised process group.
        aspect_grouping: batch wide and tall images separately; ratios come from
            `aspect_ratios` or the dataset's `aspect_ratios()` (without either,
            no grouping).
        start_iter: iteration to start at (resume): the first batch is the one
            an uninterrupted run would have used at iteration `start_iter`.
        pin_memory: passed to the DataLoader.

    Iterating the returned DataLoader never stops (it has no len()); each new
    iterator starts again at `start_iter`. See the module docstring for the
    epoch, seeding and resume conventions.
    """
    rank, world_size = _dist_info(distributed)
    sampler = InfiniteSampler(len(dataset), seed=seed, shuffle=True, rank=rank, world_size=world_size)
    if aspect_grouping and aspect_ratios is None and hasattr(dataset, "aspect_ratios"):
        aspect_ratios = dataset.aspect_ratios()
    if aspect_grouping and aspect_ratios is not None:
        if len(aspect_ratios) != len(dataset):
            raise ValueError(f"{len(aspect_ratios)} aspect ratios for a dataset of {len(dataset)}")
        batches = AspectRatioGroupedBatchSampler(sampler, aspect_ratios, batch_size)
    else:
        batches = BatchSampler(sampler, batch_size, drop_last=True)
    generator = torch.Generator().manual_seed(int(seed))  # worker base seeds; keeps the global RNG untouched
    return DataLoader(
        _SeededDataset(dataset),
        batch_sampler=_SeededBatchSampler(batches, seed, rank, start_iter),
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
        generator=generator,
    )


def build_test_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0,
                      distributed: bool = False, pin_memory: bool = False) -> DataLoader:
    """One ordered pass over the dataset (this rank's contiguous, disjoint block when distributed).

    Batches keep dataset order; the last one may be smaller. No image is
    repeated across ranks, so gathered predictions cover each image once.
    """
    rank, world_size = _dist_info(distributed)
    sampler = InferenceSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
    )
