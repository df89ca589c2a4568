"""Two gloo processes train what one process trains with the same global batch.

tests/engine/ddp_worker.py runs a few steps of detkit's loop (Trainer, optimizer with
offset-branch multipliers, schedule, gradient clipping, DistributedDataParallel as
detkit.engine.trainer.train wraps it) on a tiny modulated-deformable model with GroupNorm,
once as one process and once under torchrun as two. Its losses are per-image means and
GroupNorm does not see the batch, so the runs differ only by floating-point summation
order; in float64 that is far below the tolerance used here for the weights (rtol 1e-9,
atol 1e-12; the losses the loop reports are float32: rtol 1e-6), while one process training
on rank 0's share alone (what a missing gradient all-reduce would give) ends 5e-2 away
(measured 2026-12-07).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    work = tmp_path_factory.mktemp("ddp")
    _run([sys.executable, str(WORKER), str(work / "one.pt")], work)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          str(work / "two.pt")], work)
    return {1: torch.load(work / "one.pt", weights_only=True), 2: torch.load(work / "two.pt", weights_only=True)}


def test_two_processes_end_where_one_process_ends(runs):
    one, two = runs[1], runs[2]
    assert one["world"] == 1 and two["world"] == 2
    assert one["final"].keys() == two["final"].keys()
    for name in one["final"]:
        assert one["final"][name].dtype == torch.float64, name
        torch.testing.assert_close(two["final"][name], one["final"][name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The losses the loop reports (averaged over the processes) are the one-process losses.
    # (The loop reports them as float32.)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)


def test_the_comparison_is_not_vacuous(runs):
    """Every parameter, offset branches included, moved far more than the tolerance."""
    one = runs[1]
    moved = {name: float((one["final"][name] - one["initial"][name]).abs().max())
             for name in one["final"] if one["final"][name].is_floating_point()}
    assert len(moved) >= 10
    assert all(v > 1e-4 for v in moved.values()), moved
    losses = torch.tensor(one["losses"])
    assert losses.shape == (5, 2) and torch.isfinite(losses).all()
