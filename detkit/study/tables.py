"""Ablation tables: which experiments make up a paper's table, and the paper's numbers.

A table is `configs/ablation/<name>.yaml` (in `detkit.config.compose.CONFIG_DIR`: an installed detkit's
package data, or a checkout's configs/):

    title: "DCNv1 Table 1: ..."
    baseline: dcnv1/baseline            # the row others are compared with
    paper:
      source: "Dai et al., ... Table 1 ..."   # the citation printed under the report
      columns: ["mAP@0.5", "mAP@0.7"]          # what the paper's numbers are
      layout: single_scale                     # optional: the paper's detector (model.layout)
    rows:
      - {experiment: dcnv1/baseline, label: "none (0)", paper: [78.1, 62.1]}

`experiment` names a config under `configs/experiment/`; `paper` holds one number per
paper column, null where the paper gives none; `paper.layout` (`single_scale` or `fpn`, the
values of `model.layout`) is the paper's detector, which the report sets beside the runs' own. A table with `from_scratch: true` (the
positive control) trains its rows from random initialisation: the sweep gives them no
pre-training backbone, and `table=all` (the papers' tables, which fine-tune) leaves it out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detkit.config.compose import CONFIG_DIR

__all__ = ["TABLE_DIR", "AblationRow", "AblationTable", "load_table", "table_names", "paper_table_names"]

TABLE_DIR = CONFIG_DIR / "ablation"
LAYOUTS = ("single_scale", "fpn")         # model.layout's values


@dataclass(frozen=True)
class AblationRow:
    experiment: str                       # configs/experiment/<experiment>.yaml
    label: str                            # the row's name in the paper's wording
    paper: tuple[float | None, ...]       # the paper's numbers, one per AblationTable.paper_columns


@dataclass(frozen=True)
class AblationTable:
    name: str
    title: str
    baseline: str                         # experiment of the reference row
    paper_source: str
    paper_columns: tuple[str, ...]
    rows: tuple[AblationRow, ...]
    from_scratch: bool = False            # rows start from random weights, never from a pre-training
    paper_layout: str | None = None       # the paper's detector ("single_scale" / "fpn"), when the table says

    @property
    def experiments(self) -> list[str]:
        return [row.experiment for row in self.rows]


def table_names() -> list[str]:
    """Every table's name (configs/ablation/*.yaml), sorted."""
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def paper_table_names() -> list[str]:
    """The tables `table=all` runs: every table that fine-tunes (not `from_scratch`)."""
    return [name for name in table_names() if not load_table(name).from_scratch]


def load_table(name: str, table_dir: str | Path | None = None) -> AblationTable:
    """The table `configs/ablation/<name>.yaml` (or `<table_dir>/<name>.yaml`); a ValueError
    naming the known tables if there is none, or naming the field that is malformed."""
    from omegaconf import OmegaConf

    table_dir = Path(table_dir) if table_dir is not None else TABLE_DIR
    path = table_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in table_dir.glob("*.yaml"))
        raise ValueError(f"no ablation table {name!r}: expected {path}; known tables: {', '.join(known)}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)

    def field(mapping: dict, key: str, where: str):
        if not isinstance(mapping, dict) or key not in mapping:
            raise ValueError(f"{path}: {where} lacks the field {key!r}")
        return mapping[key]

    paper = field(raw, "paper", "the table")
    columns = tuple(str(c) for c in field(paper, "columns", "paper"))
    rows = []
    for i, row in enumerate(field(raw, "rows", "the table")):
        numbers = tuple(None if v is None else float(v) for v in field(row, "paper", f"row {i}"))
        if len(numbers) != len(columns):
            raise ValueError(f"{path}: row {i} ({row.get('experiment')}) has {len(numbers)} paper numbers "
                             f"for {len(columns)} paper columns {list(columns)}")
        rows.append(AblationRow(str(field(row, "experiment", f"row {i}")), str(field(row, "label", f"row {i}")),
                                numbers))
    experiments = [r.experiment for r in rows]
    if len(set(experiments)) != len(experiments):
        raise ValueError(f"{path}: an experiment appears twice in rows: {experiments}")
    baseline = str(field(raw, "baseline", "the table"))
    if baseline not in experiments:
        raise ValueError(f"{path}: baseline {baseline!r} is not one of the rows {experiments}")
    from_scratch = raw.get("from_scratch", False)
    if not isinstance(from_scratch, bool):
        raise ValueError(f"{path}: from_scratch must be true or false; got {from_scratch!r}")
    layout = paper.get("layout")
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"{path}: paper.layout must be one of {list(LAYOUTS)}; got {layout!r}")
    return AblationTable(name, str(field(raw, "title", "the table")), baseline, str(field(paper, "source", "paper")),
                         columns, tuple(rows), from_scratch, layout)
