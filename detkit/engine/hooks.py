"""The training run's hooks (`detkit.engine.loop.Hook`, called by `detkit.engine.loop.Trainer`):
logging, checkpoints, evaluation.

A `Hook` has three methods, each given the loop's `LoopState`; the trainer calls every
hook's method in list order:

    before_train(state)   once, before the first step (state.iteration == start_iter)
    after_step(state)     after every step; state holds that step's records
    after_train(state)    once, after the last step; not called when training raised

`detkit.engine.trainer.train` uses, in this order (which is the order of their effects
within an iteration):

    MetricWriter   (rank 0) the progress line and TensorBoard train/* scalars
    CheckpointHook periodic and final checkpoints/last.pth, never of non-finite weights
    EvalHook       periodic evaluation, and the final one after training (detections.json)
    ...            extra hooks (e.g. detkit.vis.hooks: sampling pictures after evaluations)
    ResultsHook    (rank 0) metrics.json and train_stats.json, after the final evaluation
    StopOnSignal   preemption: after every step, on a stop signal, the checkpoint and a stop

Hooks that run collectives (checkpoints gather RNG states, evaluation gathers detections)
run on every rank.
"""
from __future__ import annotations

import datetime
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detkit.utils import comm as dist
from detkit.evaluation.evaluate import coco_stats_table, per_class_table
from detkit.io import WriteError, write_json
from detkit.engine.loop import Hook, LoopState, diverged
from detkit.engine.preemption import Interrupted, StopSignals, signal_name
from detkit.engine.state import save_training_state
from detkit.ops import offset_branch_parameters

__all__ = ["MetricWriter", "CheckpointHook", "EvalHook", "ResultsHook", "StopOnSignal", "TrainingRun", "train_stats",
           "kept_checkpoint"]

logger = logging.getLogger("detkit.train")


@dataclass(frozen=True)
class TrainingRun:
    """What `train(cfg, run_dir, extra_hooks=...)` gives an extra-hook factory
    (`extra_hooks(config, run) -> list[Hook]`, config: the run's config as plain data) to build
    its hooks from."""
    run_dir: Path
    model: nn.Module                  # the trained model, not DDP-wrapped
    val_set: Any                      # the evaluation dataset: val_set[i] -> (image [3, H, W], target)
    class_names: Mapping[int, str]    # model label -> category name
    writer: Any                       # rank 0's TensorBoard SummaryWriter; None on other ranks


def every(period: int | None, completed: int) -> bool:
    """Whether `completed` iterations is a multiple of `period` (never for 0 or None)."""
    return bool(period) and completed % int(period) == 0


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricWriter(Hook):
    """Every `period` iterations and at the last one: the averages over the iterations since
    the previous line (losses, their total, seconds per iteration and waiting for data) as
    one log line with the lr and ETA, and as TensorBoard scalars train/<loss>,
    train/total_loss, train/lr, train/time_per_iter, train/data_time (`writer`, or none)."""

    def __init__(self, period: int | None, writer: Any = None) -> None:
        self.period, self.writer = int(period or 0), writer
        self._reset()

    def _reset(self) -> None:
        self.window: dict[str, float] = {}
        self.count, self.time, self.data_time = 0, 0.0, 0.0

    def after_step(self, state: LoopState) -> None:
        for n, v in zip(state.loss_names, state.loss_values):
            self.window[n] = self.window.get(n, 0.0) + v
        self.count += 1
        self.time += state.iter_time
        self.data_time += state.data_time
        if every(self.period, state.iteration) or state.iteration == state.max_iters:
            self._write(state)
            self._reset()

    def _write(self, state: LoopState) -> None:
        completed, max_iters = state.iteration, state.max_iters
        avg = {n: v / self.count for n, v in self.window.items()}
        total = sum(avg.values())
        sec_per_iter, data_time = self.time / self.count, self.data_time / self.count
        logger.info("iter %d/%d  %s  total %.4f  lr %.5g  time %.3f s/it  data %.3f s  eta %s",
                    completed, max_iters, "  ".join(f"{n} {v:.4f}" for n, v in avg.items()), total, state.lr,
                    sec_per_iter, data_time, format_eta(sec_per_iter * (max_iters - completed)))
        if self.writer is None:
            return
        for n, v in avg.items():
            self.writer.add_scalar(f"train/{n}", v, completed)
        self.writer.add_scalar("train/total_loss", total, completed)
        self.writer.add_scalar("train/lr", state.lr, completed)
        self.writer.add_scalar("train/time_per_iter", sec_per_iter, completed)
        self.writer.add_scalar("train/data_time", data_time, completed)


