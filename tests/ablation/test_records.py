"""Sweep records (detkit.study.records): the file format and its checks, upsert, reports
from records files beside run folders, the sweep that skips recorded runs and records new
ones, two sweeps sharing a records file and run folders, and the check of a record's resolved
config against the one its run would use now. The sweep runs here without training: `train_command` is replaced by a script that writes a run
folder's config.yaml (composed from its overrides and written as the trainer writes it),
metrics.json and train_stats.json."""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import detkit.study.sweep as sweep_module
import detkit.config.compose
from detkit.study.records import (ABSENT, RECORDS_FORMAT, Records, SweepRecords, config_differences, load_records,
                                     lock_path, portable_config, record_of, save_records, upsert)
from detkit.study.report import collect_runs, render_markdown, summarize
from detkit.study.sweep import RUN_LOCK, plan_pretrain, plan_runs, run_overrides, run_sweep, weights_override
from detkit.study.tables import load_table
from detkit.io import file_lock
from tests.ablation.test_report import make_run

REPO = Path(__file__).resolve().parents[2]
TABLE = "dcnv1_table3"          # 4 experiments
SHA_A = hashlib.sha256(b"backbone of machine A").hexdigest()

# The fake training run: its config.yaml as the trainer writes it (the config Hydra composes
# from the run's overrides, without the hydra node, resolved); AP from the experiment and the
# seed, so that every run differs.
FAKE_TRAIN = '''
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
from detkit.config.compose import check_config
overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
experiment, seed = overrides["experiment"], int(overrides["seed"])
run_dir = Path(overrides["hydra.run.dir"][1:-1])      # quote_override's quotes (no quotes in tmp paths)
with open(sys.argv[0] + ".log", "a") as log:
    log.write(f"{experiment} {seed}\\n")
(run_dir / ".hydra").mkdir(parents=True, exist_ok=True)   # what the report reads of a real run's folder
(run_dir / ".hydra" / "hydra.yaml").write_text(
    f"hydra:\\n  runtime:\\n    choices:\\n      experiment: {experiment}\\n      data: {overrides['data']}\\n")
composed = check_config("train", sys.argv[1:])
job_config = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
(run_dir / "config.yaml").write_text(OmegaConf.to_yaml(job_config, resolve=True))
ap = 10 + seed + len(experiment) / 10                 # fake_ap
(run_dir / "metrics.json").write_text(json.dumps({"iteration": 1, "bbox/AP": ap, "bbox/APl": None}))
(run_dir / "train_stats.json").write_text(json.dumps({"parameters": 1000, "sec_per_iter": 0.5}))
'''


def fake_ap(experiment: str, seed: int) -> float:
    return 10 + seed + len(experiment) / 10


@pytest.fixture
def trained(monkeypatch, tmp_path) -> Path:
    """Runs start the fake training; returns its log file (one 'experiment seed' line per run)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(sweep_module, "train_command", lambda spec: [sys.executable, str(script), *run_overrides(spec)])
    return Path(str(script) + ".log")


def trained_runs(log: Path) -> list[tuple[str, int]]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return sorted((line.split()[0], int(line.split()[1])) for line in lines)


def finish(spec, ap: float) -> None:
    """Make `spec`'s run folder look finished (its config.yaml a short stand-in with two paths)."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"seed": spec.seed, "data": {"root": str(spec.run_dir / "data"), "num_classes": 4},
         "model": {"backbone": {"weights": "~/w.pth", "depth": 18}}, "schedule": {"max_iters": 3}}))
    (spec.run_dir / "metrics.json").write_text(json.dumps({"iteration": 3, "bbox/AP": ap, "bbox/APl": None}))
    (spec.run_dir / "train_stats.json").write_text(json.dumps({"parameters": 7, "sec_per_iter": 0.25}))


def specs_for(out: Path, seeds=(0,), train=()) -> list:
    backbone = out / "pretrain" / "backbone_synthetic" / "backbone.pth"
    return plan_runs([load_table(TABLE)], "synthetic", list(seeds), out, [*train, weights_override(backbone)])


# ---------------------------------------------------------------------------- the file

def test_round_trip(tmp_path):
    spec = specs_for(tmp_path / "out")[1]
    finish(spec, 12.5)
    record = record_of(spec, SHA_A)
    assert (record["experiment"], record["seed"], record["data"]) == (spec.experiment, 0, "synthetic")
    assert record["overrides"] == [f"experiment={spec.experiment}", "data=synthetic", "seed=0"]   # no paths
    assert record["metrics"] == {"iteration": 3, "bbox/AP": 12.5, "bbox/APl": None}
    assert record["train_stats"] == {"parameters": 7, "sec_per_iter": 0.25}
    assert record["pretrain_backbone_sha256"] == SHA_A
    assert record["config"] == {"seed": 0, "data": {"root": "<path>", "num_classes": 4},
                                "model": {"backbone": {"weights": "<path>", "depth": 18}}, "schedule": {"max_iters": 3}}
    assert datetime.datetime.fromisoformat(record["recorded_at"]).utcoffset() == datetime.timedelta(0)
    path = tmp_path / "records.json"
    assert load_records(path) == Records()                          # no file yet: empty
    pretrain = {"experiment": "pretrain/backbone_synthetic", "overrides": ["experiment=pretrain/backbone_synthetic"],
                "metrics": {"bbox/AP": 30.0}, "backbone_sha256": SHA_A, "recorded_at": "2026-12-03T10:00:00+00:00",
                "host": "a"}
    save_records(path, Records([record], {"synthetic": pretrain}))
    content = json.loads(path.read_text())
    assert content["format"] == RECORDS_FORMAT and content["version"] == 1
    assert load_records(path) == Records([record], {"synthetic": pretrain})


