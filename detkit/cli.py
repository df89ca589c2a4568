"""Helpers shared by the command-line tools in tools/."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
            message = str(exc).strip() or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def _one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf error as one line: its message lines (minus the full_key/object_type
    details and the config search path) joined, plus its cause's first line."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
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
            check_config(config_name, argv)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    return argv
