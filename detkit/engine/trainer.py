"""The training loop behind tools/train.py: `train(cfg, run_dir)`.

One iteration: next batch -> losses (a dict) -> their sum -> finite check (on the
average over processes) -> backward -> optional gradient clipping -> SGD step ->
learning-rate schedule step. Around it: periodic progress lines and TensorBoard
scalars, periodic evaluation, periodic checkpoints, and a final checkpoint,
evaluation and `metrics.json`.

Run folder (`run_dir`, written by rank 0 only):

    train.log                  python logging of the run (Hydra's job log)
    .hydra/                    the composed config and overrides (Hydra)
    config.yaml                the resolved config
    events.out.tfevents.*      TensorBoard scalars
    checkpoints/last.pth       the latest checkpoint (atomic writes)
    metrics.json               final COCO box metrics (percent) + iteration
    train_stats.json           parameters and median seconds per iteration (`train_stats`)
    detections.json            the final evaluation's detections (COCO results format)

Resuming (`resume=true`, same run_dir): the checkpoint holds the model, optimizer,
scheduler and GradScaler states, the iteration, every rank's RNG states and the
data-stream position. The training stream is a pure function of (seed, rank,
world size, batch size, iteration) (`detkit.data.build_train_loader`: epoch
permutations seeded by (seed, epoch), per-sample augmentation seeds from (seed,
rank, iteration, position)), so restarting it at the saved iteration replays
exactly the batches an uninterrupted run would have seen. With the RNG states
restored (the RPN and RoI heads sample anchors/proposals with torch's global
generator), a resumed run on CPU ends bit-for-bit where an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import random
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.data import build_train_loader, targets_to_device
from detkit.engine import distributed as dist
from detkit.engine.distributed import resolve_device, unwrap_model
from detkit.engine.checkpoint import build_model, load_checkpoint, load_state_dict_strict, save_checkpoint
from detkit.engine.datasets import build_dataset, prepare_data
from detkit.engine.evaluate import coco_stats_table, evaluate_detector, per_class_table, write_json
from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.engine.stored_config import check_stored_config
from detkit.ops import offset_branch_parameters
from detkit.vis.draw import sampling_figure
from detkit.vis.sampling import deformable_conv_names

__all__ = ["train", "TrainingDiverged", "resolve_device", "checkpoint_model_config", "rng_state",
           "set_rng_state"]

logger = logging.getLogger("detkit.train")

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; training stopped without saving."""


# ------------------------------------------------------------------------------------ helpers

def checkpoint_model_config(model_cfg: DictConfig) -> dict[str, Any]:
    """The resolved model node as a plain dict, with backbone.weights (an ImageNet file
    only needed to initialise training) set to None so rebuilding needs no file. Checked as
    a checkpoint's config is when loaded (`check_stored_config`): a ValueError now, before
    training, if tools could not rebuild the model from it (a `_target_` that is not one of
    detkit's builders, a Hydra option such as `_partial_`)."""
    config = OmegaConf.to_container(model_cfg, resolve=True, throw_on_missing=True)
    backbone = config.get("backbone")
    if isinstance(backbone, dict) and "weights" in backbone:
        backbone["weights"] = None
    return check_stored_config(config, "the model config", root="model")


def seed_all(seed: int) -> None:
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