def _record(**changes) -> dict:
    record = {"experiment": "dcnv1/baseline", "seed": 0, "data": "synthetic", "overrides": ["seed=0"],
              "metrics": {"bbox/AP": 10.0}, "train_stats": {}, "pretrain_backbone_sha256": None,
              "recorded_at": "2026-12-03T10:00:00+00:00", "host": "a"}
    record.update(changes)
    return record


def _file(runs) -> str:
    return json.dumps({"format": RECORDS_FORMAT, "version": 1, "runs": runs})


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"format": "detkit-ablation-records", "version": 1, "runs": [], "x": NaN}', "is not valid JSON"),
    (json.dumps({"format": "something-else", "version": 1, "runs": []}), "is not a detkit-ablation-records file"),
    (json.dumps([1, 2]), "is not a detkit-ablation-records file"),
    (json.dumps({"format": RECORDS_FORMAT, "version": 2, "runs": []}), "records version 2"),
    (json.dumps({"format": RECORDS_FORMAT, "version": 1, "runs": {}}), '"runs" must be a list'),
    (_file([{k: v for k, v in _record().items() if k != "metrics"}]), "runs[0] (dcnv1/baseline seed 0) has no metrics"),
    (_file([_record(), _record(metrics={"bbox/AP": "12.3"})]),
     "runs[1] (dcnv1/baseline seed 0): metrics['bbox/AP'] must be a number or null; got '12.3'"),
    (_file([_record(metrics={"bbox/AP": True})]), "metrics['bbox/AP'] must be a number or null"),
    (_file([_record(seed=-1)]), "seed must be a non-negative integer"),
    (_file([_record(overrides="seed=0")]), "overrides must be a list of strings"),
    (_file([_record(pretrain_backbone_sha256="abc")]), "pretrain_backbone_sha256 must be 64 lowercase hex digits"),
    (_file([_record(command="rm -rf /")]), "unknown fields command"),
    (_file([_record(config=["seed", 0])]), "runs[0] (dcnv1/baseline seed 0): config must be a JSON object"),
    (_file([_record(same_run_as="dcnv1/baseline")]), "same_run_as must be another experiment's name"),
    (_file([_record(same_run_as=3)]), "same_run_as must be another experiment's name"),
])
def test_invalid_files_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "records.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        load_records(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_upsert_replaces_the_matching_record_only():
    runs = [_record(seed=0), _record(seed=1), _record(seed=1, overrides=["seed=1", "schedule.max_iters=2"])]
    again = _record(seed=1, metrics={"bbox/AP": 99.0})
    updated = upsert(runs, again)
    assert updated == [runs[0], again, runs[2]]
    assert runs[1]["metrics"] == {"bbox/AP": 10.0}                  # the input list is left as it was
    other_data = _record(seed=1, data="synthetic_geometry")
    assert upsert(runs, other_data) == [*runs, other_data]


# ---------------------------------------------------------------------------- reports

def test_collect_runs_mixes_folders_and_records(tmp_path):
    for seed, ap in enumerate([20.0, 22.0]):
        make_run(tmp_path / "runs" / "regular" / f"seed{seed}", "dcnv2/regular", seed, ap, 0.5, 8)
    path = tmp_path / "results.json"
    save_records(path, Records([
        _record(experiment="dcnv2/regular", seed=1, metrics={"bbox/AP": 50.0}),     # also a folder: the folder wins
        _record(experiment="dcnv2/regular", seed=2, metrics={"bbox/AP": 21.0},
                train_stats={"parameters": 8, "sec_per_iter": 0.5}),
        *(_record(experiment="dcnv2/dconv_c5_dpool", seed=s, metrics={"bbox/AP": ap, "bbox/APl": None},
                  train_stats={"parameters": 9, "sec_per_iter": 0.7}) for s, ap in enumerate([25.0, 26.0, 27.0])),
    ]))
    runs = collect_runs([tmp_path / "runs", path])
    by_run = {(r.experiment, r.seed): r for r in runs}
    assert sorted(by_run) == [("dcnv2/dconv_c5_dpool", s) for s in range(3)] + [("dcnv2/regular", s) for s in range(3)]
    assert len(runs) == 6
    assert by_run[("dcnv2/regular", 1)].metrics["AP"] == 22.0 and by_run[("dcnv2/regular", 1)].run_dir.is_dir()
    recorded = by_run[("dcnv2/dconv_c5_dpool", 2)]
    assert recorded.run_dir == path.resolve() and recorded.data == "synthetic"
    assert recorded.metrics["AP"] == 27.0 and recorded.metrics["APl"] is None and recorded.metrics["AP50"] is None
    assert (recorded.sec_per_iter, recorded.parameters) == (0.7, 9)
    rows = {r.experiment: r for r in summarize(load_table("dcnv2_table1"), runs)}
    assert rows["dcnv2/regular"].seeds == [0, 1, 2] and rows["dcnv2/regular"].mean["AP"] == pytest.approx(21.0)
    assert rows["dcnv2/dconv_c5_dpool"].delta_ap == pytest.approx(5.0)            # paired over seeds 0-2
    assert rows["dcnv2/dconv_c5_dpool"].time_ratio == pytest.approx(0.7 / 0.5)

    report = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), f"runs=[{path}]"],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    line = next(l for l in report.stdout.splitlines() if "`dcnv2/dconv_c5_dpool`" in l)
    assert [c.strip() for c in line.strip("|").split("|")][2:4] == ["0,1,2", "26.0 ± 1.0"]


