"""The ablation report from fixture run folders: statistics, layout, paper numbers, chart,
and tools/report.py's command line."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.study.report import chart_figure, collect_runs, render_chart, render_markdown, runs_setting, summarize, write_report
from detkit.study.tables import load_table

REPO = Path(__file__).resolve().parents[2]
REPORT = str(REPO / "tools" / "report.py")

# experiment -> per-seed (AP, sec/iter, parameters); APl is null (no large objects) everywhere
FIXTURE = {
    "dcnv2/regular": [(20.0, 0.50, 8_000_000), (22.0, 0.52, 8_000_000), (21.0, 0.48, 8_000_000)],
    "dcnv2/dconv_c5_dpool": [(25.0, 0.70, 9_000_000), (26.0, 0.72, 9_000_000), (27.0, 0.68, 9_000_000)],
    "dcnv2/mdconv_c3_c5_mdpool": [(21.0, 0.90, 9_500_000), (23.0, 0.95, 9_500_000), (19.0, 1.00, 9_500_000)],
}


def make_run(run_dir: Path, experiment: str, seed: int, ap: float, sec: float, params: int,
             data: str = "synthetic") -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      experiment: {experiment}\n      data: {data}\n")
    (run_dir / "config.yaml").write_text(f"seed: {seed}\n")
    metrics = {"iteration": 300, "bbox/AP": ap, "bbox/AP50": ap + 20, "bbox/AP75": ap - 5, "bbox/APs": ap - 10,
               "bbox/APm": ap + 2, "bbox/APl": None}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "train_stats.json").write_text(json.dumps({"parameters": params, "sec_per_iter": sec}))


@pytest.fixture
def sweep(tmp_path):
    for experiment, seeds in FIXTURE.items():
        for seed, (ap, sec, params) in enumerate(seeds):
            make_run(tmp_path / experiment / f"seed{seed}", experiment, seed, ap, sec, params)
    return tmp_path


def test_summary_statistics(sweep):
    table = load_table("dcnv2_table1")
    rows = {r.experiment: r for r in summarize(table, collect_runs([sweep]))}
    assert [r.experiment for r in summarize(table, collect_runs([sweep]))] == table.experiments  # paper order
    base, dconv = rows["dcnv2/regular"], rows["dcnv2/dconv_c5_dpool"]
    assert base.seeds == [0, 1, 2]
    assert base.mean["AP"] == pytest.approx(21.0) and base.std["AP"] == pytest.approx(1.0)
    assert base.mean["AP50"] == pytest.approx(41.0) and base.mean["APl"] is None and base.std["APl"] is None
    assert dconv.delta_ap == pytest.approx(5.0)
    # paired by seed: per-seed differences 5, 4, 6 (s_d = 1), not the unpaired 2 sqrt(1/3 + 1/3)
    assert dconv.delta_ap_2se == pytest.approx(2 * 1.0 / math.sqrt(3))
    assert dconv.time_ratio == pytest.approx(0.70 / 0.50)          # medians
    assert dconv.parameters == 9_000_000
    assert rows["dcnv2/mdconv_c3_c5_mdpool"].std["AP"] == pytest.approx(statistics.stdev([21, 23, 19]))
    assert rows["dcnv2/dconv_c4_c5_dpool"].runs == () and rows["dcnv2/dconv_c4_c5_dpool"].mean["AP"] is None


def test_delta_unpaired_when_the_seeds_differ(tmp_path):
    """Rows that share fewer than two seeds with the baseline fall back to the unpaired
    standard error of the difference of the means."""
    for seed, ap in zip([0, 1, 2], [20.0, 22.0, 21.0]):
        make_run(tmp_path / "base" / f"seed{seed}", "dcnv2/regular", seed, ap, 0.5, 1)
    for seed, ap in zip([5, 6, 7], [25.0, 27.0, 26.0]):
        make_run(tmp_path / "row" / f"seed{seed}", "dcnv2/dconv_c5_dpool", seed, ap, 0.5, 1)
    rows = {r.experiment: r for r in summarize(load_table("dcnv2_table1"), collect_runs([tmp_path]))}
    row = rows["dcnv2/dconv_c5_dpool"]
    assert row.delta_ap == pytest.approx(5.0)
    assert row.delta_ap_2se == pytest.approx(2 * math.sqrt(1 / 3 + 1 / 3))


def test_markdown_layout(sweep):
    table = load_table("dcnv2_table1")
    text = render_markdown(table, summarize(table, collect_runs([sweep])))
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "AP | AP50 | AP75 | APs | APm | APl" in lines["row"] and "paper AP" in lines["row"]
    assert "| 21.0 ± 1.0 | 41.0 ± 1.0 |" in lines["regular conv"] and "| baseline |" in lines["regular conv"]
    assert "| 34.7 |" in lines["regular conv"]                                       # the paper's number
    dconv = lines["DCNv1: dconv conv5 + dpool"]
    assert "+5.0 ± 1.2 *" in dconv and "1.40x" in dconv and "9.00M" in dconv and "| 38.0 |" in dconv
    modulated = lines["DCNv2: mdconv conv3-5 + mdpool"]
    assert "+0.0 ± 2.0 |" in modulated and "*" not in modulated.split("|")[-5]       # within the spread
    assert "not run" in lines["dconv conv4-5 + dpool"]
    assert "| n/a |" in lines["regular conv"]                                        # APl undefined
    assert "Zhu et al." in text and "arXiv 1811.11168" in text


def test_the_runs_detector_layout_is_set_beside_the_papers(sweep):
    make_run(sweep / "fpn" / "baseline" / "seed0", "fpn/baseline", 0, 20.0, 0.5, 1)
    for config in sweep.rglob("config.yaml"):
        config.write_text(config.read_text() + "model:\n  layout: fpn\n")
    runs = collect_runs([sweep])
    assert {r.layout for r in runs} == {"fpn"}
    single_scale = load_table("dcnv2_table1")
    assert "detector layout: fpn (not the paper's single_scale)" in render_markdown(single_scale, summarize(single_scale, runs))
    mmdet = load_table("fpn_mmdet")       # whose paper is an FPN: no remark
    text = render_markdown(mmdet, summarize(mmdet, runs))
    assert "detector layout: fpn;" in text and "not the paper's" not in text
    # The chart says it under its title too: a picture read on its own must not pass for the paper's setting.
    from matplotlib.text import Text

    figure = chart_figure(single_scale, summarize(single_scale, runs))
    texts = [t.get_text() for t in figure.findobj(Text)]
    assert "ours: data=synthetic; detector layout: fpn (not the paper's single_scale)" in texts


def test_two_seeds_are_not_starred(tmp_path):
    """A difference from two seeds shows its 2 SE (one degree of freedom) but no star."""
    for seed, (base_ap, row_ap) in enumerate([(20.0, 25.0), (22.0, 27.2)]):
        make_run(tmp_path / "base" / f"seed{seed}", "dcnv2/regular", seed, base_ap, 0.5, 1)
        make_run(tmp_path / "row" / f"seed{seed}", "dcnv2/dconv_c5_dpool", seed, row_ap, 0.5, 1)
    table = load_table("dcnv2_table1")
    text = render_markdown(table, summarize(table, collect_runs([tmp_path])))
    (line,) = [l for l in text.splitlines() if l.startswith("| DCNv1: dconv conv5")]
    assert "+5.1 ± 0.2 |" in line                      # per-seed 5.0, 5.2: far beyond 2 SE, yet unread
    make_run(tmp_path / "base" / "seed2", "dcnv2/regular", 2, 21.0, 0.5, 1)
    make_run(tmp_path / "row" / "seed2", "dcnv2/dconv_c5_dpool", 2, 26.1, 0.5, 1)
    text = render_markdown(table, summarize(table, collect_runs([tmp_path])))
    (line,) = [l for l in text.splitlines() if l.startswith("| DCNv1: dconv conv5")]
    assert "+5.1 ± 0.1 *" in line


def _longest_vertical_run(mask: np.ndarray) -> int:
    """The most consecutive True pixels in any column of an HxW mask (a bar's height in pixels)."""
    best = 0
    for column in mask.T:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], column.astype(np.int8), [0]])))
        if len(edges):
            best = max(best, int((edges[1::2] - edges[::2]).max()))
    return best


