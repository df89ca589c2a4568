"""Training as tools/train.py runs it: `train(cfg, run_dir)`.

`train` checks the config once and converts it to plain data once
(`detkit.config.schemas.check_train_config` -> `CheckedTrainConfig`), builds the parts from
that (`build_training_parts`: data, model, optimizer, schedule), resumes, makes the hooks
and runs the loop (`detkit.engine.loop.Trainer`; one iteration: next batch -> losses (a
dict) -> their sum -> finite check (on the average over processes) -> backward -> optional
gradient clipping -> SGD step -> learning-rate schedule step). The hooks (`detkit.engine.hooks`),
in this order: progress lines and TensorBoard scalars, periodic checkpoints and the
final one, periodic evaluation; after the loop the final evaluation (detections.json),
the caller's `extra_hooks` (e.g. `detkit.vis.hooks.sampling_picture_hooks`), and
`metrics.json` / `train_stats.json`.

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
world size, batch size, iteration) (`detkit.data.loader.build_train_loader`: epoch
permutations seeded by (seed, epoch), per-sample augmentation seeds from (seed,
rank, iteration, position)), so restarting it at the saved iteration replays
exactly the batches an uninterrupted run would have seen. With the RNG states
restored (the RPN and RoI heads sample anchors/proposals with torch's global
generator), a resumed run on CPU ends bit-for-bit where an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.config.build import build_data_source, build_model
from detkit.config.schemas import CheckedTrainConfig, check_train_config
from detkit.config.stored import without_files
from detkit.data.loader import build_train_loader
from detkit.engine import preemption
from detkit.engine.hooks import (CheckpointHook, EvalHook, MetricWriter, ResultsHook, StopOnSignal, TrainingRun,
                                 kept_checkpoint, train_stats)
from detkit.engine.preemption import Interrupted, signal_name
from detkit.engine.loop import Hook, LoopState, Trainer, TrainingDiverged
from detkit.engine.state import resume_training_state, rng_state, seed_all, set_rng_state
from detkit.evaluation.evaluate import evaluate_detector
from detkit.io import WriteError, os_error_of, write_text
from detkit.utils import comm as dist
from detkit.utils.comm import resolve_device

__all__ = ["train", "TrainingDiverged", "TrainingParts", "build_training_parts", "resolve_device",
           "rng_state", "set_rng_state", "seed_all", "train_stats"]

logger = logging.getLogger("detkit.train")

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

# extra_hooks of train(): called with (the run's config as plain data, TrainingRun) once the
# parts are built.
HookFactory = Callable[[Mapping[str, Any], TrainingRun], Sequence[Hook]]


# ------------------------------------------------------------------------------------ parts

@dataclass
class TrainingParts:
    """What `build_training_parts` builds: the datasets, the model (on the device, not
    DDP-wrapped), optimizer, schedule, fp16 GradScaler (or None), the configs the
    checkpoints store and the data stream's description (`data_state`, checked on resume)."""
    train_set: Any
    val_set: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    data_state: dict[str, Any]

    def checkpoint_extra(self) -> dict[str, Any]:
        """The metadata every checkpoint of the run holds besides the training state."""
        return {"model_config": self.model_config,
                "label_to_category_id": dict(self.train_set.label_to_category_id),
                "class_names": self.class_names(),
                "data_config": self.data_config}

    def class_names(self) -> dict[int, str]:
        """Model label -> category name."""
        return {label: str(self.train_set.coco.cats[cat]["name"])
                for label, cat in self.train_set.label_to_category_id.items()}


def _build_datasets(run: CheckedTrainConfig) -> tuple[Any, Any]:
    """The training and validation sets of the run's data node, generated / validated before
    anything else, so that mistakes fail fast."""
    source = build_data_source(run.data)
    source.prepare()
    train_set = source.dataset("train", train=True)
    val_set = source.dataset("val", train=False,
                             category_ids=list(train_set.label_to_category_id.values()))
    model, data = run.plain["model"], run.plain["data"]
    num_classes = int(model["num_classes"])
    if train_set.num_classes != num_classes:
        raise ValueError(
            f"the dataset has {train_set.num_classes - 1} categories (model classes with background: "
            f"{train_set.num_classes}) but model.num_classes is {num_classes}; set data.num_classes="
            f"{train_set.num_classes} (model.num_classes follows it)")
    model_transform = model.get("transform_options") or {}
    if (model_transform.get("min_size") not in (None, data["min_size"])
            or model_transform.get("max_size") not in (None, data["max_size"])):
        logger.warning("the data transforms resize to min_size=%s/max_size=%s but the model resizes to %s/%s: "
                       "images are resized twice", data["min_size"], data["max_size"],
                       model_transform.get("min_size"), model_transform.get("max_size"))
    logger.info("data: %d training images, %d validation images, %d categories",
                len(train_set), len(val_set), num_classes - 1)
    return train_set, val_set