def test_collect_runs_refuses_one_run_recorded_with_two_settings(tmp_path):
    save_records(tmp_path / "a.json", Records([_record(overrides=["seed=0"])]))
    save_records(tmp_path / "b.json", Records([_record(overrides=["seed=0", "schedule.max_iters=9"])]))
    with pytest.raises(ValueError, match="dcnv1/baseline seed 0 .data=synthetic. is recorded twice with different"):
        collect_runs([tmp_path / "a.json", tmp_path / "b.json"])
    save_records(tmp_path / "empty.json", Records())
    with pytest.raises(ValueError, match="empty.json holds no finished run"):
        collect_runs([tmp_path / "empty.json"])


# ---------------------------------------------------------------------------- the sweep

def test_sweep_skips_recorded_runs_and_records_new_ones(tmp_path, trained):
    path = tmp_path / "results.json"
    first = specs_for(tmp_path / "machine_a", seeds=[0])
    records = SweepRecords.open(path, load_records(path), first, "synthetic", SHA_A)
    assert set(run_sweep(first, records=records, log=lambda line: None).values()) == {"done"}
    saved = load_records(path).runs
    assert sorted((r["experiment"], r["seed"]) for r in saved) == sorted((s.experiment, 0) for s in first)
    assert all(r["metrics"]["bbox/AP"] == fake_ap(r["experiment"], r["seed"]) for r in saved)
    assert all(r["pretrain_backbone_sha256"] == SHA_A for r in saved)

    # A fresh machine (other out=, so other run folders and weights paths), seeds 0 and 1.
    second = specs_for(tmp_path / "machine_b", seeds=[0, 1])
    lines = []
    status = run_sweep(second, records=SweepRecords.open(path, load_records(path), second, "synthetic", SHA_A),
                       log=lines.append)
    assert {s.seed for s, result in status.items() if result == "recorded"} == {0}
    assert {s.seed for s, result in status.items() if result == "done"} == {1}
    assert f"skip dcnv1/baseline seed 0: recorded ({path})" in lines
    assert any(line.startswith("4 runs to train (0 finished, 4 recorded), ") for line in lines)
    assert trained_runs(trained) == sorted((s.experiment, s.seed) for s in second)   # seed 0 once, on machine A
    assert not any(s.run_dir.exists() for s in second if s.seed == 0)
    assert len(load_records(path).runs) == 8

    # Other overrides for the recorded runs: refused, the file unchanged.
    before = path.read_bytes()
    third = specs_for(tmp_path / "machine_c", train=["schedule.max_iters=2"])
    with pytest.raises(ValueError, match="made with other overrides .* use another record= file"):
        SweepRecords.open(path, load_records(path), third, "synthetic", SHA_A)
    assert path.read_bytes() == before


def test_finished_folders_are_recorded_at_the_start(tmp_path, trained):
    path = tmp_path / "results.json"
    specs = specs_for(tmp_path / "out")
    finish(specs[2], 17.0)
    records = SweepRecords.open(path, load_records(path), specs[2:3], "synthetic", SHA_A)
    assert run_sweep(specs[2:3], records=records, log=lambda line: None) == {specs[2]: "skipped"}
    assert trained_runs(trained) == []
    [record] = load_records(path).runs
    assert (record["experiment"], record["metrics"]["bbox/AP"]) == (specs[2].experiment, 17.0)
    # The same results again leave the file as it is (no new time stamp to commit).
    before = path.read_bytes()
    run_sweep(specs[2:3], records=SweepRecords.open(path, load_records(path), specs[2:3], "synthetic", SHA_A),
              log=lambda line: None)
    assert path.read_bytes() == before


def machine(out: Path, backbone: bytes, pretrain_ap: float, train: list[str]) -> None:
    """`out` as a machine that has pre-trained: the pre-training run folder with its backbone."""
    spec = plan_pretrain("backbone_synthetic", out, train)
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "ablate.json").write_text(json.dumps({"overrides": list(spec.overrides)}))
    (spec.run_dir / "metrics.json").write_text(json.dumps({"iteration": 5, "bbox/AP": pretrain_ap}))
    (spec.run_dir / "backbone.pth").write_bytes(backbone)


