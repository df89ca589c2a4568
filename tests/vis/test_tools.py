"""tools/visualize.py and tools/analyze_offsets.py end to end, in subprocesses.

The runs are started together (they are independent) in one module fixture and checked
by the tests; each gets OMP_NUM_THREADS=1 and runs from a temporary working folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.engine.checkpoint import save_checkpoint
from detkit.modeling.backbone import deformable_layers
from tests.vis.builders import (build_tiny, randomise_offset_branches, tiny_config, write_coco_folder,
                                write_image)

REPO = Path(__file__).resolve().parents[2]
VISUALIZE = str(REPO / "tools" / "visualize.py")
ANALYZE = str(REPO / "tools" / "analyze_offsets.py")
IMAGE_H, IMAGE_W = 80, 100
# The newer deformable layer kinds (the default checkpoint's is DCNv2) in the tiny model's
# res3-res5 (16 / 32 / 64 channels).
NEWER_KINDS = {
    "dcnv3": {"deform_kind": "dcnv3", "deform_groups": 2, "deform_options": {"center_feature_scale": True}},
    "dcnv4": {"deform_kind": "dcnv4", "deform_groups": {"res3": 1, "res4": 2, "res5": 4},
              "deform_options": {"remove_center": True}},
    "offset_sampling": {"deform_kind": "offset_sampling"},
}


def write_checkpoint(path: Path, **changes) -> list[str]:
    """A tiny detector checkpoint; returns its deformable conv layers' names."""
    model = build_tiny(**changes)
    randomise_offset_branches(model, std=0.02, seed=3)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": tiny_config(**changes),
                           "label_to_category_id": {1: 1, 2: 2}, "class_names": {1: "a", 2: "b"}})
    return [name for name, _ in deformable_layers(model)]