class CheckpointHook(Hook):
    """Every `period` iterations and at the last one, the training state to `path`
    (`save_training_state`: atomic; collective, call on every rank). Raises
    TrainingDiverged instead when a trainable weight is not finite, so the last good
    checkpoint stays. Records `state.checkpoint_path` / `state.last_saved` (a resumed run's
    checkpoint counts as saved at start_iter)."""

    def __init__(self, path: Path, period: int | None, model: nn.Module, optimizer, scheduler, scaler=None,
                 data_state: dict | None = None, extra: dict | None = None) -> None:
        self.path, self.period, self.model = Path(path), period, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.data_state, self.extra = dict(data_state or {}), dict(extra or {})
        self.params = [p for p in model.parameters() if p.requires_grad]

    def before_train(self, state: LoopState) -> None:
        state.checkpoint_path = self.path
        if state.start_iter:  # resumed from this file
            state.last_saved = state.start_iter

    def after_step(self, state: LoopState) -> None:
        completed = state.iteration
        if not (every(self.period, completed) or completed == state.max_iters):
            return
        self.save(state)

    def save(self, state: LoopState) -> None:
        """The training state of iteration state.iteration to `path` (collective). A write that
        fails (disk full, unwritable folder) raises `WriteError` on every rank, saying which
        checkpoint is kept."""
        completed = state.iteration
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # never save a broken model
            raise diverged(state, "weights are")
        try:
            save_training_state(self.path, self.model, self.optimizer, self.scheduler, self.scaler, completed,
                                self.data_state, self.extra)
        except WriteError as exc:
            raise exc.with_kept(kept_checkpoint(state)) from None
        logger.info("saved checkpoint %s (iteration %d)", self.path, completed)
        state.last_saved = completed


def kept_checkpoint(state: LoopState) -> str:
    """What a run that stops now keeps: "the checkpoint of iteration N (PATH) is kept" or "no
    checkpoint was written"."""
    if state.last_saved is None or state.checkpoint_path is None:
        return "no checkpoint was written"
    return f"the checkpoint of iteration {state.last_saved} ({state.checkpoint_path}) is kept"


