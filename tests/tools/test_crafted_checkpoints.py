"""Crafted checkpoints given to the tools that read checkpoints, in subprocesses.

Every tool exits with status 2 and one line on stderr naming the key path and what was
refused there, and nothing the file planted ran: no marker file, nothing compiled into the
(private) torch extensions folder. The crafted files are tests/engine/crafted.py's; a good
file of the same tiny detector goes through the same tools in tests/vis/test_tools.py
(visualize, analyze_offsets), tests/vis/test_paper_figures.py (paper_figures), tests/tools/test_import_and_predict.py (predict) and
tests/tools/test_train_eval.py (eval, which reproduces a training run's metrics).
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

from tests.engine.crafted import VARIANTS, write_variant

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("eval", "predict", "visualize", "analyze_offsets", "paper_figures")
# The data-config variant only where a tool reads the data config (the others refuse it too,
# on loading, as tests/engine/test_checkpoint_safety.py checks).
CASES = [(tool, name) for name in sorted(VARIANTS) for tool in TOOLS
         if name != "data_config_target" or tool in ("eval", "analyze_offsets", "paper_figures")]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An image and a one-image COCO annotation file (what the tools need besides the checkpoint)."""
    folder = tmp_path_factory.mktemp("inputs")
    images = folder / "images"
    images.mkdir()
    cv2.imwrite(str(images / "1.png"), np.full((80, 100, 3), 127, np.uint8))
    annotations = folder / "instances.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png", "height": 80, "width": 100}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return images / "1.png", images, annotations


def command(tool: str, checkpoint: Path, out: Path, inputs) -> list[str]:
    image, images, annotations = inputs
    args = {"eval": ["num_workers=0"],
            "predict": [f"input={image}", f"output={out / 'preds.json'}"],
            "visualize": [f"input={image}", f"output={out / 'picture.png'}"],
            "analyze_offsets": [f"images={images}", f"annotations={annotations}", f"output={out / 'stats.json'}"],
            "paper_figures": [f"images={images}", f"annotations={annotations}", f"output_dir={out / 'figures'}"]}
    return [sys.executable, str(REPO / "tools" / f"{tool}.py"), f"checkpoint={checkpoint}", "device=cpu",
            f"hydra.run.dir={out / 'run'}", *args[tool]]


@pytest.mark.parametrize("tool, name", CASES)
def test_tool_refuses_crafted_checkpoint(tool, name, inputs, tmp_path):
    variant = VARIANTS[name]
    planted = tmp_path / "planted"          # where the payloads would write
    planted.mkdir()
    marker = planted / "marker"
    checkpoint = write_variant(tmp_path / f"{name}.pth", variant, marker)
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "TORCH_EXTENSIONS_DIR": str(extensions),
           "DETKIT_CACHE": str(tmp_path / "cache"), "DETKIT_CRAFTED_NORM": "frozen_bn"}
    out = tmp_path / "out"
    result = subprocess.run(command(tool, checkpoint, out, inputs), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]], result.stderr[-3000:]     # exactly one line of error text
    error = lines[-1]
    assert error.startswith(f"error: {checkpoint}: refused {variant.key_path}: "), error
    assert variant.names in error, error
    assert "Traceback" not in result.stderr
    assert not marker.exists() and list(planted.iterdir()) == []
    assert list(extensions.iterdir()) == [], "something was compiled"
    assert not (out / "run" / "metrics.json").exists() and not (out / "preds.json").exists()
