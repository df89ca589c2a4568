"""What clusters and full disks do to the tools, in real subprocesses on the smoke experiment:

- preemption: a real signal to a training process (and, under torchrun with two gloo
  processes, to one worker only) after its first iteration: it finishes the step, writes the
  checkpoint of that iteration, says so in one line and exits with status 4; `resume=true`
  then ends bit for bit where an uninterrupted run ends (weights, optimizer, metrics,
  detections). Checkpoints are written only at the end otherwise (checkpoint_period=0), so
  the preemption's checkpoint is the only one mid-run.
- a full disk (ENOSPC injected into the checkpoint's or the detections' temporary file by
  tests/tools/faultinject/sitecustomize.py) and an unwritable folder: one line naming the
  file, the error and what is kept, exit status 2, no traceback, no partial file;
- a file that is not a checkpoint, and an unreadable image in a predicted folder.

Every run gets OMP_NUM_THREADS=1 and a private DETKIT_CACHE, as in test_train_eval.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "tools" / "train.py")
EVAL = str(REPO / "tools" / "eval.py")
PREDICT = str(REPO / "tools" / "predict.py")
FAULTS = str(Path(__file__).resolve().parent / "faultinject")
ITERS = 6  # configs/experiment/smoke.yaml: schedule.max_iters
OVERRIDES = ("experiment=smoke", "log_period=1", "checkpoint_period=0")
STOPPED = 4  # detkit.engine.preemption.EXIT_STOPPED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("detkit_cache")
    return {**os.environ, "DETKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def faulty(env: dict, **faults: str) -> dict:
    """`env` with the fault injection on (DETKIT_FAULT_ENOSPC / DETKIT_FAULT_READONLY)."""
    path = os.pathsep.join([FAULTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, "PYTHONPATH": path, **{f"DETKIT_FAULT_{k.upper()}": v for k, v in faults.items()}}


def run(args: list[str], env: dict, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, TRAIN, *OVERRIDES, f"hydra.run.dir={run_dir}", *overrides]


def torchrun_args(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
            *OVERRIDES, f"hydra.run.dir={run_dir}", *overrides]


def no_partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


def assert_one_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert any(expected in line for line in stderr.splitlines()), stderr[-3000:]


def assert_same_end(run_dir: Path, full_dir: Path) -> None:
    full = torch.load(full_dir / "checkpoints" / "last.pth", weights_only=True)
    done = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
    assert done["iteration"] == full["iteration"] == ITERS
    assert full["model"].keys() == done["model"].keys()
    for key in full["model"]:
        assert torch.equal(full["model"][key], done["model"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), done["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert full["scheduler"] == done["scheduler"]
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((full_dir / "metrics.json").read_text())
    assert (json.loads((run_dir / "detections.json").read_text())
            == json.loads((full_dir / "detections.json").read_text()))


@pytest.fixture(scope="module")
def full(env, tmp_path_factory):
    """An uninterrupted single-process run."""
    work = tmp_path_factory.mktemp("full")
    result = run(train_args(work / "run"), env, work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def wait_for_iteration(process: subprocess.Popen, run_dir: Path, iteration: int = 1) -> None:
    deadline = time.monotonic() + 300
    log = run_dir / "train.log"
    while not (log.exists() and f"iter {iteration}/{ITERS} " in log.read_text()):
        assert process.poll() is None, f"the run ended early: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no progress line after 300 s"
        time.sleep(0.02)


def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_ends(
        full, env, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pth"
    process = subprocess.Popen(train_args(run_dir), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iteration(process, run_dir)
        process.send_signal(signal.SIGUSR1)      # SLURM's requeue signal
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)      # a second one, while the checkpoint may be written
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == STOPPED, stderr[-3000:]
    stopped_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 1 <= stopped_at <= ITERS
    line = (f"stopped by SIGUSR1 at iteration {stopped_at} of {ITERS}: checkpoint {checkpoint} "
            f"(iteration {stopped_at}) written; resume=true continues")
    assert_one_line(stderr, line)
    assert line in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.json").exists() and not no_partial_files(run_dir)

    resumed = run(train_args(run_dir, "resume=true"), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at iteration {stopped_at}" in (run_dir / "train.log").read_text()
    assert_same_end(run_dir, full)


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _rank_of(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"RANK="):
                return int(entry[5:])
    return None


def test_under_torchrun_a_signal_to_one_worker_stops_both_at_the_same_iteration(env, tmp_path):
    full_dir = tmp_path / "full"
    uninterrupted = run(torchrun_args(full_dir), env, tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pth"
    process = subprocess.Popen(torchrun_args(run_dir), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_iteration(process, run_dir)
        ranks = {_rank_of(pid): pid for pid in _descendants(process.pid)}
        os.kill(ranks[1], signal.SIGTERM)        # rank 1 only: rank 0 must stop with it
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            for pid in [*_descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert process.returncode != 0          # torchrun reports its failed workers
    assert f"exitcode  : {STOPPED}" in stderr or f"exit code {STOPPED}" in stderr or "exitcode" in stderr, \
        stderr[-3000:]
    stopped_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 1 <= stopped_at <= ITERS
    log = (run_dir / "train.log").read_text()
    assert log.count("stopped by SIGTERM at iteration") == 1          # rank 0 says it, once
    assert f"stopped by SIGTERM at iteration {stopped_at} of {ITERS}" in log
    assert log.count("saved checkpoint") == 0 or f"(iteration {stopped_at})" in log
    assert not no_partial_files(run_dir) and not (run_dir / "metrics.json").exists()

    resumed = run(torchrun_args(run_dir, "resume=true"), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at iteration {stopped_at}" in (run_dir / "train.log").read_text()
    assert_same_end(run_dir, full_dir)


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(env, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pth"
    # The checkpoint of iteration 3 is written, the disk is full at the one of iteration 6.
    result = run(train_args(run_dir, "checkpoint_period=3"), faulty(env, enospc=".last.pth.*.tmp@1"), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_line(result.stderr, f"error: cannot write {checkpoint}: No space left on device; "
                                   f"the checkpoint of iteration 3 ({checkpoint}) is kept")
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 3
    assert not no_partial_files(run_dir) and not (run_dir / "metrics.json").exists()


def test_unwritable_checkpoint_folder(env, tmp_path):
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    folder.chmod(0o555)           # read-only for a user; root is stopped by the injected EACCES
    try:
        result = run(train_args(run_dir, "checkpoint_period=3"), faulty(env, readonly=str(folder)), tmp_path)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_line(result.stderr, f"error: cannot write {folder / 'last.pth'}: Permission denied; "
                                   f"no checkpoint was written")
    assert list(folder.iterdir()) == []


def test_eval_on_a_full_disk_and_on_a_file_that_is_not_a_checkpoint(full, env, tmp_path):
    out = tmp_path / "eval"
    result = run([sys.executable, EVAL, f"checkpoint={full / 'checkpoints' / 'last.pth'}", f"hydra.run.dir={out}",
                  "num_workers=0"], faulty(env, enospc=".detections.json.*.tmp"), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_line(result.stderr, f"error: cannot write {out / 'detections.json'}: No space left on device; "
                                   f"nothing was written")
    assert not (out / "detections.json").exists() and not no_partial_files(out)

    text = tmp_path / "hostname"
    text.write_text("myhost\n")
    result = run([sys.executable, EVAL, f"checkpoint={text}", f"hydra.run.dir={tmp_path / 'eval2'}"], env, tmp_path)
    assert result.returncode == 2
    assert_one_line(result.stderr, f"error: {text} is not a detkit checkpoint: not a PyTorch archive")
    assert "weights_only" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_predict_skip_unreadable_and_unwritable_output(full, env, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    val = sorted((Path(env["DETKIT_CACHE"]) / "synthetic_smoke" / "val").glob("*.jpg"))[:2]
    assert val, "no smoke val images"
    for path in val:
        shutil.copy(path, images / path.name)
    (images / "broken.png").write_bytes(b"not an image")
    checkpoint = full / "checkpoints" / "last.pth"
    base = [sys.executable, PREDICT, f"checkpoint={checkpoint}", f"input={images}"]

    stop = run([*base, f"output={tmp_path / 'a.json'}", f"hydra.run.dir={tmp_path / 'p1'}"], env, tmp_path)
    assert stop.returncode == 2
    assert_one_line(stop.stderr, f"error: cannot read image {images / 'broken.png'}")
    assert not (tmp_path / "a.json").exists()

    skip = run([*base, f"output={tmp_path / 'b.json'}", "skip_unreadable=true", f"hydra.run.dir={tmp_path / 'p2'}"],
               env, tmp_path)
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert "skipped 1 unreadable image: broken.png" in skip.stderr
    assert f"skipped: cannot read image {images / 'broken.png'}" in (tmp_path / "p2" / "predict.log").read_text()
    names = {d["file_name"] for d in json.loads((tmp_path / "b.json").read_text())}
    assert names <= {p.name for p in val} and "broken.png" not in names

    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        denied = run([*base, f"output={readonly / 'c.json'}", "skip_unreadable=true",
                      f"hydra.run.dir={tmp_path / 'p3'}"], faulty(env, readonly=str(readonly)), tmp_path)
    finally:
        readonly.chmod(0o755)
    assert denied.returncode == 2
    assert_one_line(denied.stderr, f"error: cannot write {readonly / 'c.json'}: Permission denied; nothing was written")
    assert list(readonly.iterdir()) == []
