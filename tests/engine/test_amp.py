"""Mixed precision in detkit's loop, on the CPU (torch autocasts bfloat16 and float16 there and
has a CPU GradScaler), so the logic is covered without a GPU.

- amp=bf16: the step runs under CPU autocast (a Linear computes in bfloat16, detkit's
  deformable conv stays float32 as csrc/autocast.cpp promises), weights stay float32, and the
  update is the float32 update up to bfloat16 rounding.
- amp=fp16: the GradScaler path; a step whose gradients are inf is skipped (weights and
  momentum unchanged, scale halved) and training goes on; the scale grows back after
  `growth_interval` good steps; the scaler's state is checkpointed and a resumed run ends
  bit for bit where the uninterrupted one ends.
- tools/train.py accepts amp on the CPU (it used to refuse: "needs a CUDA device").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detkit.engine.hooks import CheckpointHook
from detkit.engine.loop import Hook, Trainer
from detkit.engine.state import resume_training_state
from detkit.ops import DeformConv2d
from tests.helpers import assert_close_scaled


class _InfGradient(torch.autograd.Function):
    """Identity forward; an inf gradient backward (an fp16 overflow, on demand)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class AmpNet(nn.Module):
    """A modulated deformable conv and a Linear; records the dtypes its layers computed in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = DeformConv2d(3, 4, 3, padding=1, modulated=True)
        with torch.no_grad():
            self.conv.offset_branch.weight.normal_(0, 0.2)
        self.fc = nn.Linear(4 * 6 * 7, 2)
        self.poison = False
        self.dtypes: dict[str, torch.dtype] = {}

    def forward(self, images, targets):
        features = self.conv(torch.stack(images))
        out = self.fc(features.flatten(1))
        self.dtypes = {"conv": features.dtype, "fc": out.dtype}
        if self.poison:
            out = _InfGradient.apply(out)
        target = torch.stack([t["y"] for t in targets])
        return {"loss_mse": F.mse_loss(out.float(), target)}


def batches(count: int = 8):
    gen = torch.Generator().manual_seed(5)
    return [([torch.randn(3, 6, 7, generator=gen) for _ in range(2)],
             [{"y": torch.randn(2, generator=gen)} for _ in range(2)]) for _ in range(count)]


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def constant(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class Poison(Hook):
    """Makes the backward of the given (1-based) iterations produce inf gradients; records
    the scale after each step."""

    def __init__(self, model: AmpNet, iterations: set[int], scaler=None) -> None:
        self.model, self.iterations, self.scaler, self.scales = model, iterations, scaler, []

    def before_train(self, state) -> None:
        self.model.poison = state.iteration + 1 in self.iterations

    def after_step(self, state) -> None:
        self.model.poison = state.iteration + 1 in self.iterations
        if self.scaler is not None:
            self.scales.append(self.scaler.get_scale())


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_bf16_autocast_step_on_cpu():
    model, reference = AmpNet(), AmpNet()
    start = params(model)
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    Trainer(model, optimizer, constant(optimizer), batches(), "cpu", amp_dtype=torch.bfloat16).train(0, 1)
    Trainer(reference, ref_optimizer, constant(ref_optimizer), batches(), "cpu").train(0, 1)
    assert model.dtypes == {"conv": torch.float32, "fc": torch.bfloat16}  # autocast was on
    assert reference.dtypes == {"conv": torch.float32, "fc": torch.float32}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        update, ref_update = p.detach() - start[name], reference.get_parameter(name).detach() - start[name]
        assert ref_update.abs().max() > 0, name
        # bfloat16 keeps 8 significant bits: its updates match to a few percent of their scale.
        assert_close_scaled(update, ref_update, 0.05, name)
    assert not all(torch.equal(p.detach(), reference.get_parameter(n).detach())
                   for n, p in model.named_parameters())


def test_fp16_grad_scaler_skips_inf_steps_and_regrows_on_cpu():
    model = AmpNet()
    optimizer = sgd(model)
    scheduler = constant(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    snapshots = []

    class Snapshot(Hook):
        def after_step(self, state):
            snapshots.append((params(model), {k: optimizer.state[p]["momentum_buffer"].clone()
                                              for k, p in model.named_parameters()}))

    poison = Poison(model, {3}, scaler)
    state = Trainer(model, optimizer, scheduler, batches(), "cpu", scaler=scaler, amp_dtype=torch.float16,
                    hooks=[poison, Snapshot()]).train(0, 5)
    assert model.dtypes["fc"] == torch.float16 and model.dtypes["conv"] == torch.float32
    assert state.iteration == 5 and scheduler.last_epoch == 5  # the loop went on, the schedule too
    # Steps 1, 2 good: the scale doubles after 2; step 3 inf: skipped, halved; 4, 5 good: doubles.
    assert poison.scales == [2.0 ** 12, 2.0 ** 13, 2.0 ** 12, 2.0 ** 12, 2.0 ** 13]
    (w2, m2), (w3, m3), (w4, _) = snapshots[1], snapshots[2], snapshots[3]
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "the inf step changed the weights"
    assert all(torch.equal(m2[k], m3[k]) for k in m2), "the inf step changed the momentum"
    assert any(not torch.equal(w3[k], w4[k]) for k in w3), "the step after it did not train"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _checkpointed_run(tmp_path: Path, stop: int, total: int, poisoned: set[int]):
    """Run to `stop` with checkpoints every 2 iterations, then a fresh model / optimizer /
    scheduler / scaler resumed from the checkpoint runs to `total`."""
    def parts():
        model = AmpNet()
        optimizer = sgd(model)
        return model, optimizer, constant(optimizer), torch.amp.GradScaler("cpu", init_scale=2.0 ** 12,
                                                                             growth_interval=2)

    path = tmp_path / "last.pth"
    model, optimizer, scheduler, scaler = parts()
    hook = CheckpointHook(path, 2, model, optimizer, scheduler, scaler, data_state={"seed": 0})
    Trainer(model, optimizer, scheduler, batches(), "cpu", scaler=scaler, amp_dtype=torch.float16,
            hooks=[Poison(model, poisoned), hook]).train(0, stop)
    saved = torch.load(path, weights_only=True)
    model, optimizer, scheduler, scaler = parts()
    start = resume_training_state(path, model, optimizer, scheduler, scaler, {"seed": 0})
    assert start == stop
    Trainer(model, optimizer, scheduler, batches()[start:], "cpu", scaler=scaler, amp_dtype=torch.float16,
            hooks=[Poison(model, poisoned)]).train(start, total)
    return model, scaler, saved


def test_fp16_scaler_state_is_checkpointed_and_resumed(tmp_path):
    poisoned = {2, 5}
    full_model = AmpNet()
    optimizer = sgd(full_model)
    full_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    Trainer(full_model, optimizer, constant(optimizer), batches(), "cpu", scaler=full_scaler,
            amp_dtype=torch.float16, hooks=[Poison(full_model, poisoned)]).train(0, 6)

    model, scaler, saved = _checkpointed_run(tmp_path, 4, 6, poisoned)
    # The checkpoint holds a non-default scaler state (halved at 2, regrown at 4).
    assert saved["grad_scaler"]["scale"] == 2.0 ** 12 and saved["grad_scaler"]["_growth_tracker"] == 0
    assert scaler.state_dict() == full_scaler.state_dict()
    assert scaler.get_scale() == 2.0 ** 11  # halved again by the inf step 5 after the resume
    for name, p in full_model.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name


def test_amp_on_cpu_trains_through_the_tool(tmp_path):
    """tools/train.py with amp=fp16 on the CPU: CPU autocast and a CPU GradScaler whose
    state lands in the checkpoint (the tool used to refuse amp without CUDA)."""
    env = {**os.environ, "DETKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    run_dir = tmp_path / "run"
    tool = Path(__file__).resolve().parents[2] / "tools" / "train.py"
    result = subprocess.run([sys.executable, str(tool), "experiment=smoke", "device=cpu", "amp=fp16",
                             "schedule.max_iters=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "amp fp16" in (run_dir / "train.log").read_text()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
    assert checkpoint["iteration"] == 2 and checkpoint["grad_scaler"]["scale"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == 2
