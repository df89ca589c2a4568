"""The papers' claims read from runs (detkit.study.claims): each comparison's difference
and verdict, a claim's verdict from its comparisons, the paper's differences, the Markdown,
and tools/report.py printing them after the tables."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from detkit.study.claims import (CLAIMS, QUANTITIES, Claim, Comparison, read_claim, read_claims,
                                    render_claims)
from detkit.study.report import RunResult, collect_runs
from detkit.study.tables import load_table, table_names
from tests.ablation.test_report import make_run

REPO = Path(__file__).resolve().parents[2]


def run(experiment: str, seed: int, ap: float, ap50: float | None = None, ap75: float | None = None,
        aps: float | None = None, apl: float | None = None) -> RunResult:
    metrics = {"AP": ap, "AP50": ap50, "AP75": ap75, "APs": aps, "APm": None, "APl": apl}
    return RunResult(Path("records.json"), experiment, "synthetic_geometry", seed, metrics, 0.5, 1000)


def runs_of(experiment: str, aps: list[float], **metrics: list[float]) -> list[RunResult]:
    return [run(experiment, seed, ap, **{k: v[seed] for k, v in metrics.items()}) for seed, ap in enumerate(aps)]


GAIN = Claim("T", "a helps", (Comparison("dcnv1/res5abc", "dcnv1/baseline", "AP", "gain"),))
BASE = [30.0, 31.0, 32.0]


@pytest.mark.parametrize("row_aps, verdict", [
    ([32.0, 33.0, 34.0], "holds"),                 # +2.0 in every seed: 2 SE = 0
    ([29.0, 30.5, 30.0], "does not hold"),         # -1.0, -0.5, -2.0: mean -1.17, 2 SE 0.88
    ([31.0, 30.0, 33.0], "within noise"),          # +1, -1, +1: mean +0.33, 2 SE 1.33
])
def test_a_gain_reads_against_twice_its_standard_error(row_aps, verdict):
    result = read_claim(GAIN, [*runs_of("dcnv1/baseline", BASE), *runs_of("dcnv1/res5abc", row_aps)])
    differences = [r - b for r, b in zip(row_aps, BASE)]
    (comparison,) = result.comparisons
    assert comparison.delta == pytest.approx(statistics.fmean(differences))
    assert comparison.delta_2se == pytest.approx(2 * statistics.stdev(differences) / math.sqrt(3))
    assert comparison.seeds == (3, 3)
    assert comparison.verdict == verdict and result.verdict == verdict


def test_fewer_than_two_seeds_is_not_measured():
    one_seed = [*runs_of("dcnv1/baseline", BASE), run("dcnv1/res5abc", 0, 40.0)]
    (comparison,) = read_claim(GAIN, one_seed).comparisons
    assert comparison.delta == pytest.approx(40.0 - statistics.fmean(BASE)) and comparison.delta_2se is None
    assert comparison.verdict == "not measured"
    (missing,) = read_claim(GAIN, runs_of("dcnv1/baseline", BASE)).comparisons
    assert missing.delta is None and missing.seeds == (0, 3) and missing.verdict == "not measured"


def test_two_seeds_show_a_difference_but_are_not_read():
    """Two runs a side give a standard error with one degree of freedom: two per-seed
    differences that happen to agree (-0.4, -0.5) would read 'does not hold' at 2 SE = 0.1."""
    two = [*runs_of("dcnv1/baseline", BASE[:2]), *runs_of("dcnv1/res5abc", [29.6, 30.5])]
    (comparison,) = read_claim(GAIN, two).comparisons
    assert comparison.delta == pytest.approx(-0.45) and comparison.delta_2se == pytest.approx(0.1)
    assert comparison.seeds == (2, 2) and comparison.verdict == "not measured"
    assert comparison.seeds_for() is None            # nor is its spread planned on
    third = [*two, run("dcnv1/baseline", 2, 32.0), run("dcnv1/res5abc", 2, 31.6)]
    assert read_claim(GAIN, third).comparisons[0].verdict == "does not hold"


def test_saturation_holds_unless_the_further_gain_is_beyond_noise():
    claim = Claim("T", "saturates", (Comparison("dcnv1/res5abc_res4", "dcnv1/res5abc", "AP", "no further gain"),))
    three = runs_of("dcnv1/res5abc", BASE)
    assert read_claim(claim, [*three, *runs_of("dcnv1/res5abc_res4", [31.0, 30.0, 33.0])]).verdict == "holds"
    assert read_claim(claim, [*three, *runs_of("dcnv1/res5abc_res4", [28.0, 29.0, 30.0])]).verdict == "holds"
    assert read_claim(claim, [*three, *runs_of("dcnv1/res5abc_res4", [32.0, 33.0, 34.5])]).verdict == "does not hold"


def test_contrasts_compare_per_run_differences_of_two_metrics():
    """'Mostly at AP75': the row's AP75 - AP50 against the base's, seed by seed."""
    claim = Claim("T", "strict", (Comparison("dcnv1/dpool", "dcnv1/baseline", "AP75 - AP50", "gain"),))
    base = runs_of("dcnv1/baseline", BASE, ap50=[50.0, 51.0, 52.0], ap75=[30.0, 30.0, 31.0])
    # AP75 up by 3, 4, 3 and AP50 by 1, 1, 1: the contrast grows by 2, 3, 2
    row = runs_of("dcnv1/dpool", [32.0, 33.0, 34.0], ap50=[51.0, 52.0, 53.0], ap75=[33.0, 34.0, 34.0])
    (comparison,) = read_claim(claim, [*base, *row]).comparisons
    assert comparison.delta == pytest.approx(7 / 3)
    assert comparison.delta_2se == pytest.approx(2 * statistics.stdev([2, 3, 2]) / math.sqrt(3))
    assert comparison.verdict == "holds"
    # a run without the metric (no large objects: APl undefined) drops out of a contrast using it
    assert QUANTITIES["APl - APs"](run("x", 0, 1.0, aps=10.0, apl=None)) is None
    assert QUANTITIES["APl - APs"](run("x", 0, 1.0, aps=10.0, apl=25.0)) == pytest.approx(15.0)


def test_seeds_needed_for_the_resolution_scale_with_the_spread_seen():
    # per-seed differences +1, -1, +1: 2 SE = 1.33 with 3 seeds -> 3 * (1.33 / 0.6)^2 = 14.8 -> 15
    (comparison,) = read_claim(GAIN, [*runs_of("dcnv1/baseline", BASE),
                                      *runs_of("dcnv1/res5abc", [31.0, 30.0, 33.0])]).comparisons
    assert comparison.seeds_for(0.6) == math.ceil(3 * (comparison.delta_2se / 0.6) ** 2)
    assert comparison.seeds_for(0.6) == 15 and comparison.seeds_for(comparison.delta_2se) == 3
    (unmeasured,) = read_claim(GAIN, runs_of("dcnv1/baseline", BASE)).comparisons
    assert unmeasured.seeds_for() is None


def test_a_claim_needs_every_comparison():
    claim = Claim("T", "both", (Comparison("dcnv1/res5abc", "dcnv1/baseline", "AP", "gain"),
                                Comparison("dcnv1/dpool", "dcnv1/baseline", "AP", "gain")))
    base = runs_of("dcnv1/baseline", BASE)
    up = runs_of("dcnv1/res5abc", [32.0, 33.0, 34.0])
    assert read_claim(claim, [*base, *up, *runs_of("dcnv1/dpool", [32.0, 33.0, 34.0])]).verdict == "holds"
    assert read_claim(claim, [*base, *up, *runs_of("dcnv1/dpool", [31.0, 30.0, 33.0])]).verdict == "within noise"
    flat = runs_of("dcnv1/res5abc", [31.0, 30.0, 33.0])     # within noise
    assert read_claim(claim, [*base, *flat, *runs_of("dcnv1/dpool", [28.0, 29.0, 30.0])]).verdict == "does not hold"
    assert read_claim(claim, [*base, *up]).verdict == "not measured"
    # "does not hold" wins over "not measured": one comparison against the claim is a reading
    assert read_claim(claim, [*base, *runs_of("dcnv1/res5abc", [28.0, 29.0, 30.0])]).verdict == "does not hold"
    # One gain that holds and one that does not: mixed, not either of them
    down = runs_of("dcnv1/dpool", [28.0, 29.0, 30.0])
    assert read_claim(claim, [*base, *up, *down]).verdict == "mixed"


def test_a_failed_gain_with_a_holding_saturation_is_not_mixed():
    # "help, then saturate": the saturation part holding says nothing when the help does not
    claim = Claim("T1", "help then saturate", (Comparison("dcnv1/res5abc", "dcnv1/baseline", "AP", "gain"),
                                               Comparison("dcnv1/res5abc_res4", "dcnv1/res5abc", "AP",
                                                          "no further gain")))
    runs = [*runs_of("dcnv1/baseline", BASE), *runs_of("dcnv1/res5abc", [28.0, 29.0, 30.0]),
            *runs_of("dcnv1/res5abc_res4", [28.0, 29.0, 30.0])]
    assert [r.verdict for r in read_claim(claim, runs).comparisons] == ["does not hold", "holds"]
    assert read_claim(claim, runs).verdict == "does not hold"


def test_the_claims_name_table_rows_and_quote_the_papers_differences():
    experiments = {e for name in table_names() for e in load_table(name).experiments}
    for claim in CLAIMS:
        for comparison in claim.comparisons:
            assert {comparison.row, comparison.base} <= experiments
            if comparison.paper_table is not None:
                assert {comparison.row, comparison.base} <= set(load_table(comparison.paper_table).experiments)
    (first, _) = read_claims([])[0].comparisons
    table = {row.experiment: row.paper for row in load_table("dcnv1_table1").rows}
    expected = ", ".join(f"{column} {r - b:+.1f}" for column, r, b in zip(
        load_table("dcnv1_table1").paper_columns, table["dcnv1/res5abc"], table["dcnv1/baseline"]))
    assert first.paper == expected
    with pytest.raises(ValueError, match="quantity must be one of"):
        Comparison("a", "b", "AP99", "gain")


def test_markdown_lists_every_comparison_with_its_verdict():
    runs = [*runs_of("dcnv1/baseline", BASE), *runs_of("dcnv1/res5abc", [32.0, 33.0, 34.0])]
    markdown = render_claims(read_claims(runs))
    lines = [l for l in markdown.splitlines() if l.startswith("| ")][1:]
    assert len(lines) == sum(len(c.comparisons) for c in CLAIMS)
    first = [c.strip() for c in lines[0].strip("|").split("|")]
    assert first[0] == f"{CLAIMS[0].name}: {CLAIMS[0].statement}"
    assert first[1] == "**not measured**"            # its saturation row has no runs
    assert first[2:] == ["`dcnv1/res5abc` vs `dcnv1/baseline`", "AP (gain)", "+2.0 ± 0.0", "3 / 3", "2",
                         first[7], "holds"]


def test_report_prints_the_claims_after_all_tables_only(tmp_path):
    for seed, ap in enumerate(BASE):
        make_run(tmp_path / "runs" / "base" / f"seed{seed}", "dcnv1/baseline", seed, ap, 0.5, 1000)
        make_run(tmp_path / "runs" / "res5abc" / f"seed{seed}", "dcnv1/res5abc", seed, ap + 2, 0.5, 1000)
    command = [sys.executable, str(REPO / "tools" / "report.py"), f"runs=[{tmp_path / 'runs'}]"]
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "### The papers' claims, read from these runs" in output
    assert output.index("### DCNv1 Table 1") < output.index("The papers' claims")
    assert "| `dcnv1/res5abc` vs `dcnv1/baseline` | AP (gain) | +2.0 ± 0.0 | 3 / 3 |" in output
    one_table = subprocess.run([*command, "table=dcnv1_table1"], capture_output=True, text=True, check=True,
                               cwd=tmp_path).stdout
    assert "claims" not in one_table and "### DCNv1 Table 1" in one_table
    subprocess.run([*command, f"out={tmp_path / 'report'}"], capture_output=True, text=True, check=True,
                   cwd=tmp_path)
    assert (tmp_path / "report" / "claims.md").read_text() == render_claims(read_claims(
        collect_runs([tmp_path / "runs"])))
