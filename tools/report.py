"""Render ablation reports from finished run folders: our numbers beside the papers'.

    python tools/report.py outputs/ablations/synthetic                  # every table with runs there
    python tools/report.py RUN_DIR [RUN_DIR ...] --table dcnv1_table1   # one table
    python tools/report.py outputs/ablations/synthetic --out docs/reports   # NAME.md + NAME.png per table

Paths are run folders of tools/train.py (with metrics.json) or folders holding them at any
depth (a tools/ablate.py sweep folder). A table is rendered when at least one of its
experiments has runs; its other rows say "not run". Without --out the Markdown goes to
stdout and no chart is drawn.

Exit status: 0 done; 2 a bad path, table or metrics file (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detkit.cli import one_line_errors  # noqa: E402


def main(argv: list[str]) -> int:
    from detkit.ablation.report import collect_runs, render_markdown, summarize, write_report
    from detkit.ablation.tables import load_table, table_names

    parser = argparse.ArgumentParser(prog="tools/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders or folders holding run folders")
    parser.add_argument("--table", action="append", choices=table_names(),
                        help="render only this table (repeatable); default: every table with runs")
    parser.add_argument("--out", type=Path, help="write <table>.md and <table>.png into this folder")
    args = parser.parse_args(argv)

    runs = collect_runs(args.paths)
    experiments = {run.experiment for run in runs}
    tables = [load_table(name) for name in (args.table or table_names())]
    if not args.table:
        tables = [t for t in tables if experiments & set(t.experiments)]
    if not tables:
        named = sorted(e for e in experiments if e) or ["none"]
        raise ValueError(f"the runs' experiments ({', '.join(named)}) are in no ablation table "
                         f"(configs/ablation/: {', '.join(table_names())})")
    for table in tables:
        if args.out is None:
            print(render_markdown(table, summarize(table, runs)))
        else:
            write_report(table, runs, args.out / f"{table.name}.md", args.out / f"{table.name}.png")
            print(f"wrote {args.out / (table.name + '.md')} and {args.out / (table.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)(sys.argv[1:]))
