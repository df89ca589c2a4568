"""Sweep records: the results of finished ablation runs as one small JSON file, so that a
sweep too long for one machine runs in parts on fresh machines (tools/ablate.py record=PATH)
and its tables are reported from every part (tools/report.py runs=[PATH]).

A run folder (checkpoints, logs) stays on the machine that trained it; the records file is
what travels (it may be committed). Its layout:

    {"format": "detkit-ablation-records", "version": 1,
     "pretrain": {<data>: <pre-training entry>, ...},
     "runs": [<record>, ...]}

    record: {"experiment", "seed", "data",
             "overrides":  the run's tools/train.py overrides without the machine-specific
                           ones: hydra.run.dir=..., and, with a pre-training backbone, the
                           model.backbone.weights=... that points at it (its sha256 names it),
             "metrics":     the run's metrics.json (name -> number or null),
             "train_stats": its train_stats.json, or {},
             "pretrain_backbone_sha256": sha256 of the backbone the run started from, or null,
             "config":      the run's resolved training config (<run folder>/config.yaml) with
                           its machine paths replaced by "<path>" (`portable_config`); absent
                           in records made before configs were recorded,
             "recorded_at": UTC ISO 8601 time, "host": platform.node(),
             "same_run_as": only where the run is another experiment's (the sweep trained the
                           row once: its training config is identical), that experiment}
    pre-training entry: {"experiment", "overrides", "metrics", "backbone_sha256",
                         "recorded_at", "host"}, the run that made the data config's backbone
                         (its AP tells two pre-trainings apart when their backbones differ).

The record's "config" is what tells a record of the same overrides made with other config
files apart (a schedule edited and committed between two machines): `check_configs` refuses,
before a sweep starts anything, a record whose config differs from the one its run would use
now, and a record without "config" (made before configs were recorded), which cannot be checked.
A recorded config is read in today's argument names first (`detkit.config.registry.upgrade_config`:
a backbone recorded with `deform_modulated` is the same run as one with `deform_kind` now).

A records file is data people exchange: it is read as plain JSON (no NaN or Infinity
constants) and checked field by field (`load_records`: one ValueError naming the file and
what is wrong); nothing in it is executed, and its overrides and configs are only ever
compared, never passed to a training run.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkit.config.registry import RENAMED_TARGETS, upgrade_config
from detkit.io import file_lock, write_json

__all__ = ["RECORDS_FORMAT", "RECORDS_VERSION", "Records", "SweepRecords", "record_of", "pretrain_entry",
           "portable_overrides", "portable_config", "config_differences", "check_configs", "load_records",
           "save_records", "upsert", "record_key", "lock_path", "file_sha256", "PATH_PLACEHOLDER", "ABSENT"]

RECORDS_FORMAT = "detkit-ablation-records"
RECORDS_VERSION = 1

_RECORD_FIELDS = ("experiment", "seed", "data", "overrides", "metrics", "train_stats",
                  "pretrain_backbone_sha256", "recorded_at", "host")
# "config": absent in records made before configs were recorded; "same_run_as": only in the
# record of a row whose training config is another row's (SweepRecords.add_same_run).
_OPTIONAL_RECORD_FIELDS = ("config", "same_run_as")
_PRETRAIN_FIELDS = ("experiment", "overrides", "metrics", "backbone_sha256", "recorded_at", "host")
_SHA256 = re.compile(r"[0-9a-f]{64}")
PATH_PLACEHOLDER = "<path>"
_WINDOWS_ABSOLUTE = re.compile(r"[A-Za-z]:[\\/]")


@dataclass
class Records:
    """A records file's content: the run records and the pre-training entries by data config."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    pretrain: dict[str, dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- making records

def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def portable_overrides(overrides: Sequence[str], backbone_sha256: str | None) -> list[str]:
    """`overrides` without those that name this machine's paths: hydra.run.dir=..., and, when
    the run starts from a pre-training backbone (`backbone_sha256` given), the sweep's
    model.backbone.weights=... pointing at it (the sha256 is what identifies those weights)."""
    return _portable_overrides(overrides, backbone_sha256 is not None)


