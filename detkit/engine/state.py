"""Training state beyond the weights: RNG states, and writing / resuming a training checkpoint.

A training checkpoint (`save_training_state`) is a detkit checkpoint
(`detkit.engine.checkpoint`, docs/checkpoints.md) whose extra entries let a run continue
where it stopped:

    "optimizer", "scheduler": their state_dicts
    "grad_scaler": the fp16 GradScaler's state_dict, or None
    "iteration": completed iterations (the resumed run starts at this one)
    "rng": one `rng_state()` per rank (torch, CUDA, numpy, python), rank order
    "data": the data-stream description (seed, world_size, batch_size_per_process,
            aspect_grouping) and "next_iteration"

All of it is tensors, numbers, strings and lists, so it loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detkit.io import WriteError
from detkit.utils import comm as dist
from detkit.engine.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from detkit.utils.comm import unwrap_model

__all__ = ["seed_all", "rng_state", "set_rng_state", "save_training_state", "resume_training_state"]

logger = logging.getLogger("detkit.train")  # the training log's name (train.log lines show it)


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and lists (torch.load(weights_only=True) safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"algorithm": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save_training_state(path: Path, model: nn.Module, optimizer, scheduler, scaler, iteration: int,
                        data_state: dict, extra: dict) -> None:
    """Gather every rank's RNG state (collective: every rank calls it), then rank 0 writes the
    checkpoint atomically (`save_checkpoint`); a write that fails raises `WriteError` on every
    rank (rank 0's error, broadcast). `model` may be DDP-wrapped; `extra` holds the
    checkpoint's metadata (model_config, data_config, label_to_category_id, class_names)."""
    rng = dist.all_gather_object(rng_state())
    failure = None
    if dist.is_main_process():
        try:
            save_checkpoint(path, {
                "model": unwrap_model(model).state_dict(),
                **extra,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "iteration": int(iteration),
                "rng": rng,
                "data": {**data_state, "next_iteration": int(iteration)},
            })
        except WriteError as exc:
            failure = (exc.path, exc.reason, exc.kept, exc.errno)
    if dist.get_world_size() > 1:   # every rank learns whether rank 0's write failed, and stops with it
        failure = dist.broadcast_object(failure)
    if failure is not None:
        raise WriteError(*failure)


def resume_training_state(path: Path, model: nn.Module, optimizer, scheduler, scaler, data_state: dict) -> int:
    """Load the training state of `path` into the given objects; returns the iteration to start at.

    Warns when `data_state` differs from the saved one (the batches will differ), and reseeds
    when the checkpoint holds the RNG states of a different number of processes."""
    state = load_checkpoint(path)
    for key in ("model", "optimizer", "scheduler", "iteration"):
        if key not in state:
            raise ValueError(f"cannot resume from {path}: it holds no {key!r} (not a training checkpoint)")
    load_state_dict_strict(unwrap_model(model), state["model"], str(path))
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise ValueError(f"cannot resume from {path}: its optimizer state does not fit this model's "
                         f"parameter groups ({exc})") from None
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    saved_data = state.get("data") or {}
    changed = {k: (saved_data.get(k), v) for k, v in data_state.items() if saved_data.get(k) != v}
    if changed:
        logger.warning("the data stream differs from the interrupted run's (%s): the resumed run will not "
                       "see the batches an uninterrupted run would have seen",
                       ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
    rng = state.get("rng") or []
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(rng) == world:
        set_rng_state(rng[rank])
    else:
        logger.warning("checkpoint has RNG states of %d processes, this run has %d: reseeding", len(rng), world)
        seed_all(int(data_state["seed"]) + 1009 * int(state["iteration"]) + rank)
    return int(state["iteration"])
