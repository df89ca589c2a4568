"""tools/train.py under torchrun with two gloo processes: the run folder it writes, and a run
killed (SIGKILL to torchrun and both workers) after a checkpoint and resumed, which must end
bit for bit where the uninterrupted two-process run ends (weights, optimizer state, metrics).

Every run gets OMP_NUM_THREADS=1 and a private DETKIT_CACHE, as in test_train_eval.py.
(Equivalence of two processes with one process at the same global batch:
tests/engine/test_ddp_equivalence.py.)
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detkit.engine.checkpoint import load_model

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "tools" / "train.py")
SUMMARY = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")
ITERS = 6  # configs/experiment/smoke.yaml: schedule.max_iters
# A checkpoint every 2 iterations: the kill lands after the first (2) and leaves several
# iterations to replay.
OVERRIDES = ("experiment=smoke", "checkpoint_period=2")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("detkit_cache")
    return {**os.environ, "DETKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def torchrun(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
            *OVERRIDES, f"hydra.run.dir={run_dir}", *overrides]


def run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp_full")
    result = run(torchrun(work / "run"), env, work)
    return result, work / "run", work


def test_two_process_run_folder(uninterrupted):
    result, run_dir, work = uninterrupted
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p.relative_to(work) for p in work.rglob("*") if p.is_file()]
    assert [p for p in files if p.name == "metrics.json"] == [Path("run/metrics.json")]
    assert len([p for p in files if p.name.startswith("events.out.tfevents")]) == 1
    assert [p for p in files if p.suffix == ".pth"] == [Path("run/checkpoints/last.pth")]
    assert len([p for p in files if p.name == "config.yaml" and p.parent.name == ".hydra"]) == 1
    assert not (work / "outputs").exists()
    log = (run_dir / "train.log").read_text()
    assert log.count(f"iter {ITERS}/{ITERS} ") == 1  # rank 0 logs, once
    assert "(1 per process x 2)" in log
    metrics = read_metrics(run_dir)
    assert metrics["iteration"] == ITERS
    assert all(metrics[k] is None or 0 <= metrics[k] <= 100 for k in SUMMARY)
    _, checkpoint = load_model(run_dir / "checkpoints" / "last.pth")
    assert checkpoint["data"]["world_size"] == 2 and len(checkpoint["rng"]) == 2
    # The two ranks' sampling streams differ (seed + rank): the second state is not a copy.
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])


def _kill_after_first_checkpoint(args: list[str], env: dict, cwd: Path, checkpoint: Path) -> None:
    """Start the run, SIGKILL torchrun and its workers as soon as a checkpoint exists."""
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert process.poll() is None, f"the run ended before its first checkpoint: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
    finally:
        # torchrun starts its workers in sessions of their own: kill each by its id.
        family = _descendants(process.pid)
        for pid in [*family, process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert len(family) >= 2  # the two workers
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in family):
        assert time.monotonic() < deadline, "a worker survived SIGKILL"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "X"


def _descendants(root: int) -> list[int]:
    """Every live descendant of process `root` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_killed_and_resumed_two_process_run_ends_where_the_uninterrupted_one_ends(uninterrupted, env, tmp_path):
    result, full_dir, _ = uninterrupted
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pth"
    _kill_after_first_checkpoint(torchrun(run_dir), env, tmp_path, checkpoint)
    killed_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 2 <= killed_at < ITERS and killed_at % 2 == 0
    assert not (run_dir / "metrics.json").exists()

    resumed = run(torchrun(run_dir, "resume=true"), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at iteration {killed_at}" in (run_dir / "train.log").read_text()

    full = torch.load(full_dir / "checkpoints" / "last.pth", weights_only=True)
    done = torch.load(checkpoint, weights_only=True)
    assert done["iteration"] == full["iteration"] == ITERS
    assert full["model"].keys() == done["model"].keys()
    for key in full["model"]:
        assert torch.equal(full["model"][key], done["model"][key]), key
    assert full["optimizer"]["state"].keys() == done["optimizer"]["state"].keys()
    for a, b in zip(full["optimizer"]["state"].values(), done["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert full["scheduler"] == done["scheduler"]
    assert read_metrics(run_dir) == read_metrics(full_dir)
    assert (json.loads((run_dir / "detections.json").read_text())
            == json.loads((full_dir / "detections.json").read_text()))
