"""tools/train.py and tools/eval.py end to end, in subprocesses, on the smoke experiment.

Every run gets OMP_NUM_THREADS=1 (CPU results depend on the thread count, and the
runs compared here must match bit for bit; one thread is also the fastest on a
shared 2-core machine) and a private DETKIT_CACHE, and runs from a temporary
working folder, so that a stray outputs/ folder would be noticed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pycocotools.coco import COCO

from detkit.engine.checkpoint import load_model

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "tools" / "train.py")
EVAL = str(REPO / "tools" / "eval.py")
SUMMARY = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")
SMOKE_ITERS = 6  # configs/experiment/smoke.yaml: schedule.max_iters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("detkit_cache")
    return {**os.environ, "DETKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def run(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train(env, cwd: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run([sys.executable, TRAIN, "experiment=smoke", f"hydra.run.dir={run_dir}", *overrides], env, cwd)


@pytest.fixture(scope="module")
def smoke(env, tmp_path_factory):
    """One uninterrupted smoke run: (result, run_dir, working folder)."""
    work = tmp_path_factory.mktemp("smoke")
    run_dir = work / "run"
    return train(env, work, run_dir), run_dir, work


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_smoke_run(smoke, env):
    result, run_dir, work = smoke
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["iteration"] == SMOKE_ITERS
    # The six summary numbers, in percent. COCOeval has no value for an area range without
    # ground truth (reported as null): only allowed where the val split has no such box.
    val = COCO(str(Path(env["DETKIT_CACHE"]) / "synthetic_smoke" / "annotations" / "instances_val.json"))
    areas = [a["area"] for a in val.dataset["annotations"]]
    has_gt = {"bbox/APs": any(a < 32 ** 2 for a in areas), "bbox/APm": any(32 ** 2 <= a < 96 ** 2 for a in areas),
              "bbox/APl": any(a >= 96 ** 2 for a in areas)}
    for key in SUMMARY:
        value = metrics[key]
        if value is None:
            assert not has_gt.get(key, True), f"{key} is null although the val split has such boxes"
        else:
            assert 0.0 <= value <= 100.0, (key, value)
    assert len([k for k in metrics if k.startswith("bbox/AP-")]) == len(val.cats)

    model, checkpoint = load_model(run_dir / "checkpoints" / "last.pth")
    assert checkpoint["iteration"] == SMOKE_ITERS
    assert model.roi_heads.box_predictor.cls_score.out_features == len(val.cats) + 1
    assert checkpoint["model_config"]["backbone"]["weights"] is None
    assert set(checkpoint["class_names"].values()) == {c["name"] for c in val.cats.values()}
    for key in ("optimizer", "scheduler", "rng", "data"):
        assert key in checkpoint
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0]), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"train/total_loss", "train/lr", "eval/bbox/AP"} <= set(tags["scalars"])
    assert "sampling/val_0" in tags["images"], "no sampling-point picture logged at evaluation"
    picture = accumulator.Images("sampling/val_0")[-1]
    assert picture.width > 0 and picture.height > 0
    log = (run_dir / "train.log").read_text()
    assert re.search(rf"iter {SMOKE_ITERS}/{SMOKE_ITERS} .*total .*lr .*s/it .*eta", log)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (work / "outputs").exists()


def test_console_script_and_module_make_the_same_run(smoke, env, tmp_path):
    """`detkit-train` (a console script: another argv[0], main() imported from detkit.cli.train)
    and `python -m detkit.cli.train` make the run folder tools/train.py makes: train.log,
    .hydra/ with the same job name, the same metrics bit for bit."""
    result, run_dir, _ = smoke
    assert result.returncode == 0
    script = tmp_path / "bin" / "detkit-train"
    script.parent.mkdir()
    script.write_text("import sys\nfrom detkit.cli.train import main\nif __name__ == '__main__':\n"
                      "    sys.exit(main())\n")
    expected = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.out"))
    for name, command in {"script": [str(script)], "module": ["-m", "detkit.cli.train"]}.items():
        out = tmp_path / name
        done = run([sys.executable, *command, "experiment=smoke", f"hydra.run.dir={out}"], env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events.out")) == expected
        assert "train.log" in expected and (out / ".hydra" / "overrides.yaml").is_file()
        assert OmegaConf.load(out / ".hydra" / "hydra.yaml").hydra.job.name == "train"
        assert read_metrics(out) == read_metrics(run_dir)
    assert not (tmp_path / "outputs").exists()


def test_synthetic_annotations_load_in_pycocotools(smoke, env):
    assert smoke[0].returncode == 0
    root = Path(env["DETKIT_CACHE"]) / "synthetic_smoke" / "annotations"
    for split in ("train", "val"):
        coco = COCO(str(root / f"instances_{split}.json"))
        assert coco.getImgIds() and coco.getAnnIds() and len(coco.getCatIds()) == 8
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]


def test_eval_reproduces_training_metrics(smoke, env, tmp_path):
    result, run_dir, _ = smoke
    assert result.returncode == 0
    out = tmp_path / "eval"
    evaluation = run([sys.executable, EVAL, f"checkpoint={run_dir / 'checkpoints' / 'last.pth'}",
                      f"hydra.run.dir={out}", "num_workers=0"], env, tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert read_metrics(out) == read_metrics(run_dir)
    # Same detections, not only the same (possibly all-zero) numbers.
    assert json.loads((out / "detections.json").read_text()) == json.loads((run_dir / "detections.json").read_text())
    log = (out / "eval.log").read_text()
    assert "AP @ IoU=0.50:0.95 area=all" in log and "AR @ IoU=0.50:0.95 area=large" in log


def test_resume_matches_an_uninterrupted_run(smoke, env, tmp_path):
    result, full_dir, _ = smoke
    assert result.returncode == 0
    run_dir = tmp_path / "run"
    # "Killed" after 4 iterations (its last checkpoint is at 4), then resumed to the end.
    first = train(env, tmp_path, run_dir, f"schedule.max_iters={SMOKE_ITERS - 2}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(env, tmp_path, run_dir, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pth'} at iteration {SMOKE_ITERS - 2}" in resumed.stdout

    full = torch.load(full_dir / "checkpoints" / "last.pth", weights_only=True)
    done = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
    assert done["iteration"] == full["iteration"] == SMOKE_ITERS
    assert full["model"].keys() == done["model"].keys()
    for key in full["model"]:
        assert torch.equal(full["model"][key], done["model"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), done["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert read_metrics(run_dir) == read_metrics(full_dir)


# test_two_process_ddp: tests/tools/test_ddp_runs.py (with a killed and resumed two-process run).


# ------------------------------------------------------------------------------ bad input

def write_coco(root: Path, smoke_root: Path) -> Path:
    """A COCO-2017-layout copy of the smoke synthetic dataset."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(smoke_root / split, root / f"{split}2017")
        shutil.copy(smoke_root / "annotations" / f"instances_{split}.json",
                    root / "annotations" / f"instances_{split}2017.json")
    return root


