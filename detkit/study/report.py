"""Ablation reports: our runs beside the paper's numbers, as Markdown and a bar chart
(matplotlib, written as PNG and SVG).

A run is a tools/train.py run folder with `metrics.json` (final COCO box metrics, percent),
`train_stats.json` (parameters, median seconds per iteration; `detkit.engine.trainer`),
`config.yaml` (seed) and `.hydra/hydra.yaml` (the chosen experiment and data configs), or
a record of one in a records file of tools/ablate.py (`detkit.study.records`: the same
two JSON files' content with its experiment, seed and data).
Rows are a table's experiments; a row's numbers are the mean and the sample standard
deviation over its runs (seeds). The difference to the baseline row is given with twice
its standard error and marked "*" where it is larger than that: paired by seed (the mean and
standard error of the per-seed differences) when the row and the baseline share at least two
seeds, else unpaired, sqrt(s_row^2 / n_row + s_base^2 / n_base).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from detkit.config.stored import check_stored_config
from detkit.study.records import load_records
from detkit.study.tables import AblationTable

__all__ = ["RunResult", "RowSummary", "collect_runs", "runs_from_records", "summarize", "render_markdown",
           "chart_figure", "render_chart", "write_report", "difference", "METRICS"]

# detkit.evaluation.coco_eval.SUMMARY_KEYS, written out so that reports load without torch and
# pycocotools (tests/ablation/test_report.py checks the two agree).
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    experiment: str | None
    data: str | None
    seed: int | None
    metrics: dict[str, float | None]          # METRICS -> value (None: not defined, e.g. no large objects)
    sec_per_iter: float | None
    parameters: int | None
    same_run_as: str | None = None            # the run is this other experiment's (identical training config)
    layout: str | None = None                 # its detector's model.layout ("single_scale" / "fpn"), when known


@dataclass(frozen=True)
class RowSummary:
    experiment: str
    label: str
    runs: tuple[RunResult, ...]
    mean: dict[str, float | None]             # METRICS -> mean over runs (None without values)
    std: dict[str, float | None]              # sample standard deviation (None with fewer than 2 values)
    delta_ap: float | None                    # mean AP minus the baseline's
    delta_ap_2se: float | None                # twice the standard error of delta_ap
    time_ratio: float | None                  # median s/iter relative to the baseline's
    sec_per_iter: float | None                # median over runs
    parameters: int | None
    paper: tuple[float | None, ...]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _load_yaml(path: Path) -> Any:
    """A run folder's YAML file as plain data, read with PyYAML's safe loader: no OmegaConf,
    so no interpolation in it is resolved (what is used from it is checked by the callers)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None


