"""tools/export_backbone.py: a detkit checkpoint's backbone, written in torchvision's format,
initialises another detector's backbone (deformable blocks included). A one-shot Hydra app:
nothing is written into the working folder (no outputs/, .hydra/ or log file)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from detkit.engine.checkpoint import save_checkpoint
from detkit.modeling.backbone.resnet import ResNet, load_torchvision_weights
from detkit.ops import DeformConv2d

EXPORT = str(Path(__file__).resolve().parents[2] / "tools" / "export_backbone.py")


def run(cwd: Path, checkpoint: Path, output: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, EXPORT, f"checkpoint={checkpoint}", f"output={output}"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_exported_backbone_loads_into_a_deformable_resnet(tmp_path):
    torch.manual_seed(3)
    source = ResNet(depth=18, width=8, norm="bn")
    for p in source.parameters():
        p.data.normal_()
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["rpn.head.conv.weight"] = torch.zeros(1)                      # not part of the backbone
    save_checkpoint(tmp_path / "last.pth", {"model": state, "model_config": {}})
    result = run(tmp_path / "work", tmp_path / "last.pth", tmp_path / "backbone.pth")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'backbone.pth'} ({len(source.state_dict())} tensors)"
    assert list((tmp_path / "work").iterdir()) == []
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert set(exported) == set(source.state_dict())

    target = ResNet(depth=18, width=8, norm="frozen_bn", deform_blocks={"res5": "all"})
    load_torchvision_weights(target, tmp_path / "backbone.pth")
    deformable = [m for m in target.modules() if isinstance(m, DeformConv2d)]
    assert len(deformable) == 2
    torch.testing.assert_close(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    assert all(not m.offset_branch.weight.detach().any() for m in deformable)   # offsets start at zero


def test_errors_are_one_line(tmp_path):
    torch.save({"weights": 1}, tmp_path / "plain.pth")
    save_checkpoint(tmp_path / "headless.pth", {"model": {"rpn.x": torch.zeros(1)}})
    for name, message in [("missing.pth", "checkpoint not found"),
                          ("plain.pth", "is not a detkit checkpoint"),
                          ("headless.pth", "has no backbone.* weights")]:
        result = run(tmp_path / "work", tmp_path / name, tmp_path / "out.pth")
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out.pth").exists()
        assert list((tmp_path / "work").iterdir()) == []


def test_arguments_are_checked_in_one_line(tmp_path):
    """Hydra-style arguments: a missing one or an unknown key is one line, exit status 2."""
    work = tmp_path / "work"
    work.mkdir()
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    for args, message in [([f"checkpoint={a}"], "no value for output"),
                          ([f"checkpoint={a}", f"output={b}", "outptu=x"], "outptu"),
                          ([str(a), str(b)], "arguments are key=value")]:     # the old positional form
        result = subprocess.run([sys.executable, EXPORT, *args], cwd=work, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert list(work.iterdir()) == []