def _check_config(cfg: DictConfig, world_size: int) -> None:
    """Types and ranges of the keys the loop uses, before any work (one-line ValueErrors)."""
    def number(key: str, kind: type, minimum: float | None = None, optional: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None and optional:
            return
        wrong_type = not isinstance(value, int if kind is int else (int, float)) or isinstance(value, bool)
        if wrong_type:
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}"
                             f"{' or null' if optional else ''}; got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{key} must be >= {minimum}; got {value}")

    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be null, bf16 or fp16; got {cfg.amp!r}")
    number("model.num_classes", int, 2)
    number("seed", int, 0)
    number("num_workers", int, 0)
    number("eval_batch_size", int, 1)
    for key in ("eval_period", "checkpoint_period", "log_period"):  # 0 or null: only at the end
        number(key, int, 0, optional=True)
    for key in ("max_iters", "batch_size"):
        number(f"schedule.{key}", int, 1)
    number("schedule.warmup_iters", int, 0)
    for key in ("base_lr", "momentum", "weight_decay", "weight_decay_norm", "warmup_factor", "gamma"):
        number(f"schedule.{key}", float, 0)
    number("schedule.grad_clip", float, 0, optional=True)
    s = cfg.schedule
    if not all(isinstance(step, int) and not isinstance(step, bool) for step in s.steps):
        raise ValueError(f"schedule.steps must be a list of iterations; got {list(s.steps)}")
    for kind, mult in (s.lr_mult or {}).items():
        number(f"schedule.lr_mult.{kind}", float, 0)
    if int(s.batch_size) % world_size:
        raise ValueError(f"schedule.batch_size ({s.batch_size}, images per iteration over all processes) "
                         f"must be a multiple of the number of processes ({world_size})")
    backbone = cfg.model.get("backbone") or {}
    frozen = int(backbone.get("freeze_at", 0) or 0) > 0 or backbone.get("norm") == "frozen_bn"
    if frozen and not backbone.get("weights") and not cfg.resume:
        # Frozen layers (or frozen BN statistics) that were never trained: the run would
        # train a detector on random features without any error.
        raise ValueError(
            f"model.backbone freezes layers (freeze_at={backbone.get('freeze_at')}, norm="
            f"{backbone.get('norm')}) but model.backbone.weights is null, so they would stay random: pass "
            f"model.backbone.weights=/path/resnet{backbone.get('depth', 50)}.pth (torchvision ImageNet "
            f"checkpoint), or train from scratch with model.backbone.freeze_at=0 model.backbone.norm=bn")


def _every(period: int | None, completed: int) -> bool:
    return bool(period) and completed % int(period) == 0


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


# ------------------------------------------------------------------------------------ checkpoints

def _save(path: Path, model: nn.Module, optimizer, scheduler, scaler, iteration: int, data_state: dict,
          extra: dict) -> None:
    """Gather every rank's RNG state (collective), then rank 0 writes the checkpoint."""
    rng = dist.all_gather_object(rng_state())
    if not dist.is_main_process():
        return
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


def _resume(path: Path, model: nn.Module, optimizer, scheduler, scaler, data_state: dict) -> int:
    """Load the training state of `path` into the given objects; returns the iteration to start at."""
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


