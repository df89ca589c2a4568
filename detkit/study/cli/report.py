"""Render ablation reports from finished run folders: our numbers beside the papers'.

    python tools/report.py runs=[outputs/ablations/synthetic]                   # every table with runs there
    python tools/report.py runs=[RUN_DIR,RUN_DIR] table=dcnv1_table1            # one table (or table=[a,b])
    python tools/report.py runs=[outputs/ablations/synthetic] out=docs/reports  # NAME.md + NAME.png + NAME.svg per table
    python tools/report.py runs=[docs/results/sweep.json]                       # a records file of tools/ablate.py

(or `detkit-report ...`, `python -m detkit.study.cli.report ...`). A Hydra app
(configs/report.yaml) that writes no run folder. `runs` are run folders of tools/train.py
(with metrics.json), folders holding them at any depth (a tools/ablate.py sweep folder) or
records files of tools/ablate.py record=PATH.json (`detkit.study.records`); one path or a
list. A table is rendered when at least one of its experiments has runs; its
other rows say "not run". Without `table`, the papers' claims follow the tables, each read
as holds / does not hold / mixed / within noise / not measured (`detkit.study.claims`; with `out`,
as claims.md). Without `out` the Markdown goes to stdout and no chart is drawn.

Exit status: 0 done; 2 a bad path, table, metrics or records file, or a bad argument (one line on stderr).
"""
from __future__ import annotations

from pathlib import Path

from detkit.cli import run_app
from detkit.study.claims import read_claims, render_claims
from detkit.study.report import collect_runs, render_markdown, summarize, write_report
from detkit.study.tables import load_table, table_names


def _names(value, key: str) -> list[str]:
    """A key given as one string or a list of strings, as a list."""
    values = [value] if isinstance(value, (str, int, float)) else list(value)
    if not values:
        raise ValueError(f"{key} must name at least one, e.g. {key}=[a,b]")
    return [str(v) for v in values]


def job(cfg) -> None:
    tables = [load_table(name) for name in (_names(cfg.table, "table") if cfg.table is not None else table_names())]
    runs = collect_runs(_names(cfg.runs, "runs"))
    experiments = {run.experiment for run in runs}
    if cfg.table is None:
        tables = [t for t in tables if experiments & set(t.experiments)]
    if not tables:
        named = sorted(e for e in experiments if e) or ["none"]
        raise ValueError(f"the runs' experiments ({', '.join(named)}) are in no ablation table "
                         f"(configs/ablation/: {', '.join(table_names())})")
    out = Path(str(cfg.out)) if cfg.out is not None else None
    for table in tables:
        if out is None:
            print(render_markdown(table, summarize(table, runs)))
        else:
            write_report(table, runs, out / f"{table.name}.md", out / f"{table.name}.png")
            print(f"wrote {out / (table.name + '.md')}, {out / (table.name + '.png')} and {out / (table.name + '.svg')}")
    if cfg.table is None:
        claims = render_claims(read_claims(runs))
        if out is None:
            print(claims)
        else:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".claims.md.tmp"
            tmp.write_text(claims)
            tmp.replace(out / "claims.md")
            print(f"wrote {out / 'claims.md'}")


def main() -> None:
    run_app(job, "report")


if __name__ == "__main__":
    main()