def build_training_parts(run: CheckedTrainConfig, device: torch.device, rank: int, world: int) -> TrainingParts:
    """Data, model, optimizer and schedule of the checked config `run` (`check_train_config`),
    built from its checked nodes without checking them again (seeds the global RNGs: the
    model's initial weights come from the seed on every rank, then rank r samples with
    seed + r)."""
    seed = int(run.plain["seed"])
    train_set, val_set = _build_datasets(run)

    seed_all(seed)
    model = build_model(run.model).to(device)   # the same builder as the tools' load_model
    if rank > 0:  # the same initial weights everywhere (DDP also broadcasts them), own sampling streams
        seed_all(seed + rank)
    optimizer = run.optimizer.build(model)
    scheduler = run.scheduler.build(optimizer)
    scaler = torch.amp.GradScaler(device.type) if run.plain["amp"] == "fp16" else None
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, %.2fM parameters (%.2fM trainable); parameter groups: %s", type(model).__name__,
                n_params / 1e6, n_train / 1e6,
                ", ".join(f"{g['name']} ({len(g['params'])} tensors, lr {g['initial_lr']:.3g}, "
                          f"wd {g['weight_decay']:.3g})" for g in optimizer.param_groups))
    data_state = {"seed": seed, "world_size": world,
                  "batch_size_per_process": int(run.plain["schedule"]["batch_size"]) // world,
                  "aspect_grouping": bool(run.plain["data"].get("aspect_grouping", True))}
    # What the checkpoints store: the checked trees, the model's without its weights file (the
    # checkpoint holds the weights; tools rebuild it without files).
    return TrainingParts(train_set, val_set, model, optimizer, scheduler, scaler, without_files(run.model.tree),
                         run.data.tree, data_state)


def build_training_stream(run: CheckedTrainConfig, parts: TrainingParts, start_iter: int, device: torch.device):
    """The endless training batches from iteration `start_iter` on (`build_train_loader`)."""
    data = parts.data_state
    return build_train_loader(parts.train_set, data["batch_size_per_process"],
                              num_workers=int(run.plain["num_workers"]), seed=data["seed"],
                              distributed=data["world_size"] > 1, aspect_grouping=data["aspect_grouping"],
                              start_iter=start_iter, pin_memory=device.type == "cuda")


def _resume(run: CheckedTrainConfig, parts: TrainingParts, checkpoint_path: Path) -> int:
    """The iteration to start at: the checkpoint's with resume=true (its state loaded into
    the parts), else 0 (warning when an existing checkpoint will be overwritten)."""
    if run.plain["resume"]:
        if checkpoint_path.is_file():
            start_iter = resume_training_state(checkpoint_path, parts.model, parts.optimizer, parts.scheduler,
                                               parts.scaler, parts.data_state)
            logger.info("resumed from %s at iteration %d", checkpoint_path, start_iter)
            return start_iter
        logger.info("resume=true but %s does not exist: starting from iteration 0", checkpoint_path)
    elif checkpoint_path.exists():
        logger.warning("%s exists and will be overwritten (pass resume=true to continue that run)",
                       checkpoint_path)
    return 0


# ------------------------------------------------------------------------------------ training

