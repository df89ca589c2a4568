"""Train a detector (and evaluate it) as configured by configs/train.yaml.

    python tools/train.py                                  # the default: synthetic shapes, R18 CPU model
    python tools/train.py experiment=smoke                 # a tiny run checking the install
    python tools/train.py model=faster_rcnn_r50_fpn data=coco data.root=/data/coco schedule=coco_1x
    python tools/train.py hydra.run.dir=DIR resume=true    # continue an interrupted run
    torchrun --nproc_per_node=8 tools/train.py ... hydra.run.dir=DIR

(or `detkit-train ...`, `python -m detkit.cli.train ...`). A Hydra app: key=value overrides,
`-m` for sweeps; the run folder is `hydra.run.dir` (default outputs/train/<time>), its log
train.log. Under torchrun every process uses rank 0's run folder (resolved on rank 0 and
broadcast before Hydra starts), and only rank 0 writes into it (logs, TensorBoard,
checkpoints, metrics).

Exit status: 0 done; 2 a mistake in the arguments, config or data (one line on
stderr, before training starts), or a file that cannot be written (disk full, unwritable
folder: one line naming the file and the checkpoint kept); 3 the loss became non-finite
(the last good checkpoint is kept); 4 stopped by SIGTERM, SIGINT or SIGUSR1 (the step in
progress finishes, its checkpoint is written, one line names the signal, the iteration and
the checkpoint; `resume=true` continues exactly: detkit.engine.preemption); 1 anything else
(a traceback).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# torch is imported only once the arguments are checked: a typo fails in a fraction of a second.
from detkit.cli import checked_argv, run_app
from detkit.config.compose import check_config, quote_override


def job(cfg) -> None:
    """One training run into Hydra's run folder (exit status 3 when it diverges)."""
    from hydra.core.hydra_config import HydraConfig

    from detkit.engine.trainer import TrainingDiverged, train
    from detkit.vis.hooks import sampling_picture_hooks

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train(cfg, run_dir, extra_hooks=sampling_picture_hooks)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)


def distributed_argv(argv: list[str]) -> list[str]:
    """Under torchrun: join the process group, take rank 0's resolved run folder (Hydra
    resolves ${now:...} in each process, possibly a second apart) and give it to every
    rank; ranks > 0 write no .hydra/ folder and no log file into it."""
    def fail(message: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    options = [arg for arg in argv if arg.startswith("-")]
    if options:
        fail(f"under torchrun, pass key=value overrides only (got {' '.join(options)}); "
             f"run sweeps (-m) as separate torchrun commands")
    try:
        cfg = check_config("train", argv)
    except ValueError as exc:
        fail(str(exc))
    from detkit.utils import comm as dist

    dist.init_distributed()
    run_dir = dist.broadcast_object(os.path.abspath(str(cfg.hydra.run.dir)) if dist.is_main_process() else None)
    argv = [arg for arg in argv if not arg.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    argv.append(f"hydra.run.dir={quote_override(run_dir)}")
    if not dist.is_main_process():
        argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv


def main() -> None:
    """Entry point: sys.argv's overrides, checked (under torchrun: made every rank's)."""
    args = sys.argv[1:]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    argv = distributed_argv(args) if distributed else checked_argv("train", args)
    try:
        run_app(job, "train", argv, check=False)   # checked above
    finally:
        if distributed:
            from detkit.utils import comm as dist

            dist.cleanup()

if __name__ == "__main__":
    main()
