"""tools/import_torchvision.py + tools/predict.py reproduce torchvision's detections."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from detkit.engine.checkpoint import load_model
from detkit.evaluation.inference import read_image
from tests.helpers import one_to_one

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def write_images(folder: Path) -> list[Path]:
    """Two smooth random colour images of different sizes (detections need structure, not noise)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in (("a.png", (120, 160)), ("b.png", (150, 110))):
        small = rng.integers(0, 256, size=(h // 10, w // 10, 3)).astype(np.uint8)
        image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / name), image)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def torchvision_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    # Built the way torchvision builds its COCO model (frozen BN, 3 trainable stages), so the
    # weights are exactly what a COCO_V1 weights file holds, with random values.
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    reference = FasterRCNN(backbone, num_classes=91).eval()
    with torch.no_grad():  # random weights made confident: scores spread over (0.05, 1], few ties
        reference.roi_heads.box_predictor.cls_score.weight.mul_(3)
    src, dst = tmp / "torchvision.pth", tmp / "imported.pth"
    torch.save(reference.state_dict(), src)
    result = run_tool("tools/import_torchvision.py", f"src={src}", f"dst={dst}")
    assert result.returncode == 0, result.stderr
    return reference, dst, write_images(tmp / "images")


@pytest.mark.slow
def test_predict_tool_matches_torchvision(torchvision_setup, tmp_path):
    reference, checkpoint, images = torchvision_setup
    output = tmp_path / "preds.json"
    result = run_tool("tools/predict.py", f"checkpoint={checkpoint}", f"input={images[0].parent}",
                      f"output={output}", f"hydra.run.dir={tmp_path / 'run'}",
                      "device=cpu" if torch.cuda.is_available() else "device=auto")  # auto: the CPU here
    assert result.returncode == 0, result.stderr
    predictions = json.loads(output.read_text())

    # One image per call, as predict.py runs by default: in a batch, images are padded to a
    # common size and border features then depend on the other images.
    with torch.inference_mode():
        expected = [reference([torchvision.io.read_image(str(p)).float() / 255])[0] for p in images]
    for path, exp in zip(images, expected):
        ours = [p for p in predictions if p["file_name"] == path.name]
        assert len(ours) == len(exp["scores"]) > 0
        exp_xywh = torch.cat([exp["boxes"][:, :2], exp["boxes"][:, 2:] - exp["boxes"][:, :2]], 1)
        got_xywh = torch.tensor([p["bbox"] for p in ours], dtype=torch.float32)
        got_scores = torch.tensor([p["score"] for p in ours])
        got_labels = torch.tensor([p["category_id"] for p in ours])
        # Detection i matches expected detection j when its box (to 0.05 px), score (to 1e-3)
        # and label all agree; equal scores may be listed in either order, so the pairing is
        # found as a bipartite matching, and every detection must get its own partner.
        compatible = (((got_xywh[:, None] - exp_xywh[None]).abs().amax(-1) < 0.05)
                      & ((got_scores[:, None] - exp["scores"][None]).abs() < 1e-3)
                      & (got_labels[:, None] == exp["labels"][None]))
        pairs = one_to_one(compatible)
        assert len(pairs) == len(ours), (
            f"{path.name}: only {len(pairs)} of {len(ours)} detections have their own torchvision partner")
        assert sorted(j for _, j in pairs) == list(range(len(ours)))


def test_one_to_one_matching_refuses_many_to_one():
    # Two detections compatible only with the same expected one: one of them has no partner.
    assert len(one_to_one(torch.tensor([[True, False], [True, False]]))) == 1
    # A matching that needs re-pairing (0 first takes 0, then moves to 1 for 1's sake).
    assert one_to_one(torch.tensor([[True, True], [True, False]])) == [(0, 1), (1, 0)]


def test_imported_checkpoint_rebuilds_the_torchvision_model(torchvision_setup):
    reference, checkpoint, _ = torchvision_setup
    model, state = load_model(checkpoint)
    ours = dict(model.state_dict())
    theirs = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(ours) == len(theirs)
    renamed = {k.replace("backbone.body.", "backbone.", 1).replace("backbone.fpn.", "neck.fpn.", 1): v
               for k, v in theirs.items()}
    for key, value in renamed.items():
        assert torch.equal(ours[key], value), key
    assert state["label_to_category_id"][1] == 1 and len(state["label_to_category_id"]) == 90
    assert state["class_names"][1] == "person"


def test_import_rejects_weights_that_do_not_fit(tmp_path):
    torch.manual_seed(0)
    small = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                 num_classes=5)
    src = tmp_path / "five_classes.pth"
    torch.save(small.state_dict(), src)
    result = run_tool("tools/import_torchvision.py", f"src={src}", f"dst={tmp_path / 'out.pth'}")
    assert result.returncode == 2
    assert "roi_heads.box_predictor.cls_score.weight" in result.stderr and "shape" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_tool_reports_bad_input_in_one_line(torchvision_setup, tmp_path):
    _, checkpoint, _ = torchvision_setup
    missing = run_tool("tools/predict.py", f"checkpoint={checkpoint}", f"input={tmp_path / 'nothing'}",
                       f"hydra.run.dir={tmp_path / 'run1'}")
    assert missing.returncode == 2 and "neither an image file nor a folder" in missing.stderr
    bad_ckpt = tmp_path / "bad.pth"
    bad_ckpt.write_bytes(b"not a checkpoint")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.full((8, 8, 3), 128, np.uint8))
    broken = run_tool("tools/predict.py", f"checkpoint={bad_ckpt}", f"input={image}",
                      f"hydra.run.dir={tmp_path / 'run2'}")
    assert broken.returncode == 2 and "is not a detkit checkpoint: not a PyTorch archive" in broken.stderr
    assert "Traceback" not in broken.stderr
    unknown = run_tool("tools/predict.py", f"checkpoint={checkpoint}", f"input={image}", "no_such_key=1",
                       f"hydra.run.dir={tmp_path / 'run3'}")
    assert unknown.returncode == 2 and "no_such_key" in unknown.stderr
    bad_device = run_tool("tools/predict.py", f"checkpoint={checkpoint}", f"input={image}", "device=tpu",
                          f"hydra.run.dir={tmp_path / 'run4'}")
    assert bad_device.returncode == 2 and "device must be auto, cpu, cuda or cuda:N; got 'tpu'" in bad_device.stderr
    assert "Traceback" not in bad_device.stderr
    for result in (missing, broken, unknown, bad_device):  # the promised one line on stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_read_image_errors_name_the_file(tmp_path):
    bogus = tmp_path / "bogus.png"
    bogus.write_text("not an image")
    with pytest.raises(ValueError, match="bogus.png"):
        read_image(bogus)
