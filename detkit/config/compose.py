"""Composing detkit's configs: where they are (`CONFIG_DIR`), composing and checking one as a
Hydra app will (`check_config`), and writing an override value (`quote_override`).

Importing this module imports neither torch nor Hydra (the tools answer a bad command line
before torch loads): `check_config` imports Hydra when called.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detkit.config.schemas import register_configs

__all__ = ["CONFIG_DIR", "quote_override", "check_config"]


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
    from hydra import compose, initialize_config_dir  # Hydra loads when a config is composed

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