def test_ablate_command_goes_on_from_the_records_and_refuses_another_pretraining(tmp_path, trained, monkeypatch,
                                                                                capsys):
    from detkit.data.sources import SyntheticShapes
    from detkit.study.cli.ablate import ablate

    monkeypatch.setattr(SyntheticShapes, "prepare", lambda self: None)   # the fake runs read no data
    path = tmp_path / "docs" / "results.json"
    train = ["schedule.max_iters=1"]
    args = [f"table={TABLE}", f"record={path}", "--", *train]
    table = load_table(TABLE)

    machine(tmp_path / "a", b"pre-trained weights", 31.5, train)
    assert ablate(["seeds=[0]", "out=" + str(tmp_path / "a"), *args]) == 0
    content = load_records(path)
    assert content.pretrain["synthetic"]["backbone_sha256"] == hashlib.sha256(b"pre-trained weights").hexdigest()
    assert content.pretrain["synthetic"]["metrics"]["bbox/AP"] == 31.5
    assert len(content.runs) == 4 and all(r["overrides"][3:] == train for r in content.runs)

    # A fresh machine whose pre-training gave the same backbone: trains seed 1 only, reports both.
    machine(tmp_path / "b", b"pre-trained weights", 31.5, train)
    capsys.readouterr()
    assert ablate(["seeds=[0,1]", "out=" + str(tmp_path / "b"), *args]) == 0
    assert capsys.readouterr().out.count(": recorded (") == 4
    assert trained_runs(trained) == sorted((e, s) for e in table.experiments for s in (0, 1))
    report = (tmp_path / "b" / f"{TABLE}.md").read_text()
    for experiment in table.experiments:
        line = next(l for l in report.splitlines() if f"`{experiment}`" in l)
        cells = [c.strip() for c in line.strip("|").split("|")]
        mean = (fake_ap(experiment, 0) + fake_ap(experiment, 1)) / 2
        assert cells[2] == "0,1" and cells[3].startswith(f"{mean:.1f} ± ")

    # A machine whose pre-training gave another backbone: refused before any run, both APs named.
    machine(tmp_path / "c", b"other weights", 29.25, train)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="made from the pre-training backbone") as error:
        ablate(["seeds=[0,1,2]", "out=" + str(tmp_path / "c"), *args])
    message = str(error.value)
    assert "made from the pre-training backbone" in message and "another file (record=...)" in message
    assert "bbox/AP 31.50" in message and "bbox/AP 29.25" in message
    assert hashlib.sha256(b"other weights").hexdigest()[:12] in message
    assert path.read_bytes() == before
    assert len(trained_runs(trained)) == 8 and not (tmp_path / "c" / "dcnv1").exists()


