"""tools/export_onnx.py + tools/predict_onnx.py: the JSON of tools/predict.py, from onnxruntime."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import onnxruntime  # noqa: F401  (a test dependency, pyproject.toml [test]: never skipped)
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.engine.checkpoint import save_checkpoint
from detkit.evaluation.inference import list_images, predict_files
from tests.export.test_detector_onnx import BOX_TOL, SCORE_TOL, make_trained_like, synthetic_val_images
from tests.helpers import one_to_one

REPO = Path(__file__).resolve().parents[2]
LABELS = {label: 100 + label for label in range(1, 9)}

CONFIG = {
    "_target_": "detkit.modeling.build.build_faster_rcnn", "num_classes": 9, "layout": "fpn",
    "pooler_kind": "mdeform", "pooler_sampling_ratio": 2, "fpn_channels": 16, "representation_size": 32,
    "deform_hidden_dim": 32,
    "backbone": {"_target_": "detkit.modeling.build.build_resnet", "depth": 18, "width": 8, "norm": "bn",
                 "freeze_at": 0, "deform_blocks": {"res4": "all", "res5": "all"}, "deform_kind": "dcnv2"},
    "transform_options": {"min_size": 192, "max_size": 320},
    "rpn_options": {"pre_nms_top_n_test": 200, "post_nms_top_n_test": 100},
    "roi_heads_options": {"score_thresh": 0.05, "detections_per_img": 30},
}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_tools")
    torch.manual_seed(0)
    model = make_trained_like(instantiate(OmegaConf.create(CONFIG), _convert_="all"))
    checkpoint = tmp / "model.pth"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "model_config": CONFIG,
                                 "label_to_category_id": LABELS, "class_names": {k: f"c{k}" for k in LABELS}})
    images = tmp / "images"
    images.mkdir()
    for i, image in enumerate(synthetic_val_images(3)):
        rgb = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        cv2.imwrite(str(images / f"{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return model, checkpoint, images, tmp


def test_export_then_predict_writes_predict_json(setup, tmp_path):
    model, checkpoint, images, _ = setup
    onnx_path = tmp_path / "model.onnx"
    result = run_tool("tools/export_onnx.py", f"checkpoint={checkpoint}", f"output={onnx_path}",
                      f"hydra.run.dir={tmp_path / 'run1'}")
    assert result.returncode == 0, result.stderr
    assert onnx_path.is_file() and "opset 19" in result.stdout and "DeformConv" in result.stdout
    output = tmp_path / "preds.json"
    result = run_tool("tools/predict_onnx.py", f"onnx={onnx_path}", f"input={images}", f"output={output}",
                      f"hydra.run.dir={tmp_path / 'run2'}")
    assert result.returncode == 0, result.stderr
    ours = json.loads(output.read_text())
    # What tools/predict.py writes: predict_files over the same files with the PyTorch model.
    expected = list(predict_files(model, list_images(images), LABELS, "cpu", 1, images))
    assert len(ours) == len(expected) > 0
    assert set(ours[0]) == set(expected[0]) == {"file_name", "category_id", "bbox", "score"}
    # Paired one to one: same file and category, x, y within BOX_TOL (w, h, differences of two
    # corners, within twice that), scores within SCORE_TOL (test_detector_onnx.py's measured ones).
    bbox_tol = torch.tensor([BOX_TOL, BOX_TOL, 2 * BOX_TOL, 2 * BOX_TOL], dtype=torch.float64)
    compatible = torch.tensor([[g["file_name"] == e["file_name"] and g["category_id"] == e["category_id"]
                                and bool(((torch.tensor(g["bbox"], dtype=torch.float64) - torch.tensor(e["bbox"], dtype=torch.float64)).abs() <= bbox_tol).all())
                                and abs(g["score"] - e["score"]) <= SCORE_TOL
                                for g in ours] for e in expected])
    assert len(one_to_one(compatible)) == len(expected)


def test_export_refusal_is_one_line_and_writes_nothing(setup, tmp_path):
    _, checkpoint, _, _ = setup
    onnx_path = tmp_path / "never.onnx"
    result = run_tool("tools/export_onnx.py", f"checkpoint={checkpoint}", f"output={onnx_path}", "opset=18",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: opset 18 is not supported")
    assert "backbone.layer3.0.conv2" in lines[0]
    assert not onnx_path.exists()