def _portable_overrides(overrides: Sequence[str], from_backbone: bool) -> list[str]:
    dropped = ("hydra.run.dir=",) + (("model.backbone.weights=",) if from_backbone else ())
    return [o for o in overrides if not o.startswith(dropped)]


def _is_machine_path(value: str) -> bool:
    # Decided by the text alone, not by this machine's os.path: a record made on one system
    # is compared on another.
    return value.startswith(("/", "~")) or _WINDOWS_ABSOLUTE.match(value) is not None


def portable_config(config: Any, where: str = "config") -> Any:
    """A copy of the resolved training config `config` (plain data as yaml.safe_load reads a
    run's config.yaml: dicts, lists, strings, numbers, booleans, None) in which every string
    that is an absolute filesystem path (/..., C:\\... or C:/...) or starts with '~' is
    replaced by PATH_PLACEHOLDER ("<path>"): data.root, model.backbone.weights, any output
    folder; they name this machine's files, and the same run on another machine names others.
    Keys and every other value are kept, relative paths too (they name the same place in each
    machine's working folder). No key is dropped: those that could look machine-specific are
    settings of the run like any other, equal on two machines unless given other values, and
    then the difference is one to see: device (kept as written, e.g. `auto`; the device it
    picks is not in the config), num_workers, eval_batch_size, tensorboard_sampling_images,
    resume (every sweep run has resume=true). What does differ per machine is not in the
    config at all: the number of processes (torchrun's WORLD_SIZE), the threads per run
    (OMP_NUM_THREADS), the DETKIT_CACHE folder (only through data.root, a path).

    Raises ValueError naming the key (`where` and the path below it) for a value that is not
    plain data, or a key that is not a string."""
    if isinstance(config, str):
        return PATH_PLACEHOLDER if _is_machine_path(config) else config
    if config is None or isinstance(config, (bool, int, float)):
        return config
    if isinstance(config, list):
        return [portable_config(item, f"{where}[{i}]") for i, item in enumerate(config)]
    if isinstance(config, dict):
        bad = next((k for k in config if not isinstance(k, str)), None)
        if bad is not None:
            raise ValueError(f"{where}: key {bad!r} is a {type(bad).__name__}; a config's keys must be strings")
        return {key: portable_config(value, f"{where}.{key}") for key, value in config.items()}
    raise ValueError(f"{where} is a {type(config).__name__} ({config!r}), not plain config data (dicts, lists, "
                     f"strings, numbers, booleans, null)")


def _read_config(path: Path) -> dict[str, Any]:
    """The portable form of the config.yaml a training run wrote into its folder."""
    import yaml

    if not path.is_file():
        raise ValueError(f"{path} does not exist: a finished run's folder holds the resolved config its "
                         f"training wrote at the start")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not plain YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a config (a mapping); got {type(config).__name__}")
    return portable_config(config, str(path))


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    return values[-1] if values else None


def _read_json_object(path: Path) -> dict[str, Any]:
    data = _parse_json(path.read_text(), path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(data).__name__}")
    return data


def record_of(spec, backbone_sha256: str | None) -> dict[str, Any]:
    """The record of finished run `spec` (a `detkit.study.sweep.RunSpec`), which started
    from the pre-training backbone with sha256 `backbone_sha256` (None: no such backbone)."""
    if not spec.finished:
        raise ValueError(f"{spec.experiment} seed {spec.seed} has not finished (no {spec.run_dir / 'metrics.json'})")
    data = _override_value(spec.overrides, "data")
    if data is None:
        raise ValueError(f"{spec.experiment} seed {spec.seed}: its overrides name no data config (data=...)")
    stats_path = spec.run_dir / "train_stats.json"
    record = {"experiment": spec.experiment, "seed": int(spec.seed), "data": data,
              "overrides": portable_overrides(spec.overrides, backbone_sha256),
              "metrics": _read_json_object(spec.run_dir / "metrics.json"),
              "train_stats": _read_json_object(stats_path) if stats_path.is_file() else {},
              "pretrain_backbone_sha256": backbone_sha256, "config": _read_config(spec.run_dir / "config.yaml"),
              "recorded_at": _now(), "host": platform.node()}
    _check_record(record, f"the record of {spec.run_dir}")
    return record