def test_ablate_trains_rows_with_identical_configs_once(tmp_path, trained, monkeypatch, capsys):
    """On data=synthetic_geometry every family trains with the same schedule, so dcnv2/regular
    is dcnv1/baseline and dcnv2/dconv_c5_dpool is dcnv1/res5abc_dpool: the sweep trains each
    pair once, reports the run under both rows, and records it under both names (marked)."""
    from detkit.data.sources import SyntheticShapes
    from detkit.study.cli.ablate import ablate

    monkeypatch.setattr(SyntheticShapes, "prepare", lambda self: None)   # the fake runs read no data
    path = tmp_path / "records.json"
    pairs = {"dcnv2/regular": "dcnv1/baseline", "dcnv2/dconv_c5_dpool": "dcnv1/res5abc_dpool"}
    args = ["table=[dcnv1_table3,dcnv2_table1]", f"rows=[{','.join([*pairs.values(), *pairs])}]",
            "data=synthetic_geometry", "seeds=[0,1]", f"out={tmp_path / 'out'}", f"record={path}",
            "--", "schedule.max_iters=1"]
    assert ablate(args) == 0
    output = capsys.readouterr().out
    for alias, source in pairs.items():
        assert f"same run: {source}, {alias} have identical training configs: one run per seed" in output
    assert trained_runs(trained) == sorted((e, s) for e in pairs.values() for s in (0, 1))
    records = {(r["experiment"], r["seed"]): r for r in load_records(path).runs}
    assert len(records) == 8
    for (alias, source), seed in [(pair, seed) for pair in pairs.items() for seed in (0, 1)]:
        same, original = records[(alias, seed)], records[(source, seed)]
        assert same["same_run_as"] == source and "same_run_as" not in original
        assert same["metrics"] == original["metrics"] and same["config"] == original["config"]
        assert same["overrides"][0] == f"experiment={alias}"
    table = load_table("dcnv2_table1")
    report = (tmp_path / "out" / "dcnv2_table1.md").read_text()
    line = next(l for l in report.splitlines() if "`dcnv2/regular`" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    mean = (fake_ap("dcnv1/baseline", 0) + fake_ap("dcnv1/baseline", 1)) / 2
    assert cells[2] == "0,1" and cells[3].startswith(f"{mean:.1f} ± ")
    assert ("`dcnv2/regular` is the same model trained the same way as `dcnv1/baseline` (identical training "
            "config), so its runs are those") in report
    # From the records file alone (another machine, tools/report.py) the rows are there too.
    rows = {r.experiment: r for r in summarize(table, collect_runs([path]))}
    assert rows["dcnv2/regular"].mean["AP"] == pytest.approx(mean)
    assert {r.same_run_as for r in rows["dcnv2/regular"].runs} == {"dcnv1/baseline"}
    assert "identical training config" in render_markdown(table, list(rows.values()))
    assert rows["dcnv2/dconv_c5_dpool"].seeds == [0, 1]
    # Again: nothing to train, nothing rewritten.
    before = path.read_bytes()
    assert ablate(args) == 0
    assert len(trained_runs(trained)) == 4 and path.read_bytes() == before


def test_rows_use_the_run_another_row_of_their_group_made(tmp_path, trained, monkeypatch):
    """A sweep of some rows (rows=) uses the run an identical row made in an earlier sweep, and
    trains a group's run itself where none exists."""
    from detkit.data.sources import SyntheticShapes
    from detkit.study.cli.ablate import ablate

    monkeypatch.setattr(SyntheticShapes, "prepare", lambda self: None)   # the fake runs read no data
    path = tmp_path / "records.json"
    common = ["table=[dcnv1_table3,fpn_mmdet]", "data=synthetic_geometry", "seeds=[0]", f"record={path}",
              "--", "schedule.max_iters=1"]
    assert ablate(["rows=[fpn/baseline]", f"out={tmp_path / 'a'}", *common]) == 0
    assert trained_runs(trained) == [("fpn/baseline", 0)]
    # Another machine (no run folders), other rows: dcnv1/baseline is fpn/baseline's recorded
    # run; dcnv1/dpool (identical to fpn/dpool, which has no run) is trained, and recorded for both.
    assert ablate(["rows=[dcnv1/baseline,dcnv1/dpool]", f"out={tmp_path / 'b'}", *common]) == 0
    assert trained_runs(trained) == [("dcnv1/dpool", 0), ("fpn/baseline", 0)]
    records = {r["experiment"]: r for r in load_records(path).runs}
    assert records["dcnv1/baseline"]["same_run_as"] == "fpn/baseline"
    assert records["fpn/dpool"]["same_run_as"] == "dcnv1/dpool" and "same_run_as" not in records["dcnv1/dpool"]
    report = (tmp_path / "b" / "fpn_mmdet.md").read_text()        # every run there is, not only rows=
    line = next(l for l in report.splitlines() if "`fpn/baseline`" in l)
    assert [c.strip() for c in line.strip("|").split("|")][2] == "0"


def test_rows_sharing_a_run_are_recorded_as_soon_as_it_is(tmp_path, trained, monkeypatch):
    """A sweep cut short (a session's end kills it) still leaves the rows that share a finished
    run in the records file: they are recorded when that run is, not when the sweep ends."""
    from detkit.data.sources import SyntheticShapes
    from detkit.study.cli.ablate import ablate

    monkeypatch.setattr(SyntheticShapes, "prepare", lambda self: None)   # the fake runs read no data
    path = tmp_path / "records.json"
    recorded_when_started = {}
    fake_command = sweep_module.train_command

    def command(spec):      # built just before the run starts (jobs=1: the runs go one after the other)
        runs = load_records(path).runs if path.is_file() else []
        recorded_when_started[spec.experiment] = {(r["experiment"], r.get("same_run_as")) for r in runs}
        return fake_command(spec)

    monkeypatch.setattr(sweep_module, "train_command", command)
    assert ablate(["table=[dcnv1_table3,fpn_mmdet]", "rows=[dcnv1/baseline,dcnv1/dpool]", "data=synthetic_geometry",
                   "seeds=[0]", "jobs=1", f"out={tmp_path / 'out'}", f"record={path}",
                   "--", "schedule.max_iters=1"]) == 0
    assert list(recorded_when_started) == ["dcnv1/baseline", "dcnv1/dpool"]
    assert recorded_when_started["dcnv1/dpool"] == {("dcnv1/baseline", None), ("fpn/baseline", "dcnv1/baseline")}
    assert {(r["experiment"], r.get("same_run_as")) for r in load_records(path).runs} == {
        ("dcnv1/baseline", None), ("fpn/baseline", "dcnv1/baseline"), ("dcnv1/dpool", None),
        ("fpn/dpool", "dcnv1/dpool")}


def test_a_finished_member_is_the_run_of_its_group(tmp_path):
    """Per group of identical rows and seed, the run is the one that already exists (a folder
    or a record), whichever row made it; else the group's first row's."""
    from detkit.study.cli.ablate import same_run_sources

    tables = [load_table("dcnv1_table1"), load_table("fpn_mmdet")]
    specs = plan_runs(tables, "synthetic_geometry", [0, 1], tmp_path / "out")
    by_run = {(s.experiment, s.seed): s for s in specs}
    finish(by_run[("fpn/baseline", 1)], 20.0)                      # made before the rows were merged
    sources = same_run_sources(specs, [["dcnv1/baseline", "fpn/baseline"]])
    assert sources == {by_run[("fpn/baseline", 0)]: by_run[("dcnv1/baseline", 0)],
                       by_run[("dcnv1/baseline", 1)]: by_run[("fpn/baseline", 1)]}
    recorded = SimpleNamespace(find=lambda spec: {} if spec == by_run[("fpn/baseline", 0)] else None)
    assert same_run_sources(specs, [["dcnv1/baseline", "fpn/baseline"]], recorded)[by_run[("dcnv1/baseline", 0)]] \
        == by_run[("fpn/baseline", 0)]
    # Nothing done: the first member the sweep may train (rows=); none of them: the group is left out.
    selected = {by_run[("fpn/baseline", 0)]}
    assert same_run_sources(specs, [["dcnv1/baseline", "fpn/baseline"]], selected=selected) == {
        by_run[("dcnv1/baseline", 0)]: by_run[("fpn/baseline", 0)],
        by_run[("dcnv1/baseline", 1)]: by_run[("fpn/baseline", 1)]}
    assert same_run_sources(specs, [["dcnv1/res5c", "fpn/mdpool"]], selected=selected) == {}
    # Two members with runs of their own keep them.
    finish(by_run[("dcnv1/baseline", 1)], 20.0)
    assert by_run[("dcnv1/baseline", 1)] not in same_run_sources(specs, [["dcnv1/baseline", "fpn/baseline"]])


def test_record_option_names_a_json_file(tmp_path):
    from detkit.study.cli.ablate import read_options

    assert read_options([f"table={TABLE}"])["record"] is None
    assert read_options([f"table={TABLE}", f"record={tmp_path / 'r.json'}"])["record"] == tmp_path / "r.json"
    with pytest.raises(ValueError, match="record must be a .json file"):
        read_options([f"table={TABLE}", f"record={tmp_path / 'r.yaml'}"])


# ---------------------------------------------------------------------------- configs

def test_portable_config_replaces_machine_paths_only():
    config = {"seed": 3, "device": "auto", "amp": None, "resume": True, "schedule": {"base_lr": 0.02, "steps": [8, 9]},
              "data": {"root": "/home/a/.cache/detkit/synthetic", "kind": "synthetic", "extra_roots": ["~/d", "d"]},
              "model": {"_target_": "detkit.modeling.build.build_faster_rcnn",
                        "backbone": {"weights": "C:\\weights\\r50.pth", "norm": "frozen_bn"}},
              "out": "~", "relative": "runs/x", "drive_like": "cuda:0", "windows_forward": "D:/w.pth", "empty": ""}
    before = copy.deepcopy(config)
    assert portable_config(config) == {
        "seed": 3, "device": "auto", "amp": None, "resume": True, "schedule": {"base_lr": 0.02, "steps": [8, 9]},
        "data": {"root": "<path>", "kind": "synthetic", "extra_roots": ["<path>", "d"]},
        "model": {"_target_": "detkit.modeling.build.build_faster_rcnn",
                  "backbone": {"weights": "<path>", "norm": "frozen_bn"}},
        "out": "<path>", "relative": "runs/x", "drive_like": "cuda:0", "windows_forward": "<path>", "empty": ""}
    assert config == before                                          # a copy: the input is left as it was


@pytest.mark.parametrize("config, message", [
    ({"data": {"when": datetime.date(2026, 1, 2)}}, "config.data.when is a date"),
    ({"model": {1: "x"}}, "config.model: key 1 is a int"),
    ({"steps": [1, b"2"]}, "config.steps[1] is a bytes"),
])
def test_portable_config_refuses_what_is_not_plain_data(config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        portable_config(config)


def test_config_differences_name_dotted_keys_with_both_values():
    recorded = {"seed": 0, "schedule": {"max_iters": 1000, "steps": [800, 933], "grad_clip": 1},
                "model": {"backbone": {"depth": 34}}, "gone": 1}
    current = {"seed": 0, "schedule": {"max_iters": 2000, "steps": [800, 934], "grad_clip": True},
               "model": {"backbone": {"depth": 34}}, "new": [1]}
    assert config_differences(recorded, current) == [
        ("schedule.max_iters", 1000, 2000), ("schedule.steps[1]", 933, 934), ("schedule.grad_clip", 1, True),
        ("gone", 1, ABSENT), ("new", ABSENT, [1])]
    assert config_differences({"steps": [1, 2]}, {"steps": [1, 2, 3]}) == [("steps", [1, 2], [1, 2, 3])]
    assert config_differences(current, copy.deepcopy(current)) == []


def test_config_differences_read_recorded_builders_under_their_names_now():
    """The records of sweeps run before the optimizer builders moved (docs/results/*.json) name
    them detkit.engine.optim.*: the same builders, no difference; any other name still differs."""
    old = {"schedule": {"optimizer": {"_target_": "detkit.engine.optim.build_optimizer", "base_lr": 0.02},
                        "scheduler": {"_target_": "detkit.engine.optim.build_scheduler"}}}
    new = {"schedule": {"optimizer": {"_target_": "detkit.solver.optim.build_optimizer", "base_lr": 0.02},
                        "scheduler": {"_target_": "detkit.solver.optim.build_scheduler"}}}
    assert config_differences(old, new) == []
    assert config_differences(new, old) == [
        ("schedule.optimizer._target_", "detkit.solver.optim.build_optimizer", "detkit.engine.optim.build_optimizer"),
        ("schedule.scheduler._target_", "detkit.solver.optim.build_scheduler", "detkit.engine.optim.build_scheduler")]
    other = {"schedule": {**new["schedule"], "optimizer": {"_target_": "detkit.engine.optim.build_sgd"}}}
    assert config_differences(other, new)[0][0] == "schedule.optimizer._target_"


def test_records_made_before_the_layer_kinds_match_todays_configs():
    """Records of sweeps run before deform_kind existed hold deform_modulated and
    deform_offset_groups: the same backbones, so check_configs accepts them; a recorded DCNv2
    row still differs from a DCNv1 config."""
    from types import SimpleNamespace
    from detkit.config.registry import upgrade_config
    from detkit.study.records import Records, check_configs
    target = "detkit.modeling.build.build_resnet"
    old = {"model": {"backbone": {"_target_": target, "deform_modulated": True, "deform_offset_groups": 1,
                                  "deform_blocks": {"res5": "all"}}}}
    now = {"model": {"backbone": {"_target_": target, "deform_kind": "dcnv2", "deform_groups": 1,
                                  "deform_options": {}, "deform_blocks": {"res5": "all"}}}}
    assert config_differences(upgrade_config(old), now) == []
    spec = SimpleNamespace(experiment="fpn/mdconv", seed=0, overrides=["experiment=fpn/mdconv", "data=d", "seed=0"])
    record = {"experiment": "fpn/mdconv", "seed": 0, "data": "d", "overrides": spec.overrides, "config": old}
    check_configs("r.json", Records([record], {}), [spec], False, lambda s: now)
    dcnv1 = copy.deepcopy(now)
    dcnv1["model"]["backbone"]["deform_kind"] = "dcnv1"
    with pytest.raises(ValueError, match=r'deform_kind: recorded "dcnv2", now "dcnv1"'):
        check_configs("r.json", Records([record], {}), [spec], False, lambda s: dcnv1)


# Runs the real training tool (detkit.cli.train: Hydra's app, the real `train`) with the parts
# that build data, model and loop replaced, so that the trainer writes its config.yaml and stops.
CONFIG_ONLY_TRAIN = '''
import sys
from types import SimpleNamespace
import detkit.engine.trainer as trainer
from detkit.cli import train as train_cli
trainer.build_training_parts = lambda *args, **kwargs: SimpleNamespace(model=None)
trainer._resume = lambda *args, **kwargs: 0
trainer.build_training_stream = lambda *args, **kwargs: None
def stop(*args, **kwargs):
    raise SystemExit(0)             # called right after config.yaml is written
trainer._make_hooks = stop
sys.argv = ["train", *sys.argv[1:]]
train_cli.main()
'''


def test_the_config_a_run_writes_is_the_one_the_sweep_composes(tmp_path, monkeypatch):
    from detkit.config.compose import check_config
    from detkit.study.cli.ablate import check_record_configs, portable_train_config, train_configs

    monkeypatch.setenv("DETKIT_CACHE", str(tmp_path / "cache"))
    weights = ["model.backbone.weights=/some/abs/path.pth"]
    specs = plan_runs([SimpleNamespace(experiments=["fpn/baseline"])], "synthetic_geometry", [0, 3], tmp_path / "out",
                      weights)
    run = specs[1]
    assert (run.experiment, run.seed) == ("fpn/baseline", 3)
    script = tmp_path / "config_only_train.py"
    script.write_text(CONFIG_ONLY_TRAIN)
    result = subprocess.run([sys.executable, str(script), *run_overrides(run)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (run.run_dir / "checkpoints").exists()                # nothing trained
    written = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert (written["seed"], written["resume"], written["model"]["backbone"]["weights"]) == (3, True,
                                                                                         "/some/abs/path.pth")
    assert written["data"]["root"] == str(tmp_path / "cache" / "synthetic_geometry")
    assert portable_train_config(check_config("train", run_overrides(run))) == portable_config(written)

    # The sweep's check: seed 3's record against fpn/baseline composed once (for seed 0) with seed 3.
    (run.run_dir / "metrics.json").write_text(json.dumps({"iteration": 1, "bbox/AP": 1.0}))
    record = record_of(run, None)
    assert record["config"]["model"]["backbone"]["weights"] == "<path>" and record["config"]["data"]["root"] == "<path>"
    path = tmp_path / "records.json"
    save_records(path, Records([record]))
    configs = train_configs(specs, [0, 3])
    assert list(configs) == ["fpn/baseline"] and configs["fpn/baseline"].seed == 0
    check_record_configs({"record": path}, specs, None, configs)       # the same config: no error
    record["config"]["seed"] = 4
    save_records(path, Records([record]))
    with pytest.raises(ValueError, match=r"holds fpn/baseline seed 3 .*\(seed: recorded 4, now 3\)"):
        check_record_configs({"record": path}, specs, None, configs)


def test_ablate_refuses_records_made_with_other_config_files(tmp_path, trained, monkeypatch):
    from detkit.data.sources import SyntheticShapes
    from detkit.study.cli.ablate import ablate

    monkeypatch.setattr(SyntheticShapes, "prepare", lambda self: None)   # the fake runs read no data
    path = tmp_path / "results.json"
    train = ["schedule.max_iters=1"]
    args = [f"table={TABLE}", f"record={path}", "--", *train]
    experiments = load_table(TABLE).experiments
    machine(tmp_path / "a", b"pre-trained weights", 31.5, train)
    assert ablate(["seeds=[0]", "out=" + str(tmp_path / "a"), *args]) == 0
    assert all(r["config"]["schedule"]["max_iters"] == 1 for r in load_records(path).runs)

    # Unchanged config files: seed 0's records pass against the configs composed for seed 1.
    machine(tmp_path / "b", b"pre-trained weights", 31.5, train)
    assert ablate(["seeds=[1,0]", "out=" + str(tmp_path / "b"), *args]) == 0
    assert trained_runs(trained) == sorted((e, s) for e in experiments for s in (0, 1))

    # A schedule value edited since: refused before anything starts, the key and both values named.
    configs = tmp_path / "configs"
    shutil.copytree(detkit.config.compose.CONFIG_DIR, configs)
    schedule = configs / "schedule" / "ablation" / "dcnv1_synthetic.yaml"
    assert "deform_roi_pool: 0.01\n" in schedule.read_text()
    schedule.write_text(schedule.read_text().replace("deform_roi_pool: 0.01\n", "deform_roi_pool: 0.02\n"))
    machine(tmp_path / "c", b"pre-trained weights", 31.5, train)
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(detkit.config.compose, "CONFIG_DIR", configs)
        with pytest.raises(ValueError, match=r"schedule\.lr_mult\.deform_roi_pool: recorded 0\.01, now 0\.02") as error:
            ablate(["seeds=[0,1,2]", "out=" + str(tmp_path / "c"), *args])
    message = str(error.value)
    assert f"records file {path} holds {experiments[0]} seed 0 (data=synthetic)" in message
    assert "schedule.lr_mult.deform_roi_pool: recorded 0.01, now 0.02" in message
    assert "(and 7 more of this sweep's records)" in message and "use another record= file" in message
    assert path.read_bytes() == before
    assert len(trained_runs(trained)) == 8 and not (tmp_path / "c" / "dcnv1").exists()

    # A record made before configs were recorded cannot be checked: refused, saying so.
    records = load_records(path)
    del records.runs[0]["config"]
    save_records(path, records)
    with pytest.raises(ValueError, match="predates config checking") as error:
        ablate(["seeds=[0]", "out=" + str(tmp_path / "c"), *args])
    first = records.runs[0]
    assert f"its record of {first['experiment']} seed {first['seed']} (data=synthetic) predates config checking" \
        in str(error.value)
    assert len(trained_runs(trained)) == 8 and not (tmp_path / "c" / "dcnv1").exists()


# ---------------------------------------------------------------------------- two sweeps at once

def test_two_sweeps_recording_into_one_file_keep_each_others_records(tmp_path, trained):
    # Both sweeps read the file before either wrote: each must add to what the other wrote,
    # not rewrite the file from its own older copy.
    path = tmp_path / "results.json"
    specs = specs_for(tmp_path / "out", seeds=[0])
    first, second = specs[:2], specs[2:]
    records_a = SweepRecords.open(path, load_records(path), first, "synthetic", SHA_A)
    records_b = SweepRecords.open(path, load_records(path), second, "synthetic", SHA_A)
    assert set(run_sweep(first, records=records_a, log=lambda line: None).values()) == {"done"}
    assert set(run_sweep(second, records=records_b, log=lambda line: None).values()) == {"done"}
    saved = sorted((r["experiment"], r["seed"]) for r in load_records(path).runs)
    assert saved == sorted((s.experiment, 0) for s in specs)
    # The later writer's in-memory records are the file's (callers such as the report use them).
    assert sorted((r["experiment"], r["seed"]) for r in records_b.records.runs) == saved
    assert lock_path(path) == tmp_path / "results.json.lock"


def test_a_run_another_sweep_is_training_is_left_to_it(tmp_path, trained):
    specs = specs_for(tmp_path / "out", seeds=[0])
    busy, free = specs[0], specs[1]
    lines = []
    with file_lock(busy.run_dir / RUN_LOCK) as held:      # the other sweep, training `busy`
        assert held
        status = run_sweep([busy, free], log=lines.append)
    assert status == {busy: "busy", free: "done"}
    assert trained_runs(trained) == [(free.experiment, 0)]
    assert any(line.startswith(f"[1/2] {busy.experiment} seed 0: busy (another sweep is training it") for line in lines)
    assert not (busy.run_dir / "metrics.json").exists()
    # Once the other sweep has let go, the run is this sweep's again.
    assert run_sweep([busy, free], log=lambda line: None) == {busy: "done", free: "skipped"}


def test_a_run_the_other_sweep_finished_meanwhile_is_recorded_not_trained(tmp_path, trained):
    path = tmp_path / "results.json"
    [spec] = specs_for(tmp_path / "out", seeds=[0])[:1]
    records = SweepRecords.open(path, load_records(path), [spec], "synthetic", SHA_A)
    original = sweep_module.file_lock

    def finished_by_the_other_sweep(lock, blocking=True):     # it finishes the run just before we lock
        finish(spec, 21.0)
        return original(lock, blocking)

    sweep_module.file_lock = finished_by_the_other_sweep
    try:
        assert run_sweep([spec], records=records, log=lambda line: None) == {spec: "done"}
    finally:
        sweep_module.file_lock = original
    assert trained_runs(trained) == []
    [record] = load_records(path).runs
    assert record["metrics"]["bbox/AP"] == 21.0


def test_file_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    lock = tmp_path / "sub" / "x.lock"
    with file_lock(lock) as first:
        assert first and lock.is_file()
        with file_lock(lock, blocking=False) as second:
            assert second is False
    with file_lock(lock, blocking=False) as again:
        assert again is True
    # A process killed while holding the lock leaves the file behind but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from detkit.io import file_lock\n"
        f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with file_lock(lock, blocking=False) as while_held:
            assert while_held is False
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, blocking=False) as after_kill:
        assert after_kill is True