def test_chart_draws_bars_to_scale(sweep):
    table = load_table("dcnv2_table1")
    image = render_chart(table, summarize(table, collect_runs([sweep])))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[1] == 960
    # Bar heights follow the means: measure each bar's height in its own colour (BGR; the legend's
    # patches of the same colour are short and lie elsewhere).
    heights = []
    for colour in [(180, 119, 31), (14, 127, 255)]:      # rows 1 and 2 (blue, orange)
        heights.append(_longest_vertical_run(np.all(image == colour, axis=2)))
    assert heights[0] > 100
    assert heights[1] / heights[0] == pytest.approx(26.0 / 21.0, rel=0.03)


def test_chart_ignores_the_users_matplotlib_settings(sweep):
    import matplotlib
    from cycler import cycler

    table = load_table("dcnv2_table1")
    rows = summarize(table, collect_runs([sweep]))
    expected = render_chart(table, rows)
    with matplotlib.rc_context({"axes.prop_cycle": cycler(color=["k"]), "figure.facecolor": "red",
                                "font.size": 20, "lines.linestyle": ":"}):
        assert np.array_equal(render_chart(table, rows), expected)


def _svg_groups(root) -> dict[str, object]:
    return {g.get("id"): g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("id")}


def _path_ys(element) -> list[float]:
    """The y coordinates of the first SVG path under `element` ("M x y L x y ..." as matplotlib writes)."""
    d = next(element.iter("{http://www.w3.org/2000/svg}path")).get("d").replace("z", "").split()
    return [float(v) for v in d[2::3]]