def pretrain_entry(spec, backbone_sha256: str) -> dict[str, Any]:
    """The pre-training entry of pre-training run `spec` whose backbone has sha256
    `backbone_sha256` (its metrics {} if the run folder has no metrics.json)."""
    metrics_path = spec.run_dir / "metrics.json"
    entry = {"experiment": spec.experiment, "overrides": portable_overrides(spec.overrides, None),
             "metrics": _read_json_object(metrics_path) if metrics_path.is_file() else {},
             "backbone_sha256": backbone_sha256, "recorded_at": _now(), "host": platform.node()}
    _check_pretrain(entry, f"the pre-training entry of {spec.run_dir}")
    return entry


def record_key(record: Mapping[str, Any]) -> tuple:
    """What identifies a record: (experiment, seed, data, overrides)."""
    return record["experiment"], record["seed"], record["data"], tuple(record["overrides"])


def upsert(runs: Iterable[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
    """`runs` with `record` in place of the one with the same `record_key` (appended if none)."""
    key, runs = record_key(record), list(runs)
    for i, other in enumerate(runs):
        if record_key(other) == key:
            runs[i] = record
            return runs
    return [*runs, record]


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file beside records file `path` (`<name>.lock`) that sweeps writing to it take
    in turn (`detkit.io.file_lock`); never committed (.gitignore)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


# ---------------------------------------------------------------------------- reading, checking

def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:   # json.JSONDecodeError is one
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(entry: Any, fields: Sequence[str], where: str, optional: Sequence[str] = ()) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object; got {type(entry).__name__}")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}")
    unknown = sorted(set(entry) - set(fields) - set(optional))
    if unknown:
        raise ValueError(f"{where} has unknown fields {', '.join(unknown)} (expected only "
                         f"{', '.join((*fields, *optional))})")


def _check_type(value: Any, ok: Callable[[Any], bool], where: str, expected: str) -> None:
    if not ok(value):
        raise ValueError(f"{where} must be {expected}; got {value!r}")


def _check_common(entry: dict[str, Any], where: str) -> None:
    """The fields a run record and a pre-training entry share."""
    _check_type(entry["experiment"], lambda v: isinstance(v, str) and v != "", f"{where}: experiment",
                "a non-empty string")
    _check_type(entry["overrides"], lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v),
                f"{where}: overrides", "a list of strings")
    metrics = entry["metrics"]
    _check_type(metrics, lambda v: isinstance(v, dict), f"{where}: metrics", "a JSON object (metrics.json)")
    for name, value in metrics.items():
        _check_type(value, lambda v: v is None or _is_number(v), f"{where}: metrics[{name!r}]", "a number or null")
    for name in ("recorded_at", "host"):
        _check_type(entry[name], lambda v: isinstance(v, str), f"{where}: {name}", "a string")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _check_record(record: Any, where: str) -> None:
    _check_fields(record, _RECORD_FIELDS, where, _OPTIONAL_RECORD_FIELDS)
    _check_common(record, where)
    _check_type(record["seed"], lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"{where}: seed", "a non-negative integer")
    _check_type(record["data"], lambda v: isinstance(v, str) and v != "", f"{where}: data", "a non-empty string")
    stats = record["train_stats"]
    _check_type(stats, lambda v: isinstance(v, dict), f"{where}: train_stats", "a JSON object (train_stats.json)")
    if "sec_per_iter" in stats:
        _check_type(stats["sec_per_iter"], lambda v: v is None or _is_number(v), f"{where}: train_stats.sec_per_iter",
                    "a number or null")
    if "parameters" in stats:
        _check_type(stats["parameters"], lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
                    f"{where}: train_stats.parameters", "an integer or null")
    _check_type(record["pretrain_backbone_sha256"], lambda v: v is None or _is_sha256(v),
                f"{where}: pretrain_backbone_sha256", "64 lowercase hex digits or null")
    if "config" in record:
        _check_type(record["config"], lambda v: isinstance(v, dict), f"{where}: config",
                    "a JSON object (the run's resolved config)")
    if "same_run_as" in record:
        _check_type(record["same_run_as"], lambda v: isinstance(v, str) and v not in ("", record["experiment"]),
                    f"{where}: same_run_as", "another experiment's name")


