"""Helpers shared by the command-line tools in tools/."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
