"""Train a detector (and evaluate it) as configured by configs/train.yaml.

    python tools/train.py                                  # the default: synthetic shapes, R18 CPU model
    python tools/train.py experiment=smoke                 # a tiny run checking the install
    python tools/train.py model=faster_rcnn_r50_fpn data=coco data.root=/data/coco schedule=coco_1x
    python tools/train.py hydra.run.dir=DIR resume=true    # continue an interrupted run
    torchrun --nproc_per_node=8 tools/train.py ... hydra.run.dir=DIR

A Hydra app: key=value overrides, `-m` for sweeps; the run folder is
`hydra.run.dir` (default outputs/train/<time>). Under torchrun every process uses
rank 0's run folder (resolved on rank 0 and broadcast before Hydra starts), and only
rank 0 writes into it (logs, TensorBoard, checkpoints, metrics).

Exit status: 0 done; 2 a mistake in the arguments, config or data (one line on
stderr, before training starts); 3 the loss became non-finite (the last good
checkpoint is kept); 1 anything else (a traceback).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# torch is imported only once the arguments are checked: a typo fails in a fraction of a second.
from detkit.cli import CONFIG_DIR, check_config, checked_argv, one_line_errors, quote_override  # noqa: E402


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from detkit.engine.trainer import TrainingDiverged, train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train(cfg, run_dir)
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
    from detkit.engine import distributed as dist

    dist.init_distributed()
    run_dir = dist.broadcast_object(os.path.abspath(str(cfg.hydra.run.dir)) if dist.is_main_process() else None)
    argv = [arg for arg in argv if not arg.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    argv.append(f"hydra.run.dir={quote_override(run_dir)}")
    if not dist.is_main_process():
        argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv


if __name__ == "__main__":
    args = sys.argv[1:]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    sys.argv = [sys.argv[0], *(distributed_argv(args) if distributed else checked_argv("train", args))]
    try:
        main()
    finally:
        if distributed:
            from detkit.engine import distributed as dist

            dist.cleanup()