def _make_hooks(run: CheckedTrainConfig, run_dir: Path, parts: TrainingParts, train_model: nn.Module, device,
                writer, extra_hooks: HookFactory | None) -> list[Hook]:
    """The hooks in the order of their effects (see detkit.engine.hooks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config = run.plain

    def evaluate():
        return evaluate_detector(parts.model, parts.val_set, device, batch_size=int(config["eval_batch_size"]),
                                 num_workers=int(config["num_workers"]))

    hooks: list[Hook] = [MetricWriter(config["log_period"], writer)] if rank == 0 else []
    hooks.append(CheckpointHook(run_dir / "checkpoints" / "last.pth", config["checkpoint_period"], train_model,
                                parts.optimizer, parts.scheduler, parts.scaler, parts.data_state,
                                parts.checkpoint_extra()))
    hooks.append(EvalHook(config["eval_period"], evaluate, num_images=len(parts.val_set), writer=writer,
                          detections_path=run_dir / "detections.json", sync_model=parts.model))
    if extra_hooks is not None:
        hooks.extend(extra_hooks(config, TrainingRun(run_dir, parts.model, parts.val_set, parts.class_names(),
                                                     writer)))
    if rank == 0:
        hooks.append(ResultsHook(run_dir, parts.model, world))
    return hooks


def train(cfg: DictConfig, run_dir: str | Path, extra_hooks: HookFactory | None = None) -> dict[str, float] | None:
    """Train (and evaluate) as configured by the composed configs/train.yaml `cfg`,
    writing into `run_dir`. Returns the final metrics on rank 0, None on other ranks.

    extra_hooks: `extra_hooks(config, run: TrainingRun) -> list[Hook]`, called once the parts
    are built, with the run's config as plain data (`CheckedTrainConfig.plain`); its hooks run
    after the evaluation hook (they see each evaluation in the loop state) and before
    metrics.json is written.

    Raises ValueError (DatasetError, CheckpointError) for problems a user can fix,
    before training starts, TrainingDiverged if the loss becomes non-finite, `WriteError`
    (an OSError) when a file cannot be written (disk full, unwritable folder: the message
    says which checkpoint is kept), and `detkit.engine.preemption.Interrupted` on SIGTERM,
    SIGINT or SIGUSR1 (after the step in progress and a checkpoint of it: `StopOnSignal`).
    The signal handlers are the caller's `StopSignals` (the tools install them,
    `detkit.cli.run_app`), else installed here for the call (from the main thread).
    """
    signals = preemption.current()
    if signals is None:   # called as a library function: the caller's handlers are replaced meanwhile
        with preemption.StopSignals() as signals:
            return _train(cfg, Path(run_dir), extra_hooks, signals)
    return _train(cfg, Path(run_dir), extra_hooks, signals)


def _train(cfg: DictConfig, run_dir: Path, extra_hooks: HookFactory | None,
           signals: preemption.StopSignals) -> dict[str, float] | None:
    dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    run = check_train_config(cfg, world)   # the one check and the one conversion to plain data
    config = run.plain
    device = resolve_device(config["device"])
    amp_dtype = AMP_DTYPES[config["amp"]]  # autocast on the run's device, CPU or CUDA (torch supports both)

    parts = build_training_parts(run, device, rank, world)
    start_iter = _resume(run, parts, run_dir / "checkpoints" / "last.pth")
    train_loader = build_training_stream(run, parts, start_iter, device)
    train_model: nn.Module = parts.model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            parts.model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir), purge_step=start_iter or None)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))

    hooks = _make_hooks(run, run_dir, parts, train_model, device, writer, extra_hooks)
    checkpoint_hook = next(hook for hook in hooks if isinstance(hook, CheckpointHook))
    stop = StopOnSignal(signals, checkpoint_hook)
    hooks.append(stop)    # last: the step's hooks (checkpoint, evaluation, pictures) have run
    sched = config["schedule"]
    max_iters = int(sched["max_iters"])
    logger.info("training iterations %d..%d of %d: %d images per iteration (%d per process x %d), device %s%s",
                start_iter + 1, max_iters, max_iters, int(sched["batch_size"]),
                parts.data_state["batch_size_per_process"], world, device,
                f", amp {config['amp']}" if amp_dtype else "")
    grad_clip = float(sched["grad_clip"]) if sched["grad_clip"] is not None else None
    trainer = Trainer(train_model, parts.optimizer, parts.scheduler, train_loader, device, scaler=parts.scaler,
                      amp_dtype=amp_dtype, grad_clip=grad_clip, hooks=hooks)
    try:
        with writer if writer is not None else contextlib.nullcontext():  # closed also when training diverges
            state: LoopState = trainer.train(start_iter, max_iters)
    except WriteError as exc:   # a checkpoint, metrics.json, detections.json ...: say what is kept
        raise exc.with_kept(kept_checkpoint(trainer.state)) from None
    except OSError as exc:      # TensorBoard's event file
        error = os_error_of(exc)
        if error is None or error.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(error.filename or run_dir, error.strerror or str(error), kept_checkpoint(trainer.state),
                         error.errno) from None
    except Interrupted as exc:  # a signal during the final evaluation (StopOnSignal's own say more)
        if trainer.state.iteration >= max_iters and str(exc) == f"stopped by {signal_name(exc.signum)}":
            message = (f"stopped by {signal_name(exc.signum)} after training, {kept_checkpoint(trainer.state)}: "
                       f"resume=true evaluates it and writes metrics.json") if rank == 0 else " "
            raise Interrupted(exc.signum, message) from None
        raise
    finally:
        stop.close()
    return state.metrics


# The errors of a write that fails for want of room or permission.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM)