class StopOnSignal(Hook):
    """Preemption (`detkit.engine.preemption`): the last hook. From before_train to the last
    step the loop runs with the stop signals deferred; after every step (and its hooks) the
    processes agree whether any of them received one (an all_reduce of the signal number:
    every rank stops at the same iteration). Then the checkpoint of this iteration is written
    (once, by rank 0, unless the checkpoint hook has just written it and nothing ran since),
    every rank waits for it, one line (signal, iteration, path) is logged and `Interrupted`
    raised (the tools exit with status 4). The signals arriving meanwhile are ignored."""

    def __init__(self, signals: StopSignals, checkpoint: CheckpointHook) -> None:
        self.signals, self.checkpoint = signals, checkpoint
        self.deferred = False

    def before_train(self, state: LoopState) -> None:
        if state.iteration < state.max_iters:
            self._defer(True)

    def _defer(self, on: bool) -> None:
        if on and not self.deferred:
            self.signals.enter_deferred()
        elif not on and self.deferred:
            self.signals.leave_deferred()
        self.deferred = on

    def close(self) -> None:
        """Leave the deferred region (when training raised)."""
        self._defer(False)

    def agreed_signal(self) -> int:
        """The signal some process received (the largest number), 0 when none did."""
        signum = int(self.signals.received or 0)
        if dist.get_world_size() > 1:
            flag = torch.tensor([signum], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def after_step(self, state: LoopState) -> None:
        signum = self.agreed_signal()
        if signum:
            if state.last_saved != state.iteration or state.evaluated_at == state.iteration:
                self.checkpoint.save(state)
            dist.barrier()   # rank 0 has written it before any process exits
            name = signal_name(signum)
            message = (f"stopped by {name} at iteration {state.iteration} of {state.max_iters}: checkpoint "
                       f"{state.checkpoint_path} (iteration {state.iteration}) written; resume=true continues")
            self._defer(False)
            if dist.is_main_process():
                logger.warning("%s", message)
            raise Interrupted(signum, message if dist.is_main_process() else " ")
        if state.iteration >= state.max_iters:
            self._defer(False)    # the final evaluation stops at once on a signal


class EvalHook(Hook):
    """Evaluation every `period` iterations (not at the last one: the final evaluation after
    training covers it) and once after training, at iteration max(start_iter, max_iters).

    evaluate: `() -> (metrics or None, evaluator)`, collective (e.g. `evaluate_detector` on
    the val set): metrics {name: value} on rank 0, None elsewhere; the evaluator has
    `coco_eval` and `results()` (COCOEvaluator). With metrics: a log line with COCOeval's
    table and per-class AP, TensorBoard scalars eval/<name> (NaN skipped) to `writer`, and
    after the final evaluation the detections to `detections_path` (COCO results format).
    sync_model: when distributed, its buffers (BN statistics) are broadcast from rank 0
    first. Records state.metrics, state.evaluations and state.evaluated_at."""

    def __init__(self, period: int | None, evaluate: Callable[[], tuple[dict[str, float] | None, Any]], *,
                 num_images: int, writer: Any = None, detections_path: Path | None = None,
                 sync_model: nn.Module | None = None) -> None:
        self.period, self._evaluate, self.num_images = period, evaluate, num_images
        self.writer, self.detections_path, self.sync_model = writer, detections_path, sync_model

    def after_step(self, state: LoopState) -> None:
        if every(self.period, state.iteration) and state.iteration != state.max_iters:
            self.evaluate(state, state.iteration)

    def after_train(self, state: LoopState) -> None:
        self.evaluate(state, max(state.start_iter, state.max_iters), final=True)

    def evaluate(self, state: LoopState, completed: int, final: bool = False) -> dict[str, float] | None:
        if self.sync_model is not None and dist.get_world_size() > 1:
            for buffer in self.sync_model.buffers():  # DDP broadcasts them only at forward
                torch.distributed.broadcast(buffer, 0)
        start = time.perf_counter()
        metrics, evaluator = self._evaluate()
        if metrics is not None:
            logger.info("evaluation at iteration %d (%d images, %.1f s): box AP %.2f\n%s\nper-class AP:\n%s",
                        completed, self.num_images, time.perf_counter() - start, metrics["bbox/AP"],
                        coco_stats_table(evaluator), per_class_table(metrics))
            for key, value in metrics.items():
                if self.writer is not None and not math.isnan(value):
                    self.writer.add_scalar(f"eval/{key}", value, completed)
            if final and self.detections_path is not None:
                write_json(self.detections_path, evaluator.results(), indent=None)
        state.metrics, state.evaluations, state.evaluated_at = metrics, state.evaluations + 1, completed
        return metrics


def train_stats(model: nn.Module, step_times: list[float], world_size: int) -> dict[str, Any]:
    """Cost figures of a run for reports (train_stats.json): parameter counts (all, and
    the deformable layers' offset branches by kind) and the median seconds per training
    iteration with data loading excluded, over this process's iterations after the first
    10% (warm-up: allocator, oneDNN primitive caches). A resumed run times only the
    iterations after the resume."""
    offsets: dict[str, int] = {}
    for kind, _, param in offset_branch_parameters(model):
        offsets[kind] = offsets.get(kind, 0) + param.numel()
    timed = step_times[len(step_times) // 10:]
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "offset_parameters": offsets,
            "sec_per_iter": statistics.median(timed) if timed else None,
            "timed_iterations": len(timed),
            "threads": torch.get_num_threads(),
            "world_size": world_size}


class ResultsHook(Hook):
    """After training (and after the final evaluation, so place it after EvalHook and the
    hooks that react to evaluations), on rank 0: `run_dir`/metrics.json ({"iteration":
    max(start_iter, max_iters), **state.metrics}) and train_stats.json (`train_stats` of
    `model` over state.step_times)."""

    def __init__(self, run_dir: Path, model: nn.Module, world_size: int) -> None:
        self.run_dir, self.model, self.world_size = Path(run_dir), model, world_size

    def after_train(self, state: LoopState) -> None:
        if state.metrics is None:  # ranks > 0
            return
        final_iteration = max(state.start_iter, state.max_iters)
        write_json(self.run_dir / "metrics.json", {"iteration": final_iteration, **state.metrics})
        write_json(self.run_dir / "train_stats.json", train_stats(self.model, state.step_times, self.world_size))
        logger.info("wrote %s and detections.json (COCO results format)", self.run_dir / "metrics.json")
