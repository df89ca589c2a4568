"""The papers' claims, read from an ablation sweep: holds / does not hold / mixed / within noise.

Each claim (`CLAIMS`) rests on one or more comparisons of two table rows (experiments), each
of one quantity per run: AP, or a contrast such as AP75 - AP50 ("the gain is mostly at the
strict threshold") or APl - APs ("the gain grows with object size"). A comparison's
difference and its twice standard error come from `detkit.study.report.difference`
(paired by seed where the rows share two seeds or more), and it reads:

- expect "gain": holds where the difference exceeds +2 SE, does not hold where it is below
  -2 SE, within noise otherwise;
- expect "no further gain" (saturation): holds unless the difference exceeds +2 SE;
- not measured: a row without runs, or fewer than `MIN_SEEDS_TO_READ` (3) seeds on a side
  (a standard error from two runs has one degree of freedom: its Δ and 2 SE are shown, unread).

A claim holds when every comparison holds; is mixed when one comparison expecting a gain
holds and another does not (the same claim tested in two models, say DCNv1's res5 and DCNv2's
conv3-5 rows, comes out both ways: neither verdict alone would be the reading); does not hold
when one comparison does not; is not measured while one is not measured; and is within noise
otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from detkit.study.report import MIN_SEEDS_TO_READ, RunResult, difference
from detkit.study.tables import load_table

__all__ = ["Comparison", "Claim", "ComparisonResult", "ClaimResult", "CLAIMS", "QUANTITIES",
           "read_claim", "read_claims", "render_claims"]

HOLDS, DOES_NOT_HOLD, WITHIN_NOISE, NOT_MEASURED = "holds", "does not hold", "within noise", "not measured"
MIXED = "mixed"
RESOLUTION = 0.6   # AP: the 2 SE a claim's comparison should reach (docs/ablations.md); the seeds it needs are shown


def _contrast(high: str, low: str) -> Callable[[RunResult], float | None]:
    def value(run: RunResult) -> float | None:
        a, b = run.metrics[high], run.metrics[low]
        return None if a is None or b is None else a - b
    return value


# quantity name -> its value for one run (None where a metric is not defined, e.g. no large objects)
QUANTITIES: dict[str, Callable[[RunResult], float | None]] = {
    "AP": lambda run: run.metrics["AP"],
    "AP75 - AP50": _contrast("AP75", "AP50"),
    "APl - APs": _contrast("APl", "APs"),
}


@dataclass(frozen=True)
class Comparison:
    row: str                 # experiment (configs/experiment/)
    base: str                # the experiment it is compared with
    quantity: str            # a QUANTITIES key
    expect: str              # "gain" or "no further gain"
    paper_table: str | None = None   # a configs/ablation/ table holding both rows: its paper numbers are quoted

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {list(QUANTITIES)}, got {self.quantity!r}")
        if self.expect not in ("gain", "no further gain"):
            raise ValueError(f"expect must be 'gain' or 'no further gain', got {self.expect!r}")


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    comparisons: tuple[Comparison, ...]


CLAIMS: tuple[Claim, ...] = (
    Claim("DCNv1 Table 1", "more deformable layers help, then saturate", (
        Comparison("dcnv1/res5abc", "dcnv1/baseline", "AP", "gain", "dcnv1_table1"),
        Comparison("dcnv1/res5abc_res4", "dcnv1/res5abc", "AP", "no further gain", "dcnv1_table1"),
    )),
    Claim("DCNv1 Table 3", "deformable RoI pooling helps, mostly at the strict IoU threshold (AP75)", (
        Comparison("dcnv1/dpool", "dcnv1/baseline", "AP", "gain", "dcnv1_table3"),
        Comparison("dcnv1/dpool", "dcnv1/baseline", "AP75 - AP50", "gain", "dcnv1_table3"),
    )),
    Claim("DCNv2 Table 1", "deformable conv in conv3-5 beats conv5 only", (
        Comparison("dcnv2/dconv_c3_c5_dpool", "dcnv2/dconv_c5_dpool", "AP", "gain", "dcnv2_table1"),
    )),
    Claim("DCNv2 Table 1 / mmdetection", "modulation adds a little (mdconv over dconv in conv3-5)", (
        Comparison("dcnv2/mdconv_c3_c5_mdpool", "dcnv2/dconv_c3_c5_dpool", "AP", "gain", "dcnv2_table1"),
        Comparison("fpn/mdconv_c3_c5", "fpn/dconv_c3_c5", "AP", "gain", "fpn_mmdet"),
    )),
    Claim("DCNv2 Table 1 / DCNv1 Table 2", "the gains grow with object size (APl - APs rises over the plain model's)", (
        Comparison("dcnv1/res5abc", "dcnv1/baseline", "APl - APs", "gain"),
        Comparison("dcnv2/mdconv_c3_c5_mdpool", "dcnv2/regular", "APl - APs", "gain"),
        Comparison("fpn/mdconv_c3_c5", "fpn/baseline", "APl - APs", "gain"),
    )),
)


@dataclass(frozen=True)
class ComparisonResult:
    comparison: Comparison
    delta: float | None          # mean difference (row minus base)
    delta_2se: float | None      # twice its standard error
    seeds: tuple[int, int]       # runs of the row, of the base
    verdict: str
    paper: str                   # the paper's difference in its own columns, or ""

    def seeds_for(self, resolution: float = RESOLUTION) -> int | None:
        """Seeds per row that would bring 2 SE to `resolution` at the spread seen so far
        (2 SE shrinks as 1 / sqrt(seeds)); None without a standard error or from fewer than
        `MIN_SEEDS_TO_READ` seeds a side (a spread from two runs is too unsteady to plan on)."""
        if self.delta_2se is None or min(self.seeds) < MIN_SEEDS_TO_READ:
            return None
        n = min(self.seeds)
        return max(2, math.ceil(n * (self.delta_2se / resolution) ** 2 - 1e-9))


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    comparisons: tuple[ComparisonResult, ...]
    verdict: str


def _verdict(delta: float | None, delta_2se: float | None, expect: str, seeds: int) -> str:
    if delta is None or delta_2se is None or seeds < MIN_SEEDS_TO_READ:
        return NOT_MEASURED
    if expect == "no further gain":
        return DOES_NOT_HOLD if delta > delta_2se else HOLDS
    if delta > delta_2se:
        return HOLDS
    return DOES_NOT_HOLD if delta < -delta_2se else WITHIN_NOISE


def _paper_difference(comparison: Comparison) -> str:
    """The paper's row-minus-base difference in each of its table's columns, for AP comparisons."""
    if comparison.paper_table is None or comparison.quantity != "AP":
        return ""
    table = load_table(comparison.paper_table)
    numbers = {row.experiment: row.paper for row in table.rows}
    row, base = numbers.get(comparison.row), numbers.get(comparison.base)
    if row is None or base is None:
        raise ValueError(f"table {table.name} lacks {comparison.row} or {comparison.base}")
    cells = [f"{column} {r - b:+.1f}" for column, r, b in zip(table.paper_columns, row, base)
             if r is not None and b is not None]
    return ", ".join(cells) if cells else "not published"


def read_claim(claim: Claim, runs: Sequence[RunResult]) -> ClaimResult:
    """`claim` read from `runs` (`detkit.study.report.collect_runs`), by experiment name."""
    results = []
    for comparison in claim.comparisons:
        row = [r for r in runs if r.experiment == comparison.row]
        base = [r for r in runs if r.experiment == comparison.base]
        delta, delta_2se = difference(row, base, QUANTITIES[comparison.quantity])
        results.append(ComparisonResult(comparison, delta, delta_2se, (len(row), len(base)),
                                        _verdict(delta, delta_2se, comparison.expect, min(len(row), len(base))),
                                        _paper_difference(comparison)))
    verdicts = {r.verdict for r in results}
    gains = {r.verdict for r in results if r.comparison.expect == "gain"}
    verdict = (MIXED if {HOLDS, DOES_NOT_HOLD} <= gains else DOES_NOT_HOLD if DOES_NOT_HOLD in verdicts
               else NOT_MEASURED if NOT_MEASURED in verdicts else HOLDS if verdicts == {HOLDS} else WITHIN_NOISE)
    return ClaimResult(claim, tuple(results), verdict)


def read_claims(runs: Sequence[RunResult], claims: Sequence[Claim] = CLAIMS) -> list[ClaimResult]:
    return [read_claim(claim, runs) for claim in claims]


def render_claims(results: Sequence[ClaimResult], heading_level: int = 3) -> str:
    """The claims as Markdown: one line per comparison (ours ± 2 SE with the runs behind it,
    the paper's difference, the verdict), the claim's verdict in bold on its first line."""
    header = ["claim", "verdict", "comparison", "quantity", "ours: Δ ± 2 SE", "runs (row / base)",
              f"seeds for 2 SE ≤ {RESOLUTION}", "paper Δ", "reads"]
    lines = [f"{'#' * heading_level} The papers' claims, read from these runs", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        for i, r in enumerate(result.comparisons):
            c = r.comparison
            ours = "n/a" if r.delta is None else f"{r.delta:+.1f}" + ("" if r.delta_2se is None else f" ± {r.delta_2se:.1f}")
            expect = "gain" if c.expect == "gain" else "no more than noise"
            first = i == 0
            lines.append("| " + " | ".join([
                f"{result.claim.name}: {result.claim.statement}" if first else "",
                f"**{result.verdict}**" if first else "",
                f"`{c.row}` vs `{c.base}`", f"{c.quantity} ({expect})", ours,
                f"{r.seeds[0]} / {r.seeds[1]}", "n/a" if r.seeds_for() is None else str(r.seeds_for()),
                r.paper or "", r.verdict]) + " |")
    lines += ["", "Δ: the row's mean minus the base's, paired by seed where they share two seeds or more, "
              "± twice its standard error. A comparison expecting a gain holds beyond +2 SE, does not hold "
              "below -2 SE, and is within noise between; one expecting no further gain (saturation) holds "
              "unless it exceeds +2 SE; fewer than "
              f"{MIN_SEEDS_TO_READ} seeds on a side is not measured (Δ shown, not read)."
              " A claim holds when "
              "all its comparisons hold, and is mixed when one expecting a gain holds and another does not "
              "(detkit/study/claims.py). Seeds for 2 SE ≤ "
              f"{RESOLUTION}: per row, at the spread seen so far ({MIN_SEEDS_TO_READ} seeds or more). Paper Δ: the same two rows in the "
              "paper's own table and metric (COCO AP or VOC mAP), where it publishes both."]
    return "\n".join(lines) + "\n"
