"""The paired bootstrap over validation images (detkit.study.bootstrap) and
tools/eval_noise.py: a resample is re-accumulated exactly as COCOeval would score a dataset
holding those images, the same resample goes to every model, and the tool refuses runs
evaluated elsewhere."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.study.bootstrap import (bootstrap_ap, evaluate_images, load_detections, resampled_ap,
                                         summarize_bootstrap)

REPO = Path(__file__).resolve().parents[2]


def make_ground_truth(num_images: int = 24, seed: int = 0) -> dict:
    """Images of 200 x 200 px with 1-4 boxes [x, y, w, h] of two categories and all three
    COCO sizes."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(1, 5)):
            side = float(rng.choice([20.0, 60.0, 120.0]) * rng.uniform(0.8, 1.2))
            x, y = rng.uniform(0, 200 - side, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 3)),
                                "bbox": [float(x), float(y), side, side], "area": side * side, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def make_detections(gt: dict, noise: float, seed: int) -> list[dict]:
    """Each ground-truth box found with probability 0.8, its corners jittered by `noise` px,
    plus one false positive per image."""
    rng = np.random.default_rng(seed)
    detections = []
    for a in gt["annotations"]:
        if rng.uniform() < 0.8:
            x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, noise, 4)
            detections.append({"image_id": a["image_id"], "category_id": a["category_id"],
                               "bbox": [float(x), float(y), float(max(w, 1)), float(max(h, 1))],
                               "score": float(rng.uniform(0.3, 1.0))})
    for image in gt["images"]:
        detections.append({"image_id": image["id"], "category_id": 1, "bbox": [5.0, 5.0, 30.0, 30.0],
                           "score": float(rng.uniform(0.0, 0.6))})
    return detections


def coco(dataset: dict) -> COCO:
    api = COCO()
    api.dataset = json.loads(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def plain_ap(dataset: dict, detections: list[dict]) -> float:
    """COCOeval from scratch: box AP in percent."""
    gt = coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]) * 100


def test_all_images_once_is_the_plain_ap():
    gt = make_ground_truth()
    detections = make_detections(gt, noise=4.0, seed=1)
    evaluation = evaluate_images(coco(gt), detections)
    assert evaluation.ap == pytest.approx(plain_ap(gt, detections), abs=1e-9)
    order = np.random.default_rng(0).permutation(len(evaluation.image_ids))   # order does not matter
    assert resampled_ap(evaluation, order) == pytest.approx(evaluation.ap, abs=1e-9)


def test_a_resample_scores_as_a_dataset_holding_those_images():
    """Image 1 drawn three times, image 5 twice, image 9 once: the same AP as COCOeval on a
    dataset with three copies of image 1 (new ids, same boxes and detections), two of image 5
    and one of image 9."""
    gt = make_ground_truth()
    detections = make_detections(gt, noise=4.0, seed=1)
    evaluation = evaluate_images(coco(gt), detections)
    index = {image_id: i for i, image_id in enumerate(evaluation.image_ids)}
    sample = np.array([index[1], index[5], index[1], index[9], index[5], index[1]])

    copies = {"images": [], "annotations": [], "categories": gt["categories"]}
    copied_detections = []
    for n, i in enumerate(sample):
        old_id, new_id = evaluation.image_ids[i], 1000 + n
        copies["images"].append({"id": new_id, "width": 200, "height": 200, "file_name": f"{new_id}.jpg"})
        for a in gt["annotations"]:
            if a["image_id"] == old_id:
                copies["annotations"].append(dict(a, id=len(copies["annotations"]) + 1, image_id=new_id))
        copied_detections += [dict(d, image_id=new_id) for d in detections if d["image_id"] == old_id]
    assert resampled_ap(evaluation, sample) == pytest.approx(plain_ap(copies, copied_detections), abs=1e-9)


