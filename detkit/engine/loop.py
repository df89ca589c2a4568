"""The iteration loop: `Trainer` runs steps and calls its hooks (`Hook`, here; the training
run's own hooks are `detkit.engine.hooks`).

One step (`Trainer.run_step`):

    next batch -> to device -> forward (under autocast when amp) -> loss dict -> sum
    -> finite check of the losses (averaged over processes, so every rank agrees)
    -> zero_grad -> backward (through the GradScaler for fp16)
    -> finite check of the gradient norm (not for fp16: the scaler skips such steps)
    -> optional gradient-norm clipping -> optimizer.step -> scheduler.step

The step records what it did in `LoopState` (losses, learning rate, data and step
time) and hooks read it after each step. Nothing is logged or saved here: progress
lines, checkpoints and evaluations are hooks. A non-finite loss, gradient or weight
raises `TrainingDiverged` (logged as an error first) before anything is stepped.

The model's forward is `model(images, targets) -> {loss name: scalar tensor}` with
images a list of [3, H, W] tensors and targets a list of dicts of tensors (boxes in
(x1, y1, x2, y2) pixels, labels), as detkit's detectors take them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detkit.data.loader import targets_to_device
from detkit.utils import comm as dist

__all__ = ["TrainingDiverged", "Hook", "LoopState", "Trainer", "diverged"]

logger = logging.getLogger("detkit.train")


class TrainingDiverged(FloatingPointError):
    """The loss, the gradients or the weights became NaN or infinite; training stopped
    without stepping or saving the broken state."""


class Hook:
    """Base class of what `Trainer` calls around its steps, each method given the `LoopState`,
    every hook's method in list order; every method does nothing here:

        before_train(state)   once, before the first step (state.iteration == start_iter)
        after_step(state)     after every step; state holds that step's records
        after_train(state)    once, after the last step; not called when training raised

    The training run's hooks (logging, checkpoints, evaluation) are `detkit.engine.hooks`."""

    def before_train(self, state: LoopState) -> None:
        pass

    def after_step(self, state: LoopState) -> None:
        pass

    def after_train(self, state: LoopState) -> None:
        pass


@dataclass
class LoopState:
    """What the loop and the hooks know about the run, updated as it goes.

    Written by the step: `iteration` (completed iterations once the step is done; the
    step in progress is number `iteration`), `loss_names` / `loss_values` (this step's
    losses as floats, averaged over processes), `lr` (the learning rate the step used:
    the "default" parameter group's, without multipliers), `data_time` (seconds waiting
    for the batch), `iter_time` (seconds of the whole step, data included), `step_times`
    (iter_time - data_time of every step of this process).
    Written by hooks: `checkpoint_path` / `last_saved` (the last good checkpoint and its
    iteration, named when training diverges), `metrics` (the latest evaluation's metrics,
    None on ranks > 0), `evaluations` (how many ran) and `evaluated_at` (the iteration of
    the latest one).
    """
    start_iter: int
    max_iters: int
    iteration: int = 0
    loss_names: list[str] = field(default_factory=list)
    loss_values: list[float] = field(default_factory=list)
    lr: float = math.nan
    data_time: float = 0.0
    iter_time: float = 0.0
    step_times: list[float] = field(default_factory=list)
    checkpoint_path: Path | None = None
    last_saved: int | None = None
    metrics: dict[str, float] | None = None
    evaluations: int = 0
    evaluated_at: int | None = None


def diverged(state: LoopState, what: str) -> TrainingDiverged:
    """Log and return the error for "<what> not finite" at the current iteration, naming
    this step's losses and the checkpoint that is kept."""
    kept = (f"the last good checkpoint {state.checkpoint_path} (iteration {state.last_saved}) is kept"
            if state.last_saved is not None else "no checkpoint was written")
    detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(state.loss_names, state.loss_values))
    message = (f"{what} not finite at iteration {state.iteration} ({detail}); training stopped, {kept}. "
               f"Lower schedule.base_lr or set schedule.grad_clip")
    logger.error(message)
    return TrainingDiverged(message)


