"""evaluate_detector's progress bar: on stderr when it is a terminal, on rank 0 only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from detkit.data.coco import CocoDetection
from detkit.data.synthetic import generate_synthetic_coco
from detkit.data.transforms import ToTensor
from detkit.utils import comm as dist
from detkit.evaluation.evaluate import evaluate_detector

from tests.helpers import FakeTerminal


class _NoDetections(nn.Module):
    def forward(self, images):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> CocoDetection:
    paths = generate_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=1, num_val=3, image_size=(64, 80),
                                    seed=0, workers=1, min_object_size=8, max_object_size=30)
    return CocoDetection(paths["val_images"], paths["val_annotations"], ToTensor())


def test_no_bar_when_stderr_is_not_a_terminal(val_set, capsys):
    metrics, _ = evaluate_detector(_NoDetections(), val_set, "cpu")
    assert metrics["bbox/AP"] == 0.0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("main_process", [True, False])
def test_bar_on_a_terminal_on_rank_0_only(val_set, monkeypatch, main_process):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(dist, "is_main_process", lambda: main_process)
    metrics, _ = evaluate_detector(_NoDetections(), val_set, "cpu")
    if main_process:
        assert "evaluation:" in terminal.text and "0/3" in terminal.text and metrics is not None  # 3 batches
    else:
        assert terminal.text == "" and metrics is None
