"""Batching: collate, aspect-ratio grouping, infinite seeded training stream, test sharding."""
from __future__ import annotations

import itertools
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from detkit.data.loader import (
    AspectRatioGroupedBatchSampler,
    InferenceSampler,
    InfiniteSampler,
    aspect_ratio_groups,
    build_test_loader,
    build_train_loader,
    collate_detection,
    targets_to_device,
)


def _ratios(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(r) for r in rng.choice([0.5, 0.75, 1.0, 1.33, 2.0], n)]


class FakeDetection(Dataset):
    """Image i is i+1 everywhere; its target records the augmentation draws made while loading."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.ratios = _ratios(n, seed)

    def __len__(self) -> int:
        return len(self.ratios)

    def aspect_ratios(self) -> list[float]:
        return list(self.ratios)

    def __getitem__(self, index: int):
        h = 4
        w = max(1, round(h * self.ratios[index]))
        draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
        return torch.full((3, h, w), float(index + 1)), {"index": index, "draws": draws,
                                                          "boxes": torch.zeros(0, 4), "image_id": index + 1}


def test_collate_keeps_lists():
    batch = [(torch.zeros(3, 2, 3), {"a": 1}), (torch.ones(3, 4, 1), {"a": 2})]
    images, targets = collate_detection(batch)
    assert isinstance(images, list) and [im.shape for im in images] == [(3, 2, 3), (3, 4, 1)]
    assert targets == [{"a": 1}, {"a": 2}]


def test_targets_to_device_moves_only_tensors():
    [t] = targets_to_device([{"boxes": torch.zeros(1, 4), "image_id": 3, "orig_size": (2, 3)}], "cpu")
    assert t["image_id"] == 3 and t["orig_size"] == (2, 3) and t["boxes"].device.type == "cpu"


def _check_grouped(batches, group_ids, batch_size):
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({group_ids[i] for i in b}) == 1, f"mixed batch {b}"


@pytest.mark.parametrize("n, batch_size", [(23, 4), (10, 3), (8, 8), (5, 1)])
def test_grouped_batches_cover_each_index_once(n, batch_size):
    ratios = _ratios(n, seed=n)
    groups = aspect_ratio_groups(ratios)
    sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(0))
    bs = AspectRatioGroupedBatchSampler(sampler, ratios, batch_size)
    batches = list(bs)
    _check_grouped(batches, groups, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert len(bs) == len(batches)
    # At most one partial batch per group: the leftovers at the end of the epoch.
    partial = [b for b in batches if len(b) < batch_size]
    assert len(partial) <= 2 and all(b in batches[-2:] for b in partial)

    dropped = AspectRatioGroupedBatchSampler(sampler, ratios, batch_size, drop_last=True)
    full = list(dropped)
    assert all(len(b) == batch_size for b in full) and len(dropped) == len(full)
    counts = Counter(groups)
    assert len(full) == sum(c // batch_size for c in counts.values())
    seen = [i for b in full for i in b]
    assert len(seen) == len(set(seen))


def test_grouping_keeps_sampler_order_within_groups():
    ratios = [2.0, 0.5, 2.0, 0.5, 0.5, 2.0, 2.0]
    batches = list(AspectRatioGroupedBatchSampler(SequentialSampler(ratios), ratios, 2))
    assert batches == [[0, 2], [1, 3], [5, 6], [4]]


def test_grouping_over_distributed_sampler():
    n, world, batch_size = 29, 2, 3
    ratios = _ratios(n, seed=1)
    groups = aspect_ratio_groups(ratios)
    seen = []
    orders = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
        bs = AspectRatioGroupedBatchSampler(sampler, ratios, batch_size)
        bs.set_epoch(0)
        epoch0 = list(bs)
        _check_grouped(epoch0, groups, batch_size)
        seen += [i for b in epoch0 for i in b]
        bs.set_epoch(1)
        orders.append((epoch0, list(bs)))
    # DistributedSampler pads to a multiple of the world size (one duplicate here); all covered.
    assert set(seen) == set(range(n)) and len(seen) == n + (-n % world)
    assert all(e0 != e1 for e0, e1 in orders)  # set_epoch reached the sampler


def test_infinite_sampler_epochs_and_shards():
    n = 7
    s = InfiniteSampler(n, seed=3)
    stream = list(itertools.islice(iter(s), 4 * n))
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n] or stream[n:2 * n] != stream[2 * n:3 * n]
    assert stream == list(itertools.islice(iter(InfiniteSampler(n, seed=3)), 4 * n))
    assert stream != list(itertools.islice(iter(InfiniteSampler(n, seed=4)), 4 * n))
    shards = [InfiniteSampler(n, seed=3, rank=r, world_size=3).epoch_indices(2) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert sorted(s.epoch_indices(2).tolist()) == list(range(n))


@pytest.mark.parametrize("size, world", [(10, 3), (2, 4), (9, 1), (0, 2)])
def test_inference_sampler_shards_are_disjoint_and_contiguous(size, world):
    shards = [list(InferenceSampler(size, r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(size))
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == [len(InferenceSampler(size, r, world)) for r in range(world)]


def _take(loader, k):
    out = []
    for images, targets in itertools.islice(iter(loader), k):
        out.append([(t["index"], t["draws"], float(im[0, 0, 0])) for im, t in zip(images, targets)])
    return out


def test_train_loader_is_endless_seeded_grouped_and_resumable():
    ds = FakeDetection(11)
    groups = aspect_ratio_groups(ds.ratios)
    loader = build_train_loader(ds, batch_size=3, num_workers=0, seed=7)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    run = _take(loader, 15)  # 45 samples: several epochs of 11
    assert random.getstate() == state[0]  # the caller's RNGs are left alone
    assert np.array_equal(np.random.get_state()[1], state[1]) and torch.equal(torch.get_rng_state(), state[2])
    for batch in run:
        assert len(batch) == 3 and len({groups[i] for i, _, _ in batch}) == 1
        assert all(value == i + 1 for i, _, value in batch)
    counts = Counter(i for batch in run for i, _, _ in batch)
    assert set(counts) == set(range(11)) and max(counts.values()) - min(counts.values()) <= 2
    # Same seed: same stream, augmentation draws included; another seed: another stream.
    assert _take(build_train_loader(ds, 3, 0, seed=7), 15) == run
    assert _take(build_train_loader(ds, 3, 0, seed=8), 15) != run
    # Every sample got its own draws.
    assert len({d for batch in run for _, d, _ in batch}) == 45
    # Resume: starting at iteration 9 gives the uninterrupted run's batches from 9 on.
    assert _take(build_train_loader(ds, 3, 0, seed=7, start_iter=9), 6) == run[9:]


def test_train_loader_workers_do_not_change_the_stream():
    ds = FakeDetection(9)
    ref = _take(build_train_loader(ds, 2, num_workers=0, seed=1, aspect_grouping=False), 6)
    assert _take(build_train_loader(ds, 2, num_workers=2, seed=1, aspect_grouping=False), 6) == ref
    assert [len(b) for b in ref] == [2] * 6


def test_distributed_flag_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        build_train_loader(FakeDetection(4), 2, distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        build_test_loader(FakeDetection(4), 2, distributed=True)


def test_test_loader_walks_once_in_order():
    ds = FakeDetection(7)
    batches = list(build_test_loader(ds, batch_size=3))
    assert [[t["index"] for t in targets] for _, targets in batches] == [[0, 1, 2], [3, 4, 5], [6]]
