"""Sweep records (detkit.ablation.records): the file format and its checks, upsert, reports
from records files beside run folders, and the sweep that skips recorded runs and records
new ones. The sweep runs here without training: `train_command` is replaced by a script that
writes a run folder's metrics.json and train_stats.json from its overrides."""
from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import detkit.ablation.sweep as sweep_module
from detkit.ablation.records import (RECORDS_FORMAT, Records, SweepRecords, load_records, record_of, save_records,
                                     upsert)
from detkit.ablation.report import collect_runs, summarize
from detkit.ablation.sweep import plan_pretrain, plan_runs, run_sweep, weights_override
from detkit.ablation.tables import load_table
from tests.ablation.test_report import make_run

REPO = Path(__file__).resolve().parents[2]
TABLE = "dcnv1_table3"          # 4 experiments
SHA_A = hashlib.sha256(b"backbone of machine A").hexdigest()

# The fake training run: AP from the experiment and the seed, so that every run differs.
FAKE_TRAIN = '''
import json, sys
from pathlib import Path
overrides = dict(arg.split("=", 1) for arg in sys.argv[1:])
experiment, seed = overrides["experiment"], int(overrides["seed"])
run_dir = Path(overrides["hydra.run.dir"][1:-1])      # quote_override's quotes (no quotes in tmp paths)
with open(sys.argv[0] + ".log", "a") as log:
    log.write(f"{experiment} {seed}\\n")
(run_dir / ".hydra").mkdir(parents=True, exist_ok=True)   # what the report reads of a real run's folder
(run_dir / ".hydra" / "hydra.yaml").write_text(
    f"hydra:\\n  runtime:\\n    choices:\\n      experiment: {experiment}\\n      data: {overrides['data']}\\n")
(run_dir / "config.yaml").write_text(f"seed: {seed}\\n")
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
    monkeypatch.setattr(sweep_module, "train_command", lambda spec: [sys.executable, str(script), *spec.overrides])
    return Path(str(script) + ".log")


def trained_runs(log: Path) -> list[tuple[str, int]]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return sorted((line.split()[0], int(line.split()[1])) for line in lines)


def finish(spec, ap: float) -> None:
    """Make `spec`'s run folder look finished."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
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
])
def test_invalid_files_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "records.json"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
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
    import detkit.data.build
    from detkit.cli.ablate import ablate

    monkeypatch.setattr(detkit.data.build, "prepare_data", lambda data_cfg: None)   # the fake runs read no data
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
    with pytest.raises(ValueError) as error:
        ablate(["seeds=[0,1,2]", "out=" + str(tmp_path / "c"), *args])
    message = str(error.value)
    assert "made from the pre-training backbone" in message and "another file (record=...)" in message
    assert "bbox/AP 31.50" in message and "bbox/AP 29.25" in message
    assert hashlib.sha256(b"other weights").hexdigest()[:12] in message
    assert path.read_bytes() == before
    assert len(trained_runs(trained)) == 8 and not (tmp_path / "c" / "dcnv1").exists()


def test_record_option_names_a_json_file(tmp_path):
    from detkit.cli.ablate import read_options

    assert read_options([f"table={TABLE}"])["record"] is None
    assert read_options([f"table={TABLE}", f"record={tmp_path / 'r.json'}"])["record"] == tmp_path / "r.json"
    with pytest.raises(ValueError, match="record must be a .json file"):
        read_options([f"table={TABLE}", f"record={tmp_path / 'r.yaml'}"])