# ------------------------------------------------------------------------------------ training

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


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float] | None:
    """Train (and evaluate) as configured by the composed configs/train.yaml `cfg`,
    writing into `run_dir`. Returns the final metrics on rank 0, None on other ranks.

    Raises ValueError (DatasetError, CheckpointError) for problems a user can fix,
    before training starts, and TrainingDiverged if the loss becomes non-finite.
    """
    run_dir = Path(run_dir)
    dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    _check_config(cfg, world)
    device = resolve_device(cfg.device)
    amp_dtype = AMP_DTYPES[cfg.amp]
    if amp_dtype is not None and device.type != "cuda":
        raise ValueError(f"amp={cfg.amp} needs a CUDA device (device is {device}); use amp=null on CPU")
    sched = cfg.schedule
    max_iters = int(sched.max_iters)
    seed = int(cfg.seed)

    # ---- data: generated / validated before anything else, so that mistakes fail fast.
    prepare_data(cfg.data)
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False,
                            category_ids=list(train_set.label_to_category_id.values()))
    num_classes = int(cfg.model.num_classes)
    if train_set.num_classes != num_classes:
        raise ValueError(
            f"the dataset has {train_set.num_classes - 1} categories (model classes with background: "
            f"{train_set.num_classes}) but model.num_classes is {num_classes}; set data.num_classes="
            f"{train_set.num_classes} (model.num_classes follows it)")
    model_transform = cfg.model.get("transform_options") or {}
    if (model_transform.get("min_size") not in (None, cfg.data.min_size)
            or model_transform.get("max_size") not in (None, cfg.data.max_size)):
        logger.warning("the data transforms resize to min_size=%s/max_size=%s but the model resizes to %s/%s: "
                       "images are resized twice", cfg.data.min_size, cfg.data.max_size,
                       model_transform.get("min_size"), model_transform.get("max_size"))
    logger.info("data: %d training images, %d validation images, %d categories",
                len(train_set), len(val_set), num_classes - 1)

    # ---- model, optimizer, schedule
    seed_all(seed)
    model_config = checkpoint_model_config(cfg.model)  # what the checkpoints store, checked as tools load it
    data_config = check_stored_config(OmegaConf.to_container(cfg.data, resolve=True), "the data config", root="data")
    # The same builder (and checks) as the tools' load_model, with the weights file allowed.
    model = build_model(cfg.model, "the model config", root="model").to(device)
    if rank > 0:  # the same initial weights everywhere (DDP also broadcasts them), own sampling streams
        seed_all(seed + rank)
    optimizer = build_optimizer(model, float(sched.base_lr), float(sched.momentum), float(sched.weight_decay),
                                OmegaConf.to_container(sched.lr_mult) if sched.lr_mult else None,
                                weight_decay_norm=float(sched.weight_decay_norm))
    scheduler = build_scheduler(optimizer, int(sched.warmup_iters), float(sched.warmup_factor),
                                list(sched.steps), float(sched.gamma), max_iters)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, %.2fM parameters (%.2fM trainable); parameter groups: %s", type(model).__name__,
                n_params / 1e6, n_train / 1e6,
                ", ".join(f"{g['name']} ({len(g['params'])} tensors, lr {g['initial_lr']:.3g}, "
                          f"wd {g['weight_decay']:.3g})" for g in optimizer.param_groups))

    # ---- resume
    batch_per_process = int(sched.batch_size) // world
    aspect_grouping = bool(cfg.data.get("aspect_grouping", True))
    data_state = {"seed": seed, "world_size": world, "batch_size_per_process": batch_per_process,
                  "aspect_grouping": aspect_grouping}
    checkpoint_path = run_dir / "checkpoints" / "last.pth"
    start_iter = 0
    if cfg.resume:
        if checkpoint_path.is_file():
            start_iter = _resume(checkpoint_path, model, optimizer, scheduler, scaler, data_state)
            logger.info("resumed from %s at iteration %d", checkpoint_path, start_iter)
        else:
            logger.info("resume=true but %s does not exist: starting from iteration 0", checkpoint_path)
    elif checkpoint_path.exists():
        logger.warning("%s exists and will be overwritten (pass resume=true to continue that run)",
                       checkpoint_path)

    train_loader = build_train_loader(train_set, batch_per_process, num_workers=int(cfg.num_workers), seed=seed,
                                      distributed=world > 1, aspect_grouping=aspect_grouping,
                                      start_iter=start_iter, pin_memory=device.type == "cuda")
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir), purge_step=start_iter or None)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    extra = {"model_config": model_config,
             "label_to_category_id": dict(train_set.label_to_category_id),
             "class_names": {label: str(train_set.coco.cats[cat]["name"])
                             for label, cat in train_set.label_to_category_id.items()},
             "data_config": data_config}

    def save(completed: int) -> None:
        _save(checkpoint_path, train_model, optimizer, scheduler, scaler, completed, data_state, extra)
        logger.info("saved checkpoint %s (iteration %d)", checkpoint_path, completed)

    def evaluate(completed: int, final: bool = False) -> dict[str, float] | None:
        if world > 1:  # BN statistics of rank 0 everywhere (DDP broadcasts them only at forward)
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        start = time.perf_counter()
        metrics, evaluator = evaluate_detector(model, val_set, device, batch_size=int(cfg.eval_batch_size),
                                               num_workers=int(cfg.num_workers))
        if metrics is not None:
            logger.info("evaluation at iteration %d (%d images, %.1f s): box AP %.2f\n%s\nper-class AP:\n%s",
                        completed, len(val_set), time.perf_counter() - start, metrics["bbox/AP"],
                        coco_stats_table(evaluator), per_class_table(metrics))
            for key, value in metrics.items():
                if not math.isnan(value):
                    writer.add_scalar(f"eval/{key}", value, completed)
            if final:
                write_json(run_dir / "detections.json", evaluator.results(), indent=None)
            log_sampling_pictures(completed)
        return metrics

    def log_sampling_pictures(completed: int) -> None:
        """Where the deformable layers sample on a few fixed val images (TensorBoard images)."""
        count = min(int(cfg.tensorboard_sampling_images), len(val_set))
        if writer is None or count <= 0 or not deformable_conv_names(model):
            return
        for index in range(count):
            image, _ = val_set[index]
            try:
                picture = sampling_figure(model, image, class_names=extra["class_names"])
            except ValueError as exc:  # e.g. fewer stacked deformable layers than drawn
                logger.warning("no sampling picture: %s", exc)
                return
            writer.add_image(f"sampling/val_{index}", picture, completed, dataformats="HWC")

    # ---- the loop
    logger.info("training iterations %d..%d of %d: %d images per iteration (%d per process x %d), device %s%s",
                start_iter + 1, max_iters, max_iters, int(sched.batch_size), batch_per_process, world, device,
                f", amp {cfg.amp}" if amp_dtype else "")
    autocast = (torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    grad_clip = float(sched.grad_clip) if sched.grad_clip is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    log_period = int(cfg.log_period or 0)
    window: dict[str, float] = {}
    window_n, window_time, window_data = 0, 0.0, 0.0
    step_times: list[float] = []      # seconds per iteration in this process, data loading excluded
    train_model.train()
    data_iter = iter(train_loader)
    last_saved = start_iter if cfg.resume and start_iter else None
    for iteration in range(start_iter, max_iters):
        completed = iteration + 1
        t0 = time.perf_counter()
        images, targets = next(data_iter)
        t_data = time.perf_counter() - t0
        images = [image.to(device, non_blocking=True) for image in images]
        targets = targets_to_device(targets, device, non_blocking=True)
        with autocast:
            loss_dict = train_model(images, targets)
        losses = sum(loss_dict.values())
        names = list(loss_dict)
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        if world > 1:
            torch.distributed.all_reduce(values)
            values /= world
        values = values.tolist()

        def diverged(what: str) -> TrainingDiverged:
            kept = (f"the last good checkpoint {checkpoint_path} (iteration {last_saved}) is kept"
                    if last_saved is not None else "no checkpoint was written")
            detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values))
            message = (f"{what} not finite at iteration {completed} ({detail}); training stopped, {kept}. "
                       f"Lower schedule.base_lr or set schedule.grad_clip")
            logger.error(message)
            if writer is not None:
                writer.close()
            return TrainingDiverged(message)

        if not all(math.isfinite(v) for v in values):
            raise diverged("loss is")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: inf/nan gradients are expected now and then; the scaler skips those steps
            scaler.scale(losses).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            grads = [p.grad for p in params if p.grad is not None]
            total_norm = torch.nn.utils.get_total_norm(grads)  # the same on every rank (DDP averaged the grads)
            if not math.isfinite(float(total_norm)):
                raise diverged("gradients are")
            if grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total_norm)
            optimizer.step()
        lr = next((g["lr"] for g in optimizer.param_groups if g["name"] == "default"),
                  optimizer.param_groups[0]["lr"])  # the lr this iteration used (without multipliers)
        scheduler.step()
        t_iter = time.perf_counter() - t0
        step_times.append(t_iter - t_data)

        for n, v in zip(names, values):
            window[n] = window.get(n, 0.0) + v
        window_n += 1
        window_time += t_iter
        window_data += t_data
        if _every(log_period, completed) or completed == max_iters:
            avg = {n: v / window_n for n, v in window.items()}
            total = sum(avg.values())
            sec_per_iter, data_time = window_time / window_n, window_data / window_n
            if rank == 0:
                logger.info("iter %d/%d  %s  total %.4f  lr %.5g  time %.3f s/it  data %.3f s  eta %s",
                            completed, max_iters, "  ".join(f"{n} {v:.4f}" for n, v in avg.items()), total, lr,
                            sec_per_iter, data_time, _format_eta(sec_per_iter * (max_iters - completed)))
                for n, v in avg.items():
                    writer.add_scalar(f"train/{n}", v, completed)
                writer.add_scalar("train/total_loss", total, completed)
                writer.add_scalar("train/lr", lr, completed)
                writer.add_scalar("train/time_per_iter", sec_per_iter, completed)
                writer.add_scalar("train/data_time", data_time, completed)
            window, window_n, window_time, window_data = {}, 0, 0.0, 0.0

        if _every(cfg.checkpoint_period, completed) or completed == max_iters:
            if not all(bool(torch.isfinite(p).all()) for p in params):  # never save a broken model
                raise diverged("weights are")
            save(completed)
            last_saved = completed
        if _every(cfg.eval_period, completed) and completed != max_iters:
            evaluate(completed)

    # ---- final evaluation
    metrics = evaluate(max(start_iter, max_iters), final=True)
    if rank == 0:
        write_json(run_dir / "metrics.json", {"iteration": max(start_iter, max_iters), **metrics})
        write_json(run_dir / "train_stats.json", train_stats(model, step_times, world))
        logger.info("wrote %s and detections.json (COCO results format)", run_dir / "metrics.json")
        writer.close()
    return metrics
