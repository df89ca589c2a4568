"""The typed schemas of the study's tool configs, stored in Hydra's ConfigStore beside the
library's (`detkit.config.schemas`, group `schema`) by `register_study_configs()`, which a
study tool calls before it composes its config:

- `schema/ablate`: `AblateConfig`, configs/ablate.yaml (tools/ablate.py,
  `detkit.study.cli.ablate`).

Importing this module imports no torch (the tools answer a bad command line before it loads).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Optional

from omegaconf import MISSING

from detkit.config.schemas import register_schemas

__all__ = ["AblateConfig", "STUDY_SCHEMAS", "register_study_configs"]


@dataclass
class AblateConfig:
    """configs/ablate.yaml (tools/ablate.py). `table` is a name, `all` or a list of names;
    `rows` null or a list of the tables' experiments; `seeds` an int or a list of ints
    (detkit.study.cli.ablate reads them)."""

    table: Any = MISSING
    rows: Any = MISSING
    data: str = MISSING
    seeds: Any = MISSING
    jobs: int = MISSING
    threads_per_job: Optional[int] = MISSING
    out: str = MISSING
    pretrain: Optional[str] = MISSING
    record: Optional[str] = MISSING


STUDY_SCHEMAS: Mapping[str, type] = MappingProxyType({"ablate": AblateConfig})


def register_study_configs() -> None:
    """Store `STUDY_SCHEMAS` as `schema/<name>` (idempotent, as `register_configs`)."""
    register_schemas(STUDY_SCHEMAS)
