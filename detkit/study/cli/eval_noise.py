"""How much of a run's box AP, and of its difference to another run, is the validation set.

    python tools/eval_noise.py runs=[BASE_RUN,RUN,...]              # 200 resamples of the val images
    python tools/eval_noise.py runs=[BASE_RUN,RUN] draws=1000 gt=/data/coco/annotations/instances_val2017.json

(or `detkit-eval-noise ...`, `python -m detkit.study.cli.eval_noise ...`). A Hydra app
(configs/eval_noise.yaml) that writes no run folder. `runs` are run folders of
tools/train.py or tools/eval.py holding detections.json (COCO results on the val split); the
first is the base. The validation images are resampled with replacement `draws` times, the
same resample for every run, and COCO box AP recomputed on each (a paired bootstrap,
`detkit.study.bootstrap`). It prints, per run, the AP on all images, its standard
deviation over the resamples, and its difference to the base with that difference's standard
deviation and 95% interval over the resamples: the part of a ΔAP that another draw of
validation images would change. It says nothing of the seed-to-seed spread of training
(tools/report.py's ± 2 SE over seeds holds both).

The ground truth is `gt`, else the val annotation file of the first run's data config
(its config.yaml; a synthetic dataset missing from the cache is generated again, as
tools/eval.py does). A run whose metrics.json AP differs from the AP recomputed from its
detections by more than 0.1 was evaluated on other images or another ground truth: refused.

Exit status: 0 done; 2 a bad path, run folder, detections or annotation file, or a bad
argument (one line on stderr).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

from detkit.cli import run_app

AP_TOLERANCE = 0.1   # percent: detections.json rounds boxes and scores, metrics.json does not


def _paths(value, key: str) -> list[Path]:
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise ValueError(f"{key} must name at least one run folder, e.g. {key}=[RUN_A,RUN_B]")
    return [Path(str(v)) for v in values]


def _ground_truth_path(cfg, first_run: Path) -> Path:
    if cfg.gt is not None:
        return Path(str(cfg.gt)).expanduser()
    from omegaconf import OmegaConf

    from detkit.config.build import build_data_source

    config_file = first_run / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{first_run} has no config.yaml to find its validation annotations: pass gt=PATH")
    data = OmegaConf.load(config_file).get("data")
    if data is None:
        raise ValueError(f"{config_file} has no data node: pass gt=PATH")
    source = build_data_source(data, str(config_file))
    source.prepare()
    return source.split_paths("val")[1]


def _recorded_ap(run: Path) -> float | None:
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        ap = json.loads(metrics_file.read_text()).get("bbox/AP")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{metrics_file} is not a JSON object of metrics") from exc
    return float(ap) if isinstance(ap, (int, float)) and math.isfinite(ap) else None


def job(cfg) -> None:
    from pycocotools.coco import COCO

    from detkit.study.bootstrap import bootstrap_ap, evaluate_images, load_detections, summarize_bootstrap

    runs = _paths(cfg.runs, "runs")
    draws, seed = int(cfg.draws), int(cfg.seed)
    for run in runs:
        if not (run / "detections.json").is_file():
            raise ValueError(f"{run} has no detections.json (a finished tools/train.py or tools/eval.py run folder has one)")
    gt_path = _ground_truth_path(cfg, runs[0])
    if not gt_path.is_file():
        raise ValueError(f"gt: {gt_path} is not a file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(gt_path))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"gt: {gt_path} is not a COCO annotation file ({exc})") from exc
    evaluations = []
    for run in runs:
        evaluation = evaluate_images(coco_gt, load_detections(run / "detections.json"))
        recorded = _recorded_ap(run)
        if recorded is not None and abs(recorded - evaluation.ap) > AP_TOLERANCE:
            raise ValueError(f"{run}: its metrics.json gives box AP {recorded:.2f} but its detections on {gt_path} "
                             f"give {evaluation.ap:.2f}: it was evaluated on other images or another ground truth")
        evaluations.append(evaluation)
    summary = summarize_bootstrap(evaluations, bootstrap_ap(evaluations, draws, seed))
    print(f"Box AP over {draws} resamples (with replacement) of the {len(evaluations[0].image_ids)} "
          f"validation images of {gt_path}, the same resample for every run (seed {seed}).\n")
    print("| run | AP | SD over resamples | Δ to the first | SD of Δ | 95% interval of Δ |")
    print("|---|---|---|---|---|---|")
    for run, ap, sd, d_sd, interval in zip(runs, summary.ap, summary.sd, summary.difference_sd,
                                           summary.difference_interval):
        if d_sd is None:
            delta = ["base", "", ""]
        else:
            delta = [f"{ap - summary.ap[0]:+.2f}", f"{d_sd:.2f}", f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"]
        print("| " + " | ".join([f"`{run}`", f"{ap:.2f}", f"{sd:.2f}", *delta]) + " |")


def main() -> None:
    run_app(job, "eval_noise")


if __name__ == "__main__":
    main()