@pytest.fixture(scope="module")
def coco_root(smoke, env, tmp_path_factory):
    assert smoke[0].returncode == 0  # generated the smoke data
    return write_coco(tmp_path_factory.mktemp("coco") / "coco", Path(env["DETKIT_CACHE"]) / "synthetic_smoke")


def test_coco_data_trains(coco_root, env, tmp_path):
    result = train(env, tmp_path, tmp_path / "run", "data=coco", f"data.root={coco_root}", "data.num_classes=9",
                   "data.min_size=128", "data.max_size=208", "schedule.max_iters=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path / "run")["iteration"] == 2


def corrupt_json(root: Path) -> str:
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    return "corrupt annotation JSON"


def missing_image(root: Path) -> str:
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    annotated = {a["image_id"] for a in data["annotations"]}  # images without boxes are not trained on
    name = next(img["file_name"] for img in data["images"] if img["id"] in annotated)
    victim = root / "train2017" / name
    victim.unlink()
    return f"image file missing: {victim}"


@pytest.mark.parametrize("case", ["no_root", "corrupt_json", "missing_image", "num_classes", "unknown_key",
                                  "missing_value"])
def test_bad_input_fails_in_one_line_before_training(case, coco_root, env, tmp_path):
    if case == "no_root":
        overrides, expected = ["data=coco", "data.root=/nonexistent"], "/nonexistent"
    elif case in ("corrupt_json", "missing_image"):
        root = Path(shutil.copytree(coco_root, tmp_path / "coco"))  # a copy to break
        expected = {"corrupt_json": corrupt_json, "missing_image": missing_image}[case](root)
        overrides = ["data=coco", f"data.root={root}", "data.num_classes=9"]
    elif case == "num_classes":
        overrides, expected = ["model.num_classes=3"], "model.num_classes is 3"
    elif case == "unknown_key":
        overrides, expected = ["foo=1"], "foo"
    else:
        overrides, expected = ["data=coco"], "data.root"
    run_dir = tmp_path / "run"
    if case == "missing_value":  # without experiment=smoke, which sets data.root
        result = run([sys.executable, TRAIN, *overrides, f"hydra.run.dir={run_dir}"], env, tmp_path)
    else:
        result = train(env, tmp_path, run_dir, *overrides)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists() and " iter " not in result.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke, env, tmp_path):
    assert smoke[0].returncode == 0
    run_dir = tmp_path / "run"
    result = train(env, tmp_path, run_dir, "schedule.base_lr=1e6", "checkpoint_period=1")
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    # "<loss is | gradients are | weights are> not finite at iteration N (<the losses>)"
    match = re.search(r"(loss is|gradients are|weights are) not finite at iteration (\d+) \((.*)\)", errors[0])
    assert match and "loss_classifier=" in match.group(3), errors[0]
    if match.group(1) == "loss is":
        assert "nan" in match.group(3) or "inf" in match.group(3)
    failed = int(match.group(2))
    assert 1 < failed <= SMOKE_ITERS
    # The checkpoint of the iteration before is intact (not overwritten with the bad state).
    _, checkpoint = load_model(run_dir / "checkpoints" / "last.pth")
    assert checkpoint["iteration"] == failed - 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert not (run_dir / "metrics.json").exists()
    assert f"not finite at iteration {failed}" in (run_dir / "train.log").read_text()
