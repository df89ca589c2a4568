"""Stop signals: what SIGTERM, SIGINT and SIGUSR1 do to a detkit tool.

Clusters stop jobs with a signal before they kill them: SLURM sends SIGTERM (and SIGUSR1 with
`--signal`, for a requeue), Kubernetes and torchrun SIGTERM, a terminal SIGINT (Ctrl-C).
`StopSignals` (installed by every tool, `detkit.cli.run_app`) catches the three:

- in a *deferred* region (the training loop: `detkit.engine.hooks.StopOnSignal` enters it for
  the steps and their hooks, `detkit.study.sweep.run_sweep` while its runs train), the first
  signal is only recorded (`received`); the loop finishes the step in progress, saves a
  checkpoint and raises `Interrupted`. Later signals are counted and otherwise ignored, so a
  second Ctrl-C neither interrupts the checkpoint being written nor gets lost.
- anywhere else (evaluation, prediction, export, setting up), the first signal raises
  `Interrupted` at once; every file detkit writes is written atomically (`detkit.io`), so
  nothing is left half-written.

The tools report an `Interrupted` as one line on stderr and exit with status `EXIT_STOPPED` (4).

Only the process that installed the handlers acts on them: a forked child (a DataLoader or
multiprocessing pool worker) gets the handlers of before back (a pool stopping its workers
with SIGTERM must stop them).

This module loads without torch (the tools install the handlers before torch loads).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "Interrupted", "StopSignals", "current", "signal_name"]

EXIT_STOPPED = 4   # the exit status of a tool stopped by a signal (README, docs/checkpoints.md)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(Exception):
    """A stop signal ended the work. The message is the one line the tools print (empty on the
    ranks > 0 of a distributed run, which print nothing); `signum` is the signal."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        super().__init__(message or f"stopped by {signal_name(signum)}")


class StopSignals:
    """Handlers of `STOP_SIGNALS` (a context manager: installs them, restores the previous ones).

    received: the first signal (its number), or None. count: how many arrived. Outside
    `deferred()` the first one raises `Interrupted` in the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self._defer = 0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}
        self._outer: StopSignals | None = None

    # ------------------------------------------------------------------ installing

    def install(self) -> bool:
        """Install the handlers (only from the main thread; False elsewhere, nothing done)."""
        global _CURRENT
        if threading.current_thread() is not threading.main_thread():
            return False
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._outer, _CURRENT = _CURRENT, self
        return True

    def uninstall(self) -> None:
        global _CURRENT
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if _CURRENT is self:
            _CURRENT = self._outer

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ using

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """Within the block, signals are only recorded; the block's owner looks at `received`
        at its safe points."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1

    def enter_deferred(self) -> None:
        self._defer += 1

    def leave_deferred(self) -> None:
        self._defer = max(0, self._defer - 1)

    @property
    def is_deferred(self) -> bool:
        return self._defer > 0

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:       # a forked child that kept the handlers: as without them
            self._as_before(signum, frame)
            return
        self.count += 1
        if self.received is not None:      # a second signal: already stopping
            return
        self.received = signum
        if not self._defer:
            raise Interrupted(signum)


    def _as_before(self, signum, frame) -> None:
        """What the handler this one replaced does (a pool worker told to stop by its pool
        stops; a DataLoader worker interrupted by Ctrl-C raises KeyboardInterrupt, as ever)."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _restore_in_child(self) -> None:
        """After a fork: the child gets the handlers of before (its parent decides when to stop)."""
        with contextlib.suppress(ValueError, OSError):   # a fork from a thread other than the main one
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


_CURRENT: StopSignals | None = None


def _after_fork_in_child() -> None:
    if _CURRENT is not None and _CURRENT._previous:
        _CURRENT._restore_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current() -> StopSignals | None:
    """The installed `StopSignals` (innermost), or None."""
    return _CURRENT