def _select(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _read_run(run_dir: Path) -> RunResult:
    metrics = _load_json(run_dir / "metrics.json")
    stats_path = run_dir / "train_stats.json"
    stats = _load_json(stats_path) if stats_path.is_file() else {}
    experiment = data = seed = None
    hydra_path = run_dir / ".hydra" / "hydra.yaml"
    if hydra_path.is_file():  # Hydra's record (not resolved): only the choices are read, checked as plain data
        choices = check_stored_config(_select(_load_yaml(hydra_path), "hydra", "runtime", "choices") or {},
                                      str(hydra_path), root="hydra.runtime.choices")
        choices = choices if isinstance(choices, dict) else {}
        experiment, data = choices.get("experiment"), choices.get("data")
    config_path = run_dir / "config.yaml"
    layout = None
    if config_path.is_file():  # the resolved config the run wrote: only the seed and the layout are read
        config = _load_yaml(config_path)
        seed = check_stored_config(_select(config, "seed"), str(config_path), root="seed")
        layout = check_stored_config(_select(config, "model", "layout"), str(config_path), root="model.layout")
    result = _run_result(run_dir, None if experiment in (None, "null") else str(experiment),
                         None if data is None else str(data), None if seed is None else int(seed), metrics, stats)
    return replace(result, layout=None if layout is None else str(layout))


def _run_result(source: Path, experiment: str | None, data: str | None, seed: int | None,
                metrics: dict[str, Any], stats: dict[str, Any]) -> RunResult:
    """A RunResult from a run's metrics.json and train_stats.json content (`source`: where they were read)."""
    values = {}
    for key in METRICS:
        value = metrics.get(f"bbox/{key}")
        values[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return RunResult(source, experiment, data, seed, values, stats.get("sec_per_iter"), stats.get("parameters"))


def runs_from_records(path: str | Path, records: Iterable[dict[str, Any]]) -> list[RunResult]:
    """RunResults of run records (`detkit.study.records`) read from records file `path`
    (their run_dir)."""
    path = Path(path).resolve()
    return [replace(_run_result(path, r["experiment"], r["data"], r["seed"], r["metrics"], r["train_stats"]),
                    same_run_as=r.get("same_run_as"), layout=_layout_of(r.get("config"))) for r in records]


def _layout_of(config: Any) -> str | None:
    layout = _select(config, "model", "layout")
    return None if layout is None else str(layout)


def _is_records_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".json"


def collect_runs(paths: Iterable[str | Path]) -> list[RunResult]:
    """Every finished run under `paths`: run folders, folders holding run folders at any
    depth, and records files of tools/ablate.py (`detkit.study.records`, a .json file).
    A run recorded in a records file and also found as a run folder (the same experiment,
    seed and data) is taken once, from the folder. A path that does not exist is a
    ValueError; so is a path holding no run, and a records file holding one run twice with
    different overrides (two settings in one table)."""
    found: dict[Path, RunResult] = {}
    recorded: dict[tuple, tuple[Path, dict[str, Any]]] = {}    # (experiment, seed, data) -> (file, record)
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if _is_records_file(path):
            records = load_records(path).runs
            if not records:
                raise ValueError(f"{path} holds no finished run (no records in it)")
            for record in records:
                key = (record["experiment"], record["seed"], record["data"])
                previous = recorded.setdefault(key, (path, record))
                if previous[1]["overrides"] != record["overrides"]:
                    raise ValueError(
                        f"{key[0]} seed {key[1]} (data={key[2]}) is recorded twice with different overrides "
                        f"({' '.join(previous[1]['overrides'])} in {previous[0]}; {' '.join(record['overrides'])} "
                        f"in {path}); report one setting at a time")
            continue
        metric_files = [path / "metrics.json"] if (path / "metrics.json").is_file() else sorted(
            path.rglob("metrics.json"))
        if not metric_files:
            raise ValueError(f"{path} holds no finished run (no metrics.json under it)")
        for metric_file in metric_files:
            run_dir = metric_file.parent.resolve()
            if run_dir not in found:
                found[run_dir] = _read_run(run_dir)
    in_folders = {(r.experiment, r.seed, r.data) for r in found.values()}
    from_records = [result for key, (path, record) in recorded.items() if key not in in_folders
                    for result in runs_from_records(path, [record])]
    return [*found.values(), *from_records]


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


MIN_SEEDS_TO_READ = 3   # a standard error from two runs has one degree of freedom: too unsteady to read


def difference(row: Sequence[RunResult], base: Sequence[RunResult],
               value: Callable[[RunResult], float | None] = lambda run: run.metrics["AP"],
               ) -> tuple[float | None, float | None]:
    """(mean `value` of the `row` runs minus the `base` runs', twice its standard error or
    None); `value` gives one number per run (None: not defined for that run), AP by default.

    Paired by seed when the two share at least two seeds (a seed fixes the data order, the
    augmentation and the initialisation of what the models share, so the per-seed
    differences carry less noise than the two rows do): the mean of the per-seed differences
    over the shared seeds and 2 SE = 2 s_d / sqrt(n). Otherwise unpaired: the difference of
    the means, 2 SE = 2 sqrt(s_row^2 / n_row + s_base^2 / n_base), None unless both sides
    have two values or more."""
    row_values = [(r.seed, value(r)) for r in row]
    base_values = [(r.seed, value(r)) for r in base]
    row_present = [v for _, v in row_values if v is not None]
    base_present = [v for _, v in base_values if v is not None]
    if not row_present or not base_present:
        return None, None
    base_by_seed = {seed: v for seed, v in base_values if seed is not None and v is not None}
    differences = [v - base_by_seed[seed] for seed, v in row_values if seed in base_by_seed and v is not None]
    if len(differences) >= 2:
        return statistics.fmean(differences), 2 * statistics.stdev(differences) / math.sqrt(len(differences))
    delta = statistics.fmean(row_present) - statistics.fmean(base_present)
    if len(row_present) > 1 and len(base_present) > 1:
        return delta, 2 * math.sqrt(statistics.variance(row_present) / len(row_present)
                                    + statistics.variance(base_present) / len(base_present))
    return delta, None


def summarize(table: AblationTable, runs: Sequence[RunResult]) -> list[RowSummary]:
    """One RowSummary per table row, from the runs of its experiment (rows without runs have
    no numbers). ValueError if one experiment's runs come from different data configs."""
    by_experiment: dict[str, list[RunResult]] = {}
    for run in runs:
        if run.experiment is not None:
            by_experiment.setdefault(run.experiment, []).append(run)
    for experiment, group in by_experiment.items():
        datas = sorted({str(r.data) for r in group})
        if len(datas) > 1:
            raise ValueError(f"the runs of {experiment} mix data configs {datas}; report one setting at a time")
    base = sorted(by_experiment.get(table.baseline, []), key=lambda r: (r.seed is None, r.seed))
    base_times = [r.sec_per_iter for r in base if r.sec_per_iter is not None]
    base_time = statistics.median(base_times) if base_times else None
    rows = []
    for row in table.rows:
        group = sorted(by_experiment.get(row.experiment, []), key=lambda r: (r.seed is None, r.seed))
        mean, std = {}, {}
        for key in METRICS:
            mean[key], std[key] = _mean_std([r.metrics[key] for r in group])
        delta, delta_2se = (difference(group, base) if row.experiment != table.baseline else (None, None))
        times = [r.sec_per_iter for r in group if r.sec_per_iter is not None]
        sec = statistics.median(times) if times else None
        params = [r.parameters for r in group if r.parameters is not None]
        rows.append(RowSummary(row.experiment, row.label, tuple(group), mean, std, delta, delta_2se,
                               sec / base_time if sec is not None and base_time else None, sec,
                               params[0] if params else None, row.paper))
    return rows


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def render_markdown(table: AblationTable, rows: Sequence[RowSummary], heading_level: int = 3) -> str:
    """The table in the paper's layout: one line per row, our metrics (mean ± std over
    seeds), ΔAP to the baseline (± 2 SE), time per iteration relative to the baseline,
    parameters, the paper's numbers; then what the columns mean and the citation."""
    header = ["row", "experiment", "seeds", *METRICS, "ΔAP (± 2 SE)", "time/iter", "params",
              *(f"paper {c}" for c in table.paper_columns)]
    lines = [f"{'#' * heading_level} {table.title}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_runs = next((row.runs for row in rows if row.experiment == table.baseline), ())
    for row in rows:
        if not row.runs:
            cells = [row.label, f"`{row.experiment}`", "none", *(["not run"] * len(METRICS)), "", "", ""]
        else:
            if row.experiment == table.baseline:
                delta = "baseline"
            elif row.delta_ap is None:
                delta = "n/a"
            else:
                delta = f"{row.delta_ap:+.1f}"
                if row.delta_ap_2se is not None:
                    readable = min(len(row.runs), len(base_runs)) >= MIN_SEEDS_TO_READ
                    delta += f" ± {row.delta_ap_2se:.1f}" + (" *" if readable and abs(row.delta_ap) > row.delta_ap_2se else "")
            seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
            cells = [row.label, f"`{row.experiment}`", seeds,
                     *(_cell(row.mean[k], row.std[k]) for k in METRICS), delta,
                     "n/a" if row.time_ratio is None else f"{row.time_ratio:.2f}x",
                     "n/a" if row.parameters is None else f"{row.parameters / 1e6:.2f}M"]
        cells += ["" if v is None else f"{v:.1f}" for v in row.paper]
        lines.append("| " + " | ".join(cells) + " |")
    setting = runs_setting(table, rows)
    base = next((row for row in rows if row.experiment == table.baseline), None)
    base_time = (f" ({base.sec_per_iter:.3f} s per iteration, median over its runs)"
                 if base is not None and base.sec_per_iter else "")
    lines += ["",
              f"Ours: {setting}; box AP in percent (COCO metrics), mean ± sample "
              f"standard deviation over the seeds listed. ΔAP: mean AP minus the baseline's, ± twice its "
              f"standard error; * where the difference exceeds that and both rows have {MIN_SEEDS_TO_READ} seeds or more. time/iter: median training seconds per "
              f"iteration (data loading excluded) relative to the baseline row{base_time}. "
              f"params: all parameters of the detector.",
              (f"Paper columns ({', '.join(table.paper_columns)}): {table.paper_source}. A blank cell: "
               f"the number is not published." if table.paper_columns else f"No paper columns: {table.paper_source}.")]
    shared = {row.experiment: sorted({r.same_run_as for r in row.runs if r.same_run_as}) for row in rows}
    shared = {experiment: sources for experiment, sources in shared.items() if sources}
    if shared:
        lines += ["", "Shared runs: " + "; ".join(
            f"`{experiment}` is the same model trained the same way as `{'`, `'.join(sources)}` (identical "
            f"training config), so its runs are those" for experiment, sources in shared.items()) + "."]
    return "\n".join(lines) + "\n"


_DPI = 100
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _draw_row(ax, x: int, row: RowSummary, colour: str, floor: float) -> None:
    """Row number `x`'s bar (mean AP, artist id "bar-<x>"), its ± std error bar, one dot per
    run ("seeds-<x>", on the bar's left half) and its value; "not run" where it has no AP."""
    mean, std = row.mean["AP"], row.std["AP"]
    if mean is None:
        ax.text(x, floor, "not run" if not row.runs else "no AP", ha="center", va="bottom", color="0.45",
                fontsize=9, gid=f"missing-{x}")
        return
    ax.bar(x, mean, width=0.6, color=colour, zorder=2, gid=f"bar-{x}")
    if std is not None:
        ax.errorbar(x, mean, yerr=std, fmt="none", ecolor="0.1", elinewidth=1.5, capsize=6, zorder=3)
    aps = [r.metrics["AP"] for r in row.runs if r.metrics["AP"] is not None]
    offsets = np.linspace(-0.22, -0.08, len(aps)) if len(aps) > 1 else np.array([-0.15])
    ax.scatter(x + offsets, aps, s=14, color="0.1", zorder=4, gid=f"seeds-{x}")
    ax.text(x + 0.08, mean, f"{mean:.1f}", ha="left", va="bottom", fontsize=9, zorder=5)


def runs_setting(table: AblationTable, rows: Sequence[RowSummary]) -> str:
    """What the runs were trained on, for the note under a table and the line under a chart's
    title: "data=<data configs>; detector layout: <layouts> (not the paper's <layout>)"."""
    datas = sorted({str(r.data) for row in rows for r in row.runs})
    layouts = sorted({r.layout for row in rows for r in row.runs if r.layout is not None})
    setting = f"data={', '.join(datas) or 'none'}"
    if layouts:
        setting += f"; detector layout: {', '.join(layouts)}"
        if table.paper_layout is not None and layouts != [table.paper_layout]:
            setting += f" (not the paper's {table.paper_layout})"
    return setting


def chart_figure(table: AblationTable, rows: Sequence[RowSummary], width: int = 960):
    """The chart as a matplotlib Figure (Agg canvas, `width` pixels wide at 100 dpi; no pyplot
    state). Row i (1-based, from the left) is a bar of its mean box AP with ± one sample std
    over the seeds as an error bar and each seed's AP as a dot; the baseline's mean is a dashed
    horizontal line (artist id "baseline"); rows without runs read "not run". Under the title,
    what the runs were trained on (`runs_setting`: data, and the detector layout where it is not
    the paper's). The rows are numbered under the bars and named in the legend below. Build and
    save it inside `matplotlib.style.context("default")` (as `write_report` does) so that the
    user's matplotlibrc does not change it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(rows)
    figure = Figure(figsize=(width / _DPI, 3.9 + 0.22 * (n + 1)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    values = [v for row in rows for v in [row.mean["AP"]] + [r.metrics["AP"] for r in row.runs] if v is not None]
    values += [row.mean["AP"] + row.std["AP"] for row in rows if row.std["AP"] is not None]
    top = math.ceil(max(values + [1.0]) * 1.15 / 5) * 5
    ax.set_ylim(0, top)
    ax.set_xlim(0.4, n + 0.6)
    handles = []
    for i, row in enumerate(rows):
        colour = _TAB10[i % len(_TAB10)]
        _draw_row(ax, i + 1, row, colour, top * 0.01)
        runs = f"{len(row.runs)} run{'s' if len(row.runs) > 1 else ''}" if row.runs else "not run"
        handles.append(Patch(facecolor=colour if row.runs else "none", edgecolor=colour, hatch=None if row.runs else "//",
                             label=f"{i + 1}. {row.label} ({row.experiment}, {runs})"))
    base = next((row for row in rows if row.experiment == table.baseline and row.mean["AP"] is not None), None)
    if base is not None:
        ax.axhline(base.mean["AP"], color="0.1", linestyle="--", linewidth=1, zorder=3, gid="baseline")
        handles.append(Line2D([], [], color="0.1", linestyle="--", linewidth=1,
                              label=f"baseline mean ({base.label})"))
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("row")
    ax.set_ylabel("box AP (%)")
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    figure.suptitle(table.title, fontsize=11, x=0.01, horizontalalignment="left")
    ax.set_title(f"ours: {runs_setting(table, rows)}", fontsize=9, loc="left", color="0.3")
    figure.legend(handles=handles, loc="outside lower left", fontsize=9, frameon=False)
    return figure


def render_chart(table: AblationTable, rows: Sequence[RowSummary], width: int = 960) -> np.ndarray:
    """The chart of `chart_figure` as an HxWx3 uint8 BGR image (W = `width`; for cv2.imwrite)."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        figure = chart_figure(table, rows, width)
        figure.canvas.draw()
        rgba = np.asarray(figure.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., 2::-1])


def _save_atomically(figure, path: Path, fmt: str) -> None:
    """figure -> `path` in format `fmt` via a temporary file in the same folder and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format=fmt, dpi=_DPI, metadata={"Date": None} if fmt == "svg" else None)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_chart(table: AblationTable, rows: Sequence[RowSummary], chart_path: Path) -> None:
    """The chart as `chart_path` (its suffix picks the format, PNG for .png) and as an SVG next
    to it (same name, .svg; text kept as text). ValueError for a suffix matplotlib cannot write."""
    import matplotlib.style

    fmt = chart_path.suffix.lstrip(".").lower() or "png"
    with matplotlib.style.context("default"):
        figure = chart_figure(table, rows)
        if fmt not in figure.canvas.get_supported_filetypes():
            raise ValueError(f"cannot write a chart as {chart_path}: use a .png file name")
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "detkit"}):
            _save_atomically(figure, chart_path, fmt)
            if fmt != "svg":
                _save_atomically(figure, chart_path.with_suffix(".svg"), "svg")


def write_report(table: AblationTable, runs: Sequence[RunResult], markdown_path: str | Path | None = None,
                 chart_path: str | Path | None = None) -> str:
    """Summarise `runs` (`collect_runs`) for `table`, write the Markdown (with the chart
    linked) and the chart: `chart_path` (PNG) and the same chart as SVG beside it
    (`<name>.svg`); every file is written atomically. Returns the Markdown."""
    rows = summarize(table, runs)
    markdown = render_markdown(table, rows)
    if chart_path is not None:
        chart_path = Path(chart_path)
        chart_path.parent.mkdir(parents=True, exist_ok=True)
        _write_chart(table, rows, chart_path)
        if markdown_path is not None:
            markdown += f"\n![{table.title}]({chart_path.name})\n"
    if markdown_path is not None:
        markdown_path = Path(markdown_path)
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = markdown_path.with_name(f".{markdown_path.name}.tmp")
        tmp.write_text(markdown)
        os.replace(tmp, markdown_path)
    return markdown