class Trainer:
    """Runs `run_step` from `start_iter` to `max_iters` and the hooks around it.

    model: the module to train (possibly DDP-wrapped), returning a loss dict.
    optimizer, scheduler: stepped once per iteration (the scheduler after the optimizer).
    data: an iterable of (images, targets) batches; one iterator is taken per `train` call.
    scaler: a GradScaler for fp16 (None otherwise); amp_dtype: the autocast dtype (on `device`'s
    type, CPU or CUDA) or None.
    grad_clip: max total gradient norm, or None. hooks: `Hook`s, called in list order.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data: Iterable,
                 device: torch.device | str, *, scaler: torch.amp.GradScaler | None = None,
                 amp_dtype: torch.dtype | None = None, grad_clip: float | None = None,
                 hooks: Sequence[Hook] = ()) -> None:
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.device, self.scaler, self.grad_clip, self.hooks = device, scaler, grad_clip, list(hooks)
        # On the device the batches go to: CPU autocast (bfloat16 or float16) is as real as CUDA's.
        self.autocast = (torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
                         if amp_dtype is not None else contextlib.nullcontext())
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world_size = dist.get_world_size()
        self.state = LoopState(0, 0)
        self._batches: Any = None

    def train(self, start_iter: int, max_iters: int) -> LoopState:
        """Hooks' before_train, then steps start_iter+1..max_iters each followed by the hooks'
        after_step, then the hooks' after_train (not reached when something raised)."""
        self.state = state = LoopState(start_iter=start_iter, max_iters=max_iters, iteration=start_iter)
        self.model.train()
        self._batches = iter(self.data)
        for hook in self.hooks:
            hook.before_train(state)
        while state.iteration < max_iters:
            self.run_step()
            for hook in self.hooks:
                hook.after_step(state)
        for hook in self.hooks:
            hook.after_train(state)
        return state

    def run_step(self) -> None:
        """One iteration (its order of operations keeps runs and resumes bit-exact)."""
        state = self.state
        state.iteration += 1
        start = time.perf_counter()
        images, targets = next(self._batches)
        state.data_time = time.perf_counter() - start
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = targets_to_device(targets, self.device, non_blocking=True)
        with self.autocast:
            loss_dict = self.model(images, targets)
        losses = sum(loss_dict.values())
        state.loss_names, state.loss_values = list(loss_dict), self._mean_over_processes(loss_dict)
        if not all(math.isfinite(v) for v in state.loss_values):
            raise diverged(state, "loss is")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self._scaled_backward_and_step(losses)
        else:
            self._backward_and_step(losses)
        state.lr = self.current_lr()
        self.scheduler.step()
        state.iter_time = time.perf_counter() - start
        state.step_times.append(state.iter_time - state.data_time)

    def current_lr(self) -> float:
        """The learning rate of the "default" parameter group (the first group when none has
        that name): the base rate without per-kind multipliers."""
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("name") == "default"), groups[0]["lr"])

    def _mean_over_processes(self, loss_dict: dict[str, torch.Tensor]) -> list[float]:
        """The losses as floats, averaged over the processes (the same list on every rank)."""
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.world_size
        return values.tolist()

    def _backward_and_step(self, losses: torch.Tensor) -> None:
        """float32/bf16: backward, refuse a non-finite gradient norm, clip, step."""
        losses.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads)  # the same on every rank (DDP averaged the grads)
        if not math.isfinite(float(total_norm)):
            raise diverged(self.state, "gradients are")
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, total_norm)
        self.optimizer.step()

    def _scaled_backward_and_step(self, losses: torch.Tensor) -> None:
        """fp16: inf/nan gradients are expected now and then; the scaler skips those steps."""
        self.scaler.scale(losses).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
