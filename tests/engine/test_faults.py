"""Faults in-process: atomic writes on a full disk or an unwritable folder (detkit.io), files
that are not detkit checkpoints (detkit.engine.checkpoint), the stop-signal handlers
(detkit.engine.preemption) and an ablation sweep stopped by a signal (detkit.study.sweep).
The same faults in the tools' subprocesses: tests/tools/test_faults.py."""
from __future__ import annotations

import collections
import errno
import os
import signal
import sys
import threading
import time

import pytest
import torch

from detkit.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkit.engine.preemption import EXIT_STOPPED, Interrupted, StopSignals
from detkit.io import WriteError, atomic_write, write_json
from detkit.study import sweep


def _full_disk(handle):
    handle.write(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_on_a_full_disk_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(WriteError, match=r"cannot write .*metrics.json: No space left on device; nothing was written"):
        atomic_write(target, _full_disk)
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    with pytest.raises(WriteError, match="the previous metrics.json is kept unchanged") as info:
        atomic_write(target, _full_disk)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and target.read_text() == '{\n "a": 1\n}'


def test_torch_save_failing_on_a_full_disk_is_one_write_error(tmp_path):
    """torch.save reports the failed write as a RuntimeError raised while handling the OSError."""
    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(handle):
        try:
            torch.save({"w": torch.zeros(1000)}, Full())
        except RuntimeError:
            raise RuntimeError("enforce fail at inline_container.cc") from None

    with pytest.raises(WriteError, match="No space left on device"):
        atomic_write(tmp_path / "last.pth", save)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", denied)
    with pytest.raises(WriteError, match=r"cannot write .*last.pth: Permission denied; nothing was written"):
        save_checkpoint(tmp_path / "last.pth", {"model": {}})


def test_other_errors_pass_through(tmp_path):
    def bug(handle):
        raise KeyError("not an OS error")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "x", bug)
    assert list(tmp_path.iterdir()) == []


class Custom:
    pass


@pytest.mark.parametrize("case", ["text", "pickle", "objects", "truncated"])
def test_not_a_checkpoint_is_one_line_without_unsafe_advice(case, tmp_path):
    path = tmp_path / "file.pth"
    if case == "text":
        path.write_text("myhost\n")
        expected = "is not a detkit checkpoint: not a PyTorch archive"
    elif case == "pickle":
        import pickle
        path.write_bytes(pickle.dumps(collections.Counter("abc")))
        expected = "not a PyTorch archive"
    elif case == "objects":
        torch.save({"format": "detkit-checkpoint", "model": Custom()}, path)
        expected = "holds objects other than tensors and plain data"
    else:
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
        expected = "a damaged or truncated PyTorch archive"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert "weights_only" not in message and "will likely succeed" not in message


def _signal_self(signum, delay=0.0):
    def send():
        time.sleep(delay)
        os.kill(os.getpid(), signum)
    threading.Thread(target=send, daemon=True).start()


def test_stop_signals_raise_at_once_outside_deferred_regions():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        with pytest.raises(Interrupted, match="stopped by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_deferred_signals_are_recorded_and_a_second_one_ignored():
    with StopSignals() as signals:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGINT)    # a second one, e.g. while the checkpoint is written
            time.sleep(0.1)
        assert signals.received == signal.SIGUSR1 and signals.count == 2
        os.kill(os.getpid(), signal.SIGTERM)      # already stopping: nothing raised
        time.sleep(0.1)
        assert signals.count == 3


CHILD = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):
    (out / "stopped").write_text(signal.Signals(signum).name)
    sys.exit(4)
signal.signal(signal.SIGTERM, stop)
(out / "started").write_text("")
time.sleep(60)
"""


def test_a_sweep_stopped_by_a_signal_stops_its_runs_and_starts_no_more(tmp_path, monkeypatch):
    specs = [sweep.RunSpec(f"exp{i}", 0, tmp_path / f"exp{i}" / "seed0", (f"experiment=exp{i}",)) for i in range(2)]
    monkeypatch.setattr(sweep, "train_command", lambda spec: [sys.executable, "-c", CHILD, str(spec.run_dir)])
    lines = []

    def signal_once_started():
        deadline = time.monotonic() + 60
        while not (specs[0].run_dir / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    with StopSignals():
        threading.Thread(target=signal_once_started, daemon=True).start()
        with pytest.raises(Interrupted) as info:
            sweep.run_sweep(specs, jobs=1, threads_per_job=1, log=lines.append)
    assert EXIT_STOPPED == 4
    assert "stopped by SIGTERM: 1 run(s) stopped with a checkpoint (exp0 seed 0), 1 not started" in str(info.value)
    assert (specs[0].run_dir / "stopped").read_text() == "SIGTERM"        # the signal was passed on
    assert not (specs[1].run_dir / "started").exists()
    assert any("exp0 seed 0: stopped" in line for line in lines), lines


def test_tools_report_a_stop_in_one_line_with_status_4(capsys):
    from detkit.cli import one_line_errors

    @one_line_errors
    def job():
        raise Interrupted(signal.SIGTERM)

    @one_line_errors
    def other_rank():
        raise Interrupted(signal.SIGTERM, " ")

    for tool, expected in ((job, "stopped by SIGTERM; no file was left half-written (detkit writes files atomically)"), (other_rank, "")):
        with pytest.raises(SystemExit) as info:
            tool()
        assert info.value.code == EXIT_STOPPED
        assert capsys.readouterr().err.strip() == expected


def _square(x):
    return x * x


def test_forked_pool_workers_stop_as_before_when_their_pool_terminates_them():
    """multiprocessing.Pool stops its workers with SIGTERM: with the handlers installed in the
    parent, a forked worker must still stop (the synthetic-data generator uses such a pool)."""
    import multiprocessing

    with StopSignals():
        start = time.monotonic()
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert pool.map(_square, range(4)) == [0, 1, 4, 9]
        assert time.monotonic() - start < 30