def write_coco(folder: Path) -> tuple[Path, Path]:
    """Two images with boxes of each COCO size class (ids 1, 2 as the checkpoint's)."""
    boxes = {1: [[5, 5, 20, 20], [40, 20, 50, 50]], 2: [[10, 10, 100, 100]]}  # [x, y, w, h]
    return write_coco_folder(folder, {1: (IMAGE_H, IMAGE_W), 2: (120, 130)}, boxes,
                             category_of=lambda index: 1 + index % 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vis_tools")
    dcn, plain = tmp / "dcn.pth", tmp / "plain.pth"
    names = write_checkpoint(dcn)
    write_checkpoint(plain, backbone={"deform_blocks": {}}, pooler_kind="align")
    kinds = {kind: tmp / f"{kind}.pth" for kind in NEWER_KINDS}
    kind_names = {kind: write_checkpoint(path, backbone=NEWER_KINDS[kind]) for kind, path in kinds.items()}
    image = tmp / "image.png"
    pixels = write_image(image, IMAGE_H, IMAGE_W, seed=0)
    not_an_image = tmp / "broken.png"
    not_an_image.write_text("not a png")
    images, annotations = write_coco(tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "DETKIT_CACHE": str(tmp / "cache")}
    commands = {
        "visualize": [VISUALIZE, f"checkpoint={dcn}", f"input={image}", f"output={tmp / 'out.png'}"],
        "analyze": [ANALYZE, f"checkpoint={dcn}", f"images={images}", f"annotations={annotations}",
                    f"output={tmp / 'stats.json'}"],
        "no_deformable": [VISUALIZE, f"checkpoint={plain}", f"input={image}", f"output={tmp / 'plain.png'}"],
        "images_without_annotations": [ANALYZE, f"checkpoint={dcn}", f"images={images}"],
        "point_outside": [VISUALIZE, f"checkpoint={dcn}", f"input={image}", f"point=[{IMAGE_W + 5},10]"],
        "unreadable": [VISUALIZE, f"checkpoint={dcn}", f"input={not_an_image}"],
        "too_few_layers": [VISUALIZE, f"checkpoint={dcn}", f"input={image}", "stage=res5", "num_layers=3"],
        **{f"visualize_{kind}": [VISUALIZE, f"checkpoint={path}", f"input={image}",
                                 f"output={tmp / (kind + '.png')}"] for kind, path in kinds.items()},
        **{f"analyze_{kind}": [ANALYZE, f"checkpoint={path}", f"images={images}", f"annotations={annotations}",
                               f"output={tmp / (kind + '.json')}"] for kind, path in kinds.items()},
    }
    processes = {key: subprocess.Popen([sys.executable, *args, f"hydra.run.dir={tmp / 'runs' / key}"], cwd=tmp,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for key, args in commands.items()}
    results = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[key] = (process.returncode, stdout, stderr)
    return {"results": results, "tmp": tmp, "names": names, "pixels": pixels, "kind_names": kind_names}


def test_visualize_writes_a_png_of_the_image_size(runs):
    code, stdout, stderr = runs["results"]["visualize"]
    assert code == 0, stderr
    picture = cv2.imread(str(runs["tmp"] / "out.png"))
    assert picture is not None and picture.shape == runs["pixels"].shape
    assert np.abs(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB).astype(int) - runs["pixels"].astype(int)).sum() > 0
    assert "deformable RoI bins" in stdout


def test_analyze_offsets_writes_one_entry_per_deformable_layer(runs):
    code, stdout, stderr = runs["results"]["analyze"]
    assert code == 0, stderr
    stats = json.loads((runs["tmp"] / "stats.json").read_text())
    assert [entry["name"] for entry in stats["layers"]] == runs["names"]
    assert stats["num_images"] == 2
    for entry in stats["layers"]:
        dilation = entry["effective_dilation"]
        assert dilation["all"]["count"] == sum(dilation[c]["count"] for c in stats["categories"]) > 0
        assert dilation["all"]["mean"] > 0 and entry["modulated"]
    # Boxes of 20x20 (small), 50x50 (medium) and 100x100 (large): the finest layer sees all three.
    finest = stats["layers"][0]["effective_dilation"]
    assert all(finest[c]["count"] > 0 for c in stats["categories"])
    assert "res3a" in stdout and "background" in stdout
    # The same numbers as Markdown beside the JSON (what docs/ablations.md's Table 2 is made of).
    markdown = (runs["tmp"] / "stats.md").read_text()
    first = stats["layers"][0]
    small = first["effective_dilation"]["small"]
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {first['short_name']} |"))
    assert f"{small['mean']:.2f} ± {small['std']:.2f}" in row
    assert len([line for line in markdown.splitlines() if line.startswith("| res")]) == len(stats["layers"])


@pytest.mark.parametrize("key, message", [
    ("no_deformable", "no deformable layers"),
    ("images_without_annotations", "pass both images=FOLDER and annotations=JSON"),
    ("point_outside", "outside the image"),
    ("unreadable", "cannot read image"),
    ("too_few_layers", "stage res5 has 2 deformable conv layers"),
])
def test_bad_inputs_fail_with_one_line(runs, key, message):
    code, _, stderr = runs["results"][key]
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", list(NEWER_KINDS))
def test_the_tools_draw_and_measure_every_newer_kind(runs, kind):
    code, stdout, stderr = runs["results"][f"visualize_{kind}"]
    assert code == 0, stderr
    picture = cv2.imread(str(runs["tmp"] / f"{kind}.png"))
    assert picture is not None and picture.shape == runs["pixels"].shape
    assert np.abs(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB).astype(int) - runs["pixels"].astype(int)).sum() > 0
    code, stdout, stderr = runs["results"][f"analyze_{kind}"]
    if kind == "offset_sampling":  # one point per channel: no adjacent taps to measure
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "has no adjacent taps" in lines[0], stderr
        return
    assert code == 0, stderr
    stats = json.loads((runs["tmp"] / f"{kind}.json").read_text())
    assert [entry["name"] for entry in stats["layers"]] == runs["kind_names"][kind]
    for entry in stats["layers"]:
        dilation = entry["effective_dilation"]["all"]
        # Small random offset heads around the 3x3 grid: near 1 (a plain conv's), never exactly
        # (DCNv4's head reads the raw features, so its offsets are the larger: ~1.1 measured).
        assert dilation["count"] > 0 and 0.5 < dilation["mean"] < 2 and dilation["mean"] != 1
        assert dilation["std"] > 0
    assert {entry["offset_groups"] for entry in stats["layers"]} == ({2} if kind == "dcnv3" else {1, 2, 4})