def _check_pretrain(entry: Any, where: str) -> None:
    _check_fields(entry, _PRETRAIN_FIELDS, where)
    _check_common(entry, where)
    _check_type(entry["backbone_sha256"], _is_sha256, f"{where}: backbone_sha256", "64 lowercase hex digits")


def _describe(record: Any, index: int) -> str:
    if isinstance(record, dict) and isinstance(record.get("experiment"), str):
        return f"runs[{index}] ({record['experiment']} seed {record.get('seed')!r})"
    return f"runs[{index}]"


def load_records(path: str | os.PathLike) -> Records:
    """The records file `path`, checked (ValueError naming the file and what is wrong); an
    empty `Records` if there is no such file."""
    path = Path(path)
    if not path.exists():
        return Records()
    if not path.is_file():
        raise ValueError(f"records file {path} is not a file")
    content = _parse_json(path.read_text(), path)
    if not isinstance(content, dict) or content.get("format") != RECORDS_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path} is not a {RECORDS_FORMAT} file (its \"format\" is {found!r})")
    if content.get("version") != RECORDS_VERSION:
        raise ValueError(f"{path}: records version {content.get('version')!r} is not one this detkit reads "
                         f"({RECORDS_VERSION})")
    unknown = sorted(set(content) - {"format", "version", "pretrain", "runs"})
    if unknown:
        raise ValueError(f"{path} has unknown top-level fields {', '.join(unknown)}")
    runs, pretrain = content.get("runs"), content.get("pretrain", {})
    if not isinstance(runs, list):
        raise ValueError(f"{path}: \"runs\" must be a list of records; got {type(runs).__name__}")
    for index, record in enumerate(runs):
        _check_record(record, f"{path}: {_describe(record, index)}")
    if not isinstance(pretrain, dict):
        raise ValueError(f"{path}: \"pretrain\" must be a JSON object (data config -> entry); "
                         f"got {type(pretrain).__name__}")
    for data, entry in pretrain.items():
        _check_pretrain(entry, f"{path}: pretrain[{data!r}]")
    return Records(runs, pretrain)


def save_records(path: str | os.PathLike, records: Records) -> None:
    """Write `records` to `path` atomically (folders created)."""
    write_json(path, {"format": RECORDS_FORMAT, "version": RECORDS_VERSION,
                      "pretrain": records.pretrain, "runs": records.runs})


# ---------------------------------------------------------------------------- configs

class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()     # config_differences' value of a key that one of the two configs lacks


def _join_key(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def _same(a: Any, b: Any) -> bool:
    # True == 1 and 1 == 1.0 in Python; a boolean turned number (or back) is a change.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def config_differences(recorded: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The keys where two (portable) configs differ, as (dotted key, recorded value, current
    value), in the recorded config's key order then the current one's new keys; a key on one
    side only has the value ABSENT on the other. Dicts are compared key by key, lists of the
    same length item by item (key[i]), anything else as a whole (a boolean never equals a
    number); a recorded `_target_` of a builder since renamed counts under its name now
    (`detkit.config.registry.RENAMED_TARGETS`)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        differences = []
        for key in [*recorded, *(k for k in current if k not in recorded)]:
            differences += config_differences(recorded.get(key, ABSENT), current.get(key, ABSENT),
                                              _join_key(prefix, key))
        return differences
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        differences = []
        for i, (a, b) in enumerate(zip(recorded, current)):
            differences += config_differences(a, b, _join_key(prefix, i))
        return differences
    if prefix.endswith("_target_") and isinstance(recorded, str):
        recorded = RENAMED_TARGETS.get(recorded, recorded)   # a builder recorded under its name of before
    if recorded is ABSENT or current is ABSENT or not _same(recorded, current):
        return [(prefix or "<root>", recorded, current)]
    return []


def _shown(value: Any) -> str:
    return "(absent)" if value is ABSENT else json.dumps(value)