def test_write_report_files(sweep, tmp_path):
    table = load_table("dcnv2_table1")
    text = write_report(table, collect_runs([sweep]), tmp_path / "out" / "t.md", tmp_path / "out" / "t.png")
    assert (tmp_path / "out" / "t.md").read_text() == text and "![" in text and "(t.png)" in text
    assert cv2.imread(str(tmp_path / "out" / "t.png")) is not None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.md", "t.png", "t.svg"]  # no temp files left

    png = cv2.imread(str(tmp_path / "out" / "t.png"))
    assert png.shape[1] == 960 and 400 <= png.shape[0] <= 800
    assert (png.min(axis=2) < 200).mean() > 0.03                       # not blank: bars, text, axes
    assert np.all(png == (180, 119, 31), axis=2).sum() > 1000          # row 1's bar, tab:blue in BGR

    import xml.etree.ElementTree as ET

    root = ET.parse(tmp_path / "out" / "t.svg").getroot()
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert table.title in texts
    assert f"ours: {runs_setting(table, summarize(table, collect_runs([sweep])))}" in texts
    groups = _svg_groups(root)
    # One bar per row that was run (rows 1, 2 and 5 of the table's 5); the others read "not run".
    assert sorted(k for k in groups if k.startswith("bar-")) == ["bar-1", "bar-2", "bar-5"]
    assert sorted(k for k in groups if k.startswith("missing-")) == ["missing-3", "missing-4"]
    assert all("not run" in "".join(groups[k].itertext()) for k in ("missing-3", "missing-4"))
    for row in (1, 2, 5):                                               # a dot per seed
        assert len(list(groups[f"seeds-{row}"].iter("{http://www.w3.org/2000/svg}use"))) == 3
    baseline = next(groups["baseline"].iter("{http://www.w3.org/2000/svg}path"))
    assert "stroke-dasharray" in baseline.get("style")                 # dashed
    base_y, bar1_top, bar2_top = _path_ys(groups["baseline"])[0], min(_path_ys(groups["bar-1"])), \
        min(_path_ys(groups["bar-2"]))
    assert base_y == pytest.approx(bar1_top, abs=0.01) and bar2_top < base_y - 5   # at row 1's mean (21 < 26)
    assert len(set(_path_ys(groups["baseline"]))) == 1                 # horizontal


def test_mixed_data_settings_are_refused(sweep):
    make_run(sweep / "coco_run", "dcnv2/regular", 5, 30.0, 0.1, 1, data="coco")
    with pytest.raises(ValueError, match="mix data configs"):
        summarize(load_table("dcnv2_table1"), collect_runs([sweep]))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, timeout=120)


def test_cli_renders_tables_with_runs(sweep, tmp_path):
    result = run(f"runs=[{sweep}]")
    assert result.returncode == 0, result.stderr
    assert "### DCNv2 Table 1" in result.stdout and "### DCNv1 Table 1" not in result.stdout   # only tables with runs
    result = run(f"runs=[{sweep / 'dcnv2' / 'regular' / 'seed0'}]", f"out={tmp_path / 'rep'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rep" / "dcnv2_table1.md").is_file() and (tmp_path / "rep" / "dcnv2_table1.png").is_file()
    assert (tmp_path / "rep" / "dcnv2_table1.svg").is_file()                        # the chart as SVG beside it


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/runs"], "/nonexistent/runs does not exist"),
    (["EMPTY"], "holds no finished run"),
    (["BADJSON"], "is not valid JSON"),
    (["OTHER"], "are in no ablation table"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    make_run(tmp_path / "other", "smoke", 0, 1.0, 0.1, 1)
    paths = {"EMPTY": tmp_path / "empty", "BADJSON": tmp_path / "bad", "OTHER": tmp_path / "other"}
    result = run("runs=[" + ",".join(str(paths.get(a, a)) for a in args) + "]")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_table_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="known tables: dcn_generations, dcnv1_table1, dcnv1_table3, dcnv2_table1, fpn_mmdet"):
        load_table("dcnv3_table9")
    (tmp_path / "t.yaml").write_text(
        "title: t\nbaseline: a\npaper: {source: s, columns: [AP, AP50]}\nrows:\n"
        "  - {experiment: a, label: A, paper: [1.0]}\n")
    with pytest.raises(ValueError, match="row 0 .a. has 1 paper numbers for 2 paper columns"):
        load_table("t", tmp_path)
    (tmp_path / "u.yaml").write_text(
        "title: t\nbaseline: z\npaper: {source: s, columns: [AP]}\nrows:\n  - {experiment: a, label: A, paper: [1]}\n")
    with pytest.raises(ValueError, match="baseline 'z' is not one of the rows"):
        load_table("u", tmp_path)


def test_report_metrics_are_the_evaluation_summary_keys():
    from detkit.study.report import METRICS
    from detkit.evaluation.coco_eval import SUMMARY_KEYS

    assert METRICS == SUMMARY_KEYS
