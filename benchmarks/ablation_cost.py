"""Cost of every row of the ablation tables: parameters, inference FLOPs, training seconds per iteration.

For each experiment of the chosen tables (configs/ablation/*.yaml; an experiment shared by
two tables is measured once), composed with the chosen data config as tools/train.py composes
`experiment=<row> data=<data>`, one after the other in this process:

- parameters: all, and those of the offset/mask branches (as train_stats.json counts them);
- GFLOPs of one inference forward of one image of --height x --width (FlopCounterMode, with
  formulas for detkit's deformable ops: detkit/study/cost.py);
- the median seconds of --iters training iterations after --warmup, on the data config's real
  training stream, data loading excluded (the trainer's own step timing).

Prints one Markdown table per ablation table, with ratios to that table's baseline row, and
with --json writes every number (rewritten after each experiment, so a cut run keeps what it
measured). Extra key=value arguments are Hydra overrides for every experiment.

    python benchmarks/ablation_cost.py                                   # all four tables, data=synthetic_geometry
    python benchmarks/ablation_cost.py --tables fpn_mmdet --json cost.json
    python benchmarks/ablation_cost.py --experiments fpn/baseline,fpn/dconv_c3_c5 --iters 10 num_workers=0

model.backbone.weights stays null: weights change what training learns, not what it costs.
Run it alone on the machine: the timings are only comparable when nothing else runs.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
from pathlib import Path

from detkit.cli import one_line_errors  # torch is imported once the arguments are read


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="all",
                        help="comma-separated configs/ablation/ names, or all (default)")
    parser.add_argument("--experiments", default=None,
                        help="comma-separated experiments of those tables to measure (default: every row)")
    parser.add_argument("--data", default="synthetic_geometry", help="data config (configs/data/)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height of the FLOP count (default: the data config's shorter side)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: 4/3 of the height)")
    parser.add_argument("--iters", type=int, default=30, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training iterations first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("overrides", nargs="*", help="key=value Hydra overrides for every experiment")
    args = parser.parse_args(argv)
    for name in ("iters", "threads"):
        if getattr(args, name) is None or getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer; got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0; got {args.warmup}")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive number of pixels; got {getattr(args, name)}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ValueError(f"extra arguments are key=value Hydra overrides; got {bad[0]!r}")
    return args


def select(tables_arg: str, experiments_arg: str | None):
    """(tables with a row to measure, their experiments to measure in table order, each once)."""
    from detkit.study.tables import load_table, table_names

    names = table_names() if tables_arg == "all" else [n.strip() for n in tables_arg.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--tables names no table; known: {', '.join(table_names())}")
    tables = [load_table(name) for name in names]
    in_tables = list(dict.fromkeys(e for table in tables for e in table.experiments))
    if experiments_arg is None:
        return tables, in_tables
    wanted = [e.strip() for e in experiments_arg.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in in_tables]
    if unknown or not wanted:
        raise ValueError(f"--experiments: {', '.join(unknown) or 'none given'} not in the tables "
                         f"{', '.join(names)}; their experiments: {', '.join(in_tables)}")
    return [t for t in tables if set(t.experiments) & set(wanted)], [e for e in in_tables if e in wanted]


def default_height(data: str, overrides: list[str]) -> int:
    """The data config's shorter side (data.min_size; of a list of training scales, the largest)."""
    from detkit.study.cost import compose_train_config

    min_size = compose_train_config(None, data, overrides).data.min_size
    return int(min_size) if isinstance(min_size, int) else max(int(s) for s in min_size)


def cpu_name() -> str:
    """The processor's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def markdown(tables, results: dict) -> str:
    """One Markdown table per ablation table: its measured rows, ratios to its baseline row."""
    lines = []
    for table in tables:
        base = results.get(table.baseline)
        lines += [f"### {table.title} (`{table.name}`)", "",
                  "| row | experiment | params (M) | offset params (K) | GFLOPs/image | s/iter (median) "
                  "| GFLOPs vs baseline | s/iter vs baseline |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in table.rows:
            cost = results.get(row.experiment)
            if cost is None:
                continue
            gflops = cost.flops.total / 1e9
            name = f"`{row.experiment}`" + (" (baseline)" if row.experiment == table.baseline else "")
            lines.append(
                f"| {row.label} | {name} | {cost.parameters / 1e6:.2f} | {cost.offset_total / 1e3:.1f} "
                f"| {gflops:.2f} | {cost.sec_per_iter:.3f} "
                f"| {ratio(cost.flops.total, base.flops.total if base else None)} "
                f"| {ratio(cost.sec_per_iter, base.sec_per_iter if base else None)} |")
        if base is None:
            lines.append(f"\nbaseline `{table.baseline}` not measured: no ratios")
        lines.append("")
    return "\n".join(lines)


def report(settings: dict, tables, results: dict) -> dict:
    """The JSON document: settings, per experiment its numbers, per table its rows and ratios."""
    def table_rows(table):
        base = results.get(table.baseline)
        for row in table.rows:
            cost = results.get(row.experiment)
            if cost is None:
                continue
            yield {"label": row.label, "experiment": row.experiment,
                   "flops_ratio": cost.flops.total / base.flops.total if base else None,
                   "time_ratio": cost.sec_per_iter / base.sec_per_iter if base else None}

    return {"settings": settings,
            "experiments": {name: cost.to_dict() for name, cost in results.items()},
            "tables": {t.name: {"title": t.title, "baseline": t.baseline, "rows": list(table_rows(t))}
                       for t in tables}}


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tables, experiments = select(args.tables, args.experiments)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from detkit.study.cost import compose_train_config, measure_experiment
    from detkit.io import write_json

    torch.set_num_threads(args.threads)
    height = args.height if args.height is not None else default_height(args.data, args.overrides)
    width = args.width if args.width is not None else round(height * 4 / 3)
    configs = {e: compose_train_config(e, args.data, args.overrides) for e in experiments}  # all fail fast
    settings = {"data": args.data, "height": height, "width": width, "iters": args.iters, "warmup": args.warmup,
                "threads": torch.get_num_threads(), "overrides": list(args.overrides),
                "tables": [t.name for t in tables], "torch": torch.__version__, "python": platform.python_version(),
                "cpu": cpu_name(), "cpus": os.cpu_count(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"data={args.data}, FLOPs of one {height}x{width} image, {args.warmup} + {args.iters} training "
          f"iterations per experiment, threads: {torch.get_num_threads()}, torch {torch.__version__}",
          file=sys.stderr)
    results = {}
    for i, experiment in enumerate(experiments, 1):
        cost = measure_experiment(configs[experiment], height, width, args.iters, args.warmup)
        results[experiment] = cost
        print(f"[{i}/{len(experiments)}] {experiment}: {cost.parameters / 1e6:.2f}M parameters "
              f"({cost.offset_total / 1e3:.1f}K offset), {cost.flops.total / 1e9:.2f} GFLOPs "
              f"(network input {cost.flops.network_input[0]}x{cost.flops.network_input[1]}, "
              f"{cost.flops.proposals} proposals), {cost.sec_per_iter:.3f} s/iter "
              f"(median of {len(cost.step_seconds)}, batch {cost.notes['batch_size']})", file=sys.stderr)
        if args.json is not None:
            write_json(args.json, report(settings, tables, results))
    print(markdown(tables, results))


if __name__ == "__main__":
    main()