def check_configs(path: str | os.PathLike, records: Records, specs: Sequence, from_backbone: bool,
                  current_config: Callable[[Any], dict[str, Any]], shown_keys: int = 5) -> None:
    """Refuse (ValueError, before a sweep starts anything) the records of file `path` that
    match a run of `specs` (RunSpecs; the same experiment, seed, data and portable overrides,
    `from_backbone`: the sweep starts its runs from a pre-training backbone) but were made with
    another config than the run would use now, `current_config(spec)` (its `portable_config`):
    the config files changed between the two machines (an edited schedule), which the
    overrides do not show. The message names the file, the first such run and up to
    `shown_keys` of its differing keys with both values. A record without "config" was made
    before configs were recorded and cannot be checked, so it is refused too."""
    path = Path(path)
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for record in records.runs:
        by_key.setdefault(record_key(record), []).append(record)
    unchecked, changed = [], []
    for spec in specs:
        key = (spec.experiment, int(spec.seed), _override_value(spec.overrides, "data"),
               tuple(_portable_overrides(spec.overrides, from_backbone)))
        for record in by_key.get(key, ()):
            if "config" not in record:
                unchecked.append(record)
                continue
            differences = config_differences(upgrade_config(record["config"]), current_config(spec))
            if differences:
                changed.append((record, differences))
    remedy = f"use another record= file, or delete those records from {path}"
    if unchecked:
        first = unchecked[0]
        more = f" (and {len(unchecked) - 1} more of this sweep's records)" if len(unchecked) > 1 else ""
        raise ValueError(
            f"records file {path}: its record of {first['experiment']} seed {first['seed']} (data={first['data']})"
            f"{more} predates config checking (it has no \"config\", the run's resolved config), so whether the "
            f"config files changed since it was recorded cannot be checked; {remedy}")
    if changed:
        (record, differences), others = changed[0], len(changed) - 1
        shown = "; ".join(f"{k}: recorded {_shown(a)}, now {_shown(b)}" for k, a, b in differences[:shown_keys])
        if len(differences) > shown_keys:
            shown += f"; {len(differences) - shown_keys} more keys"
        more = f" (and {others} more of this sweep's records)" if others else ""
        raise ValueError(
            f"records file {path} holds {record['experiment']} seed {record['seed']} (data={record['data']}){more} "
            f"trained with another config than the run would use now ({shown}): the config files changed since "
            f"it was recorded; {remedy}")


# ---------------------------------------------------------------------------- one sweep's records

def _short(sha: str | None) -> str:
    return "none (no pre-training)" if sha is None else sha[:12]


def _ap(entry: Mapping[str, Any] | None) -> str:
    value = (entry or {}).get("metrics", {}).get("bbox/AP")
    return "not recorded" if value is None else f"{value:.2f}"


