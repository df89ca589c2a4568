"""COCO box evaluation of a detkit checkpoint.

    python tools/eval.py checkpoint=outputs/train/<run>/checkpoints/last.pth
    python tools/eval.py checkpoint=PATH data=coco data.root=/data/coco

(or `detkit-eval ...`, `python -m detkit.cli.eval ...`). Rebuilds the model from the
checkpoint, runs it over the val split and COCOeval, logs the 12 summary numbers and the
per-class AP, and writes `metrics.json` (as a training run's) and `detections.json` (COCO
results: image_id, category_id, bbox [x, y, w, h], score) into its run folder
(`hydra.run.dir`, default outputs/eval/<time>; log eval.log). Without `data=...` it
evaluates on the dataset the checkpoint was trained on, so on a finished run's checkpoint it
reproduces that run's metrics.json. `roi_pool_probe=no_offsets|mask_roi_mean|mask_batch_mean`
evaluates a model with deformable RoI pooling with its offsets or bin weights changed at
inference (`detkit.study.probes`; metrics.json then names the probe).
Mistakes end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkit.cli import run_app  # torch comes later

logger = logging.getLogger("detkit.eval")


@dataclass
class ModelChange:
    """A change of the model for one evaluation (`evaluate_checkpoint`): `context` applies it
    around the evaluation, `note` is logged inside it, `record` joins metrics.json."""
    context: contextlib.AbstractContextManager
    note: str
    record: dict[str, Any] = field(default_factory=dict)


def job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))


def evaluate_checkpoint(cfg, run_dir: Path, change_model: Callable[[Any], ModelChange] | None = None) -> None:
    """The eval tool's work for its config `cfg` (configs/eval.yaml's keys), into `run_dir`.

    `change_model(model) -> ModelChange`: how a tool built on this one evaluates the model
    changed at inference (the study's RoI-pooling probes, `detkit.study.cli.probe_roi_pool`);
    called on the loaded model before any data is made, so a change this model cannot take
    fails first."""
    from detkit.config.build import build_data_source, data_config_for_checkpoint
    from detkit.engine.checkpoint import load_model
    from detkit.evaluation.evaluate import coco_stats_table, evaluate_detector, per_class_table
    from detkit.io import write_json
    from detkit.utils.comm import resolve_device

    device = resolve_device(cfg.device)
    model, checkpoint = load_model(cfg.checkpoint, device)
    change = change_model(model) if change_model is not None else None
    if "label_to_category_id" not in checkpoint:
        raise ValueError(f"{cfg.checkpoint} has no label_to_category_id: cannot map its labels to categories")
    data_cfg, source = data_config_for_checkpoint(cfg.get("data"), checkpoint)
    data_source = build_data_source(data_cfg)
    data_source.prepare()
    dataset = data_source.dataset("val", train=False)
    logger.info("evaluating %s (iteration %s) on %d %s val images (%s)", cfg.checkpoint,
                checkpoint.get("iteration", "n/a"), len(dataset), data_cfg["kind"], source)
    with change.context if change is not None else contextlib.nullcontext():
        if change is not None:
            logger.info("%s", change.note)
        metrics, evaluator = evaluate_detector(model, dataset, device, checkpoint["label_to_category_id"],
                                               batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers))
    logger.info("box AP %.2f\n%s\nper-class AP:\n%s", metrics["bbox/AP"], coco_stats_table(evaluator),
                per_class_table(metrics))
    result = {"iteration": checkpoint["iteration"]} if "iteration" in checkpoint else {}
    if change is not None:
        result.update(change.record)
    write_json(run_dir / "metrics.json", {**result, **metrics})
    write_json(run_dir / "detections.json", evaluator.results(), indent=None)
    logger.info("wrote %s and %s", run_dir / "metrics.json", run_dir / "detections.json")


def main() -> None:
    run_app(job, "eval")


if __name__ == "__main__":
    main()
