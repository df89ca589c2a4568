"""The command-line tools: one module per tool (`detkit.cli.train`, `.eval`, `.predict`, ...),
each with a `main()` entry point that `tools/<tool>.py`, the `detkit-<tool>` console scripts
and `python -m detkit.cli.<tool>` call; and what they share, here: where the configs are
(`detkit.config.compose.CONFIG_DIR`), the check of a command line before Hydra runs
(`checked_argv`, with `detkit.config.compose.check_config`), the one-line error report (`one_line_errors`) and `run_app`, which runs a
tool's job as the Hydra app of its config.

Every tool is a Hydra app (`key=value` arguments, configs/<tool>.yaml), except that
`tools/ablate.py` passes everything after `--` verbatim to every training run it starts.
"""
from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from detkit.config import compose
from detkit.config.schemas import register_configs
from detkit.engine.preemption import EXIT_STOPPED, Interrupted, StopSignals, signal_name   # no torch

__all__ = ["one_line_errors", "checked_argv", "run_app"]


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix (bad paths, files, arguments; a full disk or an
    unwritable folder: `detkit.io.WriteError`) into one line on stderr and exit status 2,
    instead of a traceback; and a stop signal (`detkit.engine.preemption.Interrupted`) into
    its one line (none on the ranks > 0 of a distributed run) and exit status 4
    (`EXIT_STOPPED`)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Interrupted as exc:
            message = str(exc).strip()
            if message:
                if message == f"stopped by {signal_name(exc.signum)}":
                    message += "; no file was left half-written (detkit writes files atomically)"
                print(message, file=sys.stderr)
            sys.exit(EXIT_STOPPED)
        except (ValueError, OSError) as exc:  # CheckpointError and DatasetError are ValueErrors
            # One line even when the message quotes a multi-line one (torch.load's, for a bad checkpoint).
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def checked_argv(config_name: str, argv: list[str]) -> list[str]:
    """`check_config` the overrides of a plain run (argv without Hydra options like -m or
    --cfg, which Hydra then checks itself); one line on stderr and exit status 2 if bad."""
    if not any(arg.startswith("-") for arg in argv):
        try:
            positional = [arg for arg in argv if "=" not in arg and not arg.startswith("~")]
            if positional:
                raise ValueError(f"arguments are key=value (configs/{config_name}.yaml); got {positional[0]!r}")
            compose.check_config(config_name, argv)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    return argv


def run_app(job: Callable[[Any], Any], config_name: str, argv: list[str] | None = None,
            check: bool = True) -> None:
    """Run `job(cfg)` as the Hydra app of configs/<config_name>.yaml on the command line
    `argv` (default sys.argv[1:]): with `check`, the overrides are `checked_argv`-ed first
    (one line and exit status 2 when bad, before the job's imports); then Hydra composes the
    config, makes the run folder (`hydra.run.dir`, its .hydra/ and <job name>.log as the
    config's hydra node says; sweeps with -m) and calls `job`, whose fixable errors end as one
    line (`one_line_errors`), and a stop signal ends it with its one line and exit status 4
    (`detkit.engine.preemption`: the handlers are installed for the app's run). The job name is the config's `hydra.job.name`, so the log file is
    named the same whichever way the tool was started (tools/<tool>.py, a console script,
    python -m)."""
    import hydra  # here, not above: a bad command line is answered before Hydra (and torch) load

    register_configs()       # before Hydra composes: the configs' schemas
    argv = list(sys.argv[1:] if argv is None else argv)
    if check:
        argv = checked_argv(config_name, argv)
    app = hydra.main(config_path=str(compose.CONFIG_DIR), config_name=config_name, version_base="1.3")(one_line_errors(job))
    sys.argv = [sys.argv[0], *argv]     # Hydra reads its command line from sys.argv
    # A log file on a full disk: its lines are lost, without a traceback for each one (the
    # write that fails next says what happened, in one line).
    logging.raiseExceptions = False
    with StopSignals():                 # SIGTERM, SIGINT, SIGUSR1: detkit.engine.preemption
        app()