class SweepRecords:
    """The records file of one tools/ablate.py sweep (`data` config, pre-training backbone
    sha256 `backbone_sha256`): which runs it already holds, and each finished run written
    into it as soon as it is known (`add`, the whole file rewritten atomically).

    `open` refuses a file whose runs of the same data were made from another pre-training
    backbone, or with other overrides for one of this sweep's (experiment, seed): either
    would mix two settings in one table.

    Several sweeps may record into one file at once (two sweeps of other rows side by side):
    each write takes the file's lock (`lock_path`), reads the file again and adds its record
    to what is there, so none drops another's."""

    def __init__(self, path: Path, records: Records, backbone_sha256: str | None) -> None:
        self.path, self.records, self.backbone_sha256 = path, records, backbone_sha256

    @classmethod
    def open(cls, path: str | os.PathLike, records: Records, specs: Sequence, data: str,
             backbone_sha256: str | None, pretrain: dict[str, Any] | None = None,
             backbone_path: str | os.PathLike | None = None) -> SweepRecords:
        """The records `records` of file `path` for the sweep of `specs` (RunSpecs) on `data`,
        checked against it (ValueError, before anything starts); the sweep's pre-training
        entry `pretrain` (`pretrain_entry`, its backbone at `backbone_path`) stored for `data`."""
        path = Path(path)
        others = sorted({r["pretrain_backbone_sha256"] or "" for r in records.runs
                         if r["data"] == data and r["pretrain_backbone_sha256"] != backbone_sha256})
        if others:
            count = sum(r["data"] == data for r in records.runs)
            recorded = records.pretrain.get(data)
            theirs = ", ".join(_short(sha or None) for sha in others)
            where = (f" on {recorded['host']}" if recorded and recorded["backbone_sha256"] in others else "")
            ours = (f"this machine's pre-training backbone {backbone_path} has sha256 {_short(backbone_sha256)} "
                    f"(pre-training bbox/AP {_ap(pretrain)})" if backbone_sha256 is not None
                    else "this sweep has no pre-training backbone (pretrain=null)")
            raise ValueError(
                f"records file {path} holds {count} runs of data={data} made from the pre-training backbone "
                f"with sha256 {theirs} (pre-training bbox/AP {_ap(recorded)}{where}); {ours}: the pre-training "
                f"did not reproduce, and one table must not mix runs from two starting backbones. Record this "
                f"machine's runs in another file (record=...), and report each file on its own")
        by_run = {(s.experiment, s.seed): portable_overrides(s.overrides, backbone_sha256) for s in specs}
        for record in records.runs:
            mine = by_run.get((record["experiment"], record["seed"]))
            if record["data"] == data and mine is not None and record["overrides"] != mine:
                raise ValueError(
                    f"records file {path} holds {record['experiment']} seed {record['seed']} (data={data}) made "
                    f"with other overrides ({' '.join(record['overrides'])}) than this sweep's ({' '.join(mine)}); "
                    f"use another record= file")
        sweep = cls(path, records, backbone_sha256)
        if pretrain is not None and records.pretrain.get(data, {}).get("backbone_sha256") != backbone_sha256:
            with sweep._locked_file():
                records.pretrain[data] = pretrain
                save_records(path, records)
        return sweep

    @contextlib.contextmanager
    def _locked_file(self):
        """While the block runs, hold the records file's lock (`lock_path`) and have
        `self.records` hold the file's content as it is now: another sweep recording into the
        same file may have added runs since this one read it, and rewriting the file from an
        older copy would drop them. `self.records` is updated in place (callers keep it)."""
        with file_lock(lock_path(self.path)):
            on_disk = load_records(self.path)
            self.records.runs, self.records.pretrain = on_disk.runs, on_disk.pretrain
            yield

    def find(self, spec) -> dict[str, Any] | None:
        """The record of run `spec` made with its overrides and this sweep's backbone, or None."""
        record = {"experiment": spec.experiment, "seed": int(spec.seed),
                  "data": _override_value(spec.overrides, "data"),
                  "overrides": portable_overrides(spec.overrides, self.backbone_sha256)}
        key = record_key(record)
        return next((r for r in self.records.runs if record_key(r) == key
                     and r["pretrain_backbone_sha256"] == self.backbone_sha256), None)

    def add(self, spec) -> None:
        """Record finished run `spec` and rewrite the file, unless the file already holds the
        same results for it (then it is left as it is: no new time stamp, no change in git)."""
        record = record_of(spec, self.backbone_sha256)
        self._put(record, self.find(spec))

    def _put(self, record: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Store `record` in place of `old` (its earlier record, or None) and rewrite the file,
        unless `old` holds the same (then nothing changes: no new time stamp, no change in git)."""
        def content(r):
            return {k: v for k, v in r.items() if k not in ("recorded_at", "host")}

        if old is not None and content(old) == content(record):
            return
        with self._locked_file():
            self.records.runs = upsert(self.records.runs, record)
            save_records(self.path, self.records)

    def add_same_run(self, spec, source) -> None:
        """Record run `spec` as the recorded run `source` (another experiment, same seed, whose
        training config is identical: the sweep trained it once), marked "same_run_as", unless
        the file already holds that."""
        found = self.find(source)
        if found is None:
            raise ValueError(f"{source.experiment} seed {source.seed} is not recorded in {self.path}")
        record = {**found, "experiment": spec.experiment,
                  "overrides": portable_overrides(spec.overrides, self.backbone_sha256),
                  "same_run_as": source.experiment}
        _check_record(record, f"the record of {spec.experiment} seed {spec.seed}")
        self._put(record, self.find(spec))