def test_the_same_resample_goes_to_every_model():
    gt = coco(make_ground_truth())
    detections = make_detections(make_ground_truth(), noise=4.0, seed=1)
    same = [evaluate_images(gt, detections), evaluate_images(gt, detections)]
    values = bootstrap_ap(same, draws=20, seed=3)
    assert values.shape == (20, 2) and np.array_equal(values[:, 0], values[:, 1])
    assert values[:, 0].std() > 0.5                  # 24 images: resamples do move the AP
    summary = summarize_bootstrap(same, values)
    assert summary.difference_sd == (None, 0.0) and summary.difference_interval[1] == (0.0, 0.0)

    other = evaluate_images(gt, make_detections(make_ground_truth(), noise=8.0, seed=2))
    values = bootstrap_ap([same[0], other], draws=50, seed=3)
    summary = summarize_bootstrap([same[0], other], values)
    differences = values[:, 1] - values[:, 0]
    assert summary.difference_sd[1] == pytest.approx(differences.std(ddof=1))
    assert summary.difference_interval[1] == pytest.approx(tuple(np.percentile(differences, [2.5, 97.5])))
    assert summary.difference_sd[1] > 0
    assert np.array_equal(bootstrap_ap([same[0], other], draws=50, seed=3), values)   # seeded


def test_bad_input_is_named():
    gt = coco(make_ground_truth())
    with pytest.raises(ValueError, match="image_id 999 is not an image"):
        evaluate_images(gt, [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="category_id 7 is not a category"):
        evaluate_images(gt, [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.5}])
    evaluation = evaluate_images(gt, [])
    assert evaluation.ap == 0.0
    with pytest.raises(ValueError, match="draws must be at least 2"):
        bootstrap_ap([evaluation], draws=1)
    smaller = evaluate_images(coco(make_ground_truth(num_images=10)), [])
    with pytest.raises(ValueError, match="cover different images"):
        bootstrap_ap([evaluation, smaller], draws=5)


def test_load_detections_checks_the_format(tmp_path):
    path = tmp_path / "detections.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_detections(path)
    path.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(ValueError, match="COCO results"):
        load_detections(path)


def make_run(run_dir: Path, detections: list[dict], ap: float | None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "detections.json").write_text(json.dumps(detections))
    if ap is not None:
        (run_dir / "metrics.json").write_text(json.dumps({"bbox/AP": ap}))
    return run_dir


def eval_noise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "eval_noise.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_the_tool_prints_each_runs_spread_and_refuses_runs_evaluated_elsewhere(tmp_path):
    gt = make_ground_truth()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    base_detections, row_detections = make_detections(gt, 4.0, 1), make_detections(gt, 8.0, 2)
    base = make_run(tmp_path / "base", base_detections, plain_ap(gt, base_detections))
    row = make_run(tmp_path / "row", row_detections, None)
    result = eval_noise(f"runs=[{base},{row}]", f"gt={tmp_path / 'gt.json'}", "draws=20")
    assert result.returncode == 0, result.stderr
    lines = {line.split(" | ")[0].strip("| `"): line for line in result.stdout.splitlines() if line.startswith("| `")}
    assert f"| {plain_ap(gt, base_detections):.2f} |" in lines[str(base)] and "| base |" in lines[str(base)]
    delta = plain_ap(gt, row_detections) - plain_ap(gt, base_detections)
    assert f"| {delta:+.2f} |" in lines[str(row)]
    assert "20 resamples" in result.stdout and "24 validation images" in result.stdout

    wrong = make_run(tmp_path / "wrong", base_detections, plain_ap(gt, base_detections) + 5.0)
    refused = eval_noise(f"runs=[{base},{wrong}]", f"gt={tmp_path / 'gt.json'}", "draws=20")
    assert refused.returncode == 2 and "evaluated on other images or another ground truth" in refused.stderr
    missing = eval_noise(f"runs=[{base},{tmp_path}]", f"gt={tmp_path / 'gt.json'}")
    assert missing.returncode == 2 and "has no detections.json" in missing.stderr


def test_a_crafted_run_config_builds_nothing_it_names(tmp_path):
    """Without gt= the tool reads the first run's config.yaml (a file people exchange): a data
    node naming something other than detkit's data sources is refused, never imported."""
    gt = make_ground_truth()
    run = make_run(tmp_path / "run", make_detections(gt, 4.0, 1), None)
    marker = tmp_path / "ran"
    (run / "config.yaml").write_text(
        f"data:\n  _target_: os.system\n  command: 'touch {marker}'\n  root: {tmp_path}\n")
    result = eval_noise(f"runs=[{run}]")
    assert result.returncode == 2 and "os.system" in result.stderr
    assert not marker.exists()
