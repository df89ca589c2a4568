"""The command-line tools: one module per tool (`detkit.cli.train`, `.eval`, `.predict`, ...),
each with a `main()` entry point that `tools/<tool>.py`, the `detkit-<tool>` console scripts
and `python -m detkit.cli.<tool>` call; and what they share, here: where the configs are
(`CONFIG_DIR`), the check of a command line before Hydra runs (`check_config`,
`checked_argv`), the one-line error report (`one_line_errors`) and `run_app`, which runs a
tool's job as the Hydra app of its config.

Every tool is a Hydra app (`key=value` arguments, configs/<tool>.yaml), except that
`tools/ablate.py` passes everything after `--` verbatim to every training run it starts.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_DIR", "quote_override", "one_line_errors", "check_config", "checked_argv", "run_app"]


def _config_dir() -> Path:
    """configs/ as the package data of an installed detkit (`detkit/configs/`, from the wheel),
    else the checkout's top-level configs/ (an editable install, or the sources on sys.path)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()


def quote_override(value: str) -> str:
    """A Hydra override value that stays one literal string (spaces, commas, '=' ...)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix (bad paths, files, arguments) into one line on stderr
    and exit status 2, instead of a traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, OSError) as exc:  # CheckpointError and DatasetError are ValueErrors
            # One line even when the message quotes a multi-line one (torch.load's, for a bad checkpoint).
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def _one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf error as one line: its message lines joined (the full_key detail
    kept as "(at KEY)", the object_type details and the config search path left out), plus
    its cause's first line."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line.startswith("full_key:"):
            key = line[len("full_key:"):].strip()
            if key:
                lines.append(f"(at {key})")  # a bad value from a config file: name its key
        elif line and not line.startswith(("object_type=", "reference_type=")):
            lines.append(line)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first not in lines:
            lines.append(f"({first})")
    return " ".join(lines) or type(exc).__name__


def check_config(config_name: str, overrides: list[str]) -> Any:
    """Compose configs/<config_name>.yaml with command-line `overrides` as the Hydra app will
    and check it, so that mistakes (unknown key, missing group option, bad override syntax,
    a required value left at ???) fail with one line (a ValueError) instead of Hydra's
    multi-line report. Returns the composed config, `hydra` node included (its values,
    like hydra.run.dir, resolve)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from detkit.engine.config import register_configs

    register_configs()       # the schemas the configs' defaults lists name (schema/...)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except Exception as exc:  # hydra.errors.* and omegaconf errors
        raise ValueError(_one_line(exc)) from None
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    missing = sorted(OmegaConf.missing_keys(body))
    if missing:
        raise ValueError(f"no value for {', '.join(missing)}: pass it on the command line "
                         f"({missing[0]}=...)")
    try:
        OmegaConf.to_container(body, resolve=True)
    except Exception as exc:
        raise ValueError(_one_line(exc)) from None
    return cfg


def checked_argv(config_name: str, argv: list[str]) -> list[str]:
    """`check_config` the overrides of a plain run (argv without Hydra options like -m or
    --cfg, which Hydra then checks itself); one line on stderr and exit status 2 if bad."""
    if not any(arg.startswith("-") for arg in argv):
        try:
            positional = [arg for arg in argv if "=" not in arg and not arg.startswith("~")]
            if positional:
                raise ValueError(f"arguments are key=value (configs/{config_name}.yaml); got {positional[0]!r}")
            check_config(config_name, argv)
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
    line (`one_line_errors`). The job name is the config's `hydra.job.name`, so the log file is
    named the same whichever way the tool was started (tools/<tool>.py, a console script,
    python -m)."""
    import hydra

    from detkit.engine.config import register_configs

    register_configs()       # before Hydra composes: the configs' schemas
    argv = list(sys.argv[1:] if argv is None else argv)
    if check:
        argv = checked_argv(config_name, argv)
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(one_line_errors(job))
    sys.argv = [sys.argv[0], *argv]     # Hydra reads its command line from sys.argv
    app()
