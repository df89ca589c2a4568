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
inference (`detkit.evaluation.roi_pool_probe`; metrics.json then names the probe).
Mistakes end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import logging
from pathlib import Path

from detkit.cli import run_app  # torch comes later

logger = logging.getLogger("detkit.eval")


def job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from detkit.data.build import build_dataset, data_config_for_checkpoint, prepare_data
    from detkit.engine.checkpoint import load_model
    from detkit.engine.distributed import resolve_device
    from detkit.evaluation.evaluate import coco_stats_table, evaluate_detector, per_class_table
    from detkit.evaluation.roi_pool_probe import probed_poolers, roi_pool_probe
    from detkit.io import write_json

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    model, checkpoint = load_model(cfg.checkpoint, device)
    probe = cfg.get("roi_pool_probe")
    if probe is not None:
        probed_poolers(model, probe)  # a probe this model cannot take fails before any data is made
    if "label_to_category_id" not in checkpoint:
        raise ValueError(f"{cfg.checkpoint} has no label_to_category_id: cannot map its labels to categories")
    data_cfg, source = data_config_for_checkpoint(cfg.get("data"), checkpoint)
    prepare_data(data_cfg)
    dataset = build_dataset(data_cfg, "val", train=False)
    logger.info("evaluating %s (iteration %s) on %d %s val images (%s)", cfg.checkpoint,
                checkpoint.get("iteration", "n/a"), len(dataset), data_cfg["kind"], source)
    with roi_pool_probe(model, probe):
        if probe is not None:
            logger.info("roi_pool_probe=%s: the deformable RoI pooling's %s", probe,
                        "offsets set to 0" if probe == "no_offsets" else "bin weights averaged")
        metrics, evaluator = evaluate_detector(model, dataset, device, checkpoint["label_to_category_id"],
                                               batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers))
    logger.info("box AP %.2f\n%s\nper-class AP:\n%s", metrics["bbox/AP"], coco_stats_table(evaluator),
                per_class_table(metrics))
    result = {"iteration": checkpoint["iteration"]} if "iteration" in checkpoint else {}
    if probe is not None:
        result["roi_pool_probe"] = str(probe)
    write_json(run_dir / "metrics.json", {**result, **metrics})
    write_json(run_dir / "detections.json", evaluator.results(), indent=None)
    logger.info("wrote %s and %s", run_dir / "metrics.json", run_dir / "detections.json")


def main() -> None:
    run_app(job, "eval")


if __name__ == "__main__":
    main()
