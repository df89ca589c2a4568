"""Run a whole ablation table (every row x every seed) and write its report.

    python tools/ablate.py table=dcnv1_table1                     # synthetic data, seeds 0 1 2
    python tools/ablate.py table=all jobs=2                       # every table, 2 runs at a time
    python tools/ablate.py table=dcnv2_table1 data=coco seeds=[0] out=/runs/dcnv2 -- \
        data.root=/data/coco model.backbone.weights=/w/resnet50.pth   # the paper's schedule
    python tools/ablate.py table=fpn_mmdet -- schedule.max_iters=1     # overrides for every run

(or `detkit-ablate ...`, `python -m detkit.study.cli.ablate ...`). Options are in
configs/ablate.yaml, as key=value arguments like every tool's; everything after `--` is
passed verbatim to every training run (tools/train.py's overrides): the one exception to
the tools' single command-line style, since those overrides belong to another app's config.
Runs go to OUT/<experiment>/seed<N>/ (tools/train.py run folders, each started as
`python -m detkit.cli.train`); finished runs are skipped and interrupted ones resumed when
the command is run again. Reports: OUT/<table>.md, OUT/<table>.png and OUT/<table>.svg (tools/report.py
renders them again from the run folders at any time).

With record=PATH the sweep also keeps a records file (detkit.study.records: each finished
run's results as JSON, small enough to commit), written as soon as a run finishes, and skips
the runs recorded there: a sweep too long for one machine goes on on a fresh one from that
file, and its reports include the recorded runs (tools/report.py runs=[PATH] too). The file
also holds the pre-training's backbone sha256 and AP; a file whose runs started from another
pre-training backbone than this machine's is refused before any run starts, and so is a file
whose record of one of the sweep's runs holds another resolved config than the run would use
now (the config files changed since it was recorded).

Two sweeps may run side by side (more runs at a time on a machine with spare cores, or two
machines sharing the output folder): a run the other sweep is training is left to it ("busy",
its folder's sweep.lock held), and both write into one records file without dropping each
other's records (each write takes the file's lock and reads it again first).

Rows whose composed training configs are identical (on data=synthetic_geometry dcnv2/regular
is dcnv1/baseline) get one run per seed, the first of them already finished or recorded, else
the first row's; it is reported, and recorded (marked "same_run_as"), under every such row.

With data=synthetic the runs start from a backbone pre-trained once on a disjoint split of the
same generator (pretrain=auto: experiment=pretrain/backbone_synthetic, into OUT/pretrain/), as
the papers start from ImageNet weights; with data=coco pass ImageNet weights after --. The
data=synthetic_geometry rows train from scratch (their model configs; pretrain=auto gives them
none): a backbone pre-trained without deformable layers took the deformable rows' gain away in
this proxy (docs/ablations.md).

Exit status: 0 every run finished (or was left to another sweep training it: a note names
it); 1 some run failed (the others still ran; the report
marks the missing rows); 2 a mistake in the arguments (one line on stderr, nothing started).
"""
from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from detkit.cli import one_line_errors
from detkit.config.compose import check_config
from detkit.study.records import (SweepRecords, check_configs, config_differences, file_sha256, load_records,
                                  portable_config, pretrain_entry)
from detkit.study.report import collect_runs, runs_from_records, write_report
from detkit.study.schemas import register_study_configs
from detkit.study.sweep import (check_run_folders, plan_pretrain, plan_runs, pretrained_backbone, run_overrides,
                                run_sweep, weights_override)
from detkit.study.tables import load_table, paper_table_names


def _int_list(value, key: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{key} must be a non-empty list of non-negative integers, e.g. {key}=[0,1,2]; got {value!r}")
    return list(value)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(ablate's own overrides, the training runs' overrides after `--`)."""
    train: list[str] = []
    if "--" in argv:
        argv, train = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    bad = [arg for arg in train if "=" not in arg or arg.startswith("-")]
    if bad:
        raise ValueError(f"after -- come key=value overrides for tools/train.py; got {' '.join(bad)}")
    return argv, train


# pretrain=auto: the configs/experiment/pretrain/ run a data config's sweep starts from (a
# disjoint split of the same generator, the stand-in for ImageNet); none for the others
# (synthetic_geometry's rows train from scratch, coco's take ImageNet weights).
AUTO_PRETRAIN = {"synthetic": "backbone_synthetic"}


def _rows(value, tables) -> list[str] | None:
    """rows=: None (every row) or experiments of `tables`, in the order given."""
    if value is None:
        return None
    rows = [value] if isinstance(value, str) else value
    experiments = [e for table in tables for e in table.experiments]
    if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, str) for r in rows):
        raise ValueError(f"rows must be null or a non-empty list of experiments, e.g. rows=[{experiments[0]}]; "
                         f"got {value!r}")
    unknown = [r for r in rows if r not in experiments]
    if unknown:
        raise ValueError(f"rows: {unknown[0]} is not a row of table={','.join(t.name for t in tables)} "
                         f"(its rows: {', '.join(dict.fromkeys(experiments))})")
    return list(dict.fromkeys(rows))


def read_options(argv: list[str]) -> dict:
    """configs/ablate.yaml with `argv`, checked: {table(s), rows, seeds, jobs, threads_per_job, data, out,
    pretrain, record}."""
    # `data` is a plain key of configs/ablate.yaml, but configs/ also holds the training tool's
    # `data` group, so Hydra would read data=NAME as a group override ("No match in the
    # defaults list"): it is set after composition instead (`out` interpolates it lazily).
    data = [arg.split("=", 1)[1] for arg in argv if arg.startswith("data=")]
    register_study_configs()   # schema/ablate, which configs/ablate.yaml's defaults list names
    cfg = check_config("ablate", [arg for arg in argv if not arg.startswith("data=")])
    if data:
        cfg.data = data[-1]
    options = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    names = options["table"]
    names = paper_table_names() if names == "all" else ([names] if isinstance(names, str) else list(names))
    options["tables"] = [load_table(str(n)) for n in names]
    scratch = [t.name for t in options["tables"] if t.from_scratch]
    if scratch and len(scratch) < len(options["tables"]):
        raise ValueError(f"table {scratch[0]} trains from scratch and the others fine-tune from a pre-training: "
                         f"run it in a sweep of its own (table={scratch[0]})")
    options["rows"] = _rows(options["rows"], options["tables"])
    options["seeds"] = _int_list(options["seeds"], "seeds")
    jobs = options["jobs"]
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs!r}")
    threads = options["threads_per_job"]
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads_per_job must be a positive integer or null; got {threads!r}")
    options["data"], options["out"] = str(options["data"]), Path(str(options["out"]))
    if scratch:
        if options["pretrain"] not in ("auto", None):
            raise ValueError(f"table {scratch[0]} trains from scratch; pretrain={options['pretrain']} does not "
                             f"apply (leave pretrain=auto or set pretrain=null)")
        options["pretrain"] = None
    elif options["pretrain"] == "auto":
        options["pretrain"] = AUTO_PRETRAIN.get(options["data"])
    if options["record"] is not None:
        options["record"] = Path(str(options["record"]))
        if options["record"].suffix != ".json":
            raise ValueError(f"record must be a .json file (a records file); got {options['record']}")
    return options


def plan(options: dict, train: list[str]):
    """(the runs of every row, the pre-training run or None), checked before anything starts: the run
    folders, and every experiment's training config composed once (the seeds only change seed=)."""
    pretrain, out = options["pretrain"], options["out"]
    pretrain_spec = plan_pretrain(str(pretrain), out, train) if pretrain else None
    if pretrain_spec is not None:
        if any(arg.startswith("model.backbone.weights=") for arg in train):
            raise ValueError("pass either pretrain=NAME or -- model.backbone.weights=PATH, not both "
                             "(pretrain=null to use your weights)")
        try:
            check_config("train", list(pretrain_spec.overrides))
        except ValueError as exc:
            raise ValueError(f"pretrain={pretrain}: {exc}") from None
        train = [*train, weights_override(pretrained_backbone(pretrain_spec))]
    specs = plan_runs(options["tables"], options["data"], options["seeds"], out, train)
    check_run_folders(specs + ([pretrain_spec] if pretrain_spec else []))
    return specs, pretrain_spec


def train_configs(specs, seeds: list[int]) -> dict:
    """Every experiment's training config composed and checked, once, for its run of the first
    seed with the overrides that run starts with (`run_overrides`): {experiment: config,
    `hydra` node included}, in the order of `specs`."""
    configs = {}
    for spec in specs[:len(specs) // len(seeds)]:
        try:
            configs[spec.experiment] = check_config("train", run_overrides(spec))
        except ValueError as exc:
            raise ValueError(f"experiment {spec.experiment}: {exc}") from None
    return configs


def _body(composed):
    return OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])


def portable_train_config(composed) -> dict:
    """The portable form (`detkit.study.records.portable_config`) of the config.yaml that a
    run of the composed config `composed` (`check_config`'s, `hydra` node included) writes:
    the trainer writes OmegaConf.to_yaml(cfg, resolve=True) of the job config Hydra gives it,
    which is `composed` without its `hydra` node; read back with yaml.safe_load as the record's is."""
    return portable_config(yaml.safe_load(OmegaConf.to_yaml(_body(composed), resolve=True)))


_SEED_REFERENCE = re.compile(r"\$\{[^}]*\bseed\b")   # ${seed}, ${oc.select:seed,0}, ${..seed} ...


def _interpolates_seed(composed) -> bool:
    """Whether a value of `composed` (before resolution) is an interpolation naming a `seed`
    key, so that it may change with the run's seed (over-cautious: data.generator.seed counts)."""
    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    return any(_SEED_REFERENCE.search(s) for s in strings(OmegaConf.to_container(_body(composed), resolve=False)))


def check_record_configs(options: dict, specs, pretrain_spec, configs: dict) -> None:
    """With record=: read the records file (a bad one fails now, not after the pre-training)
    and refuse its records of this sweep's runs that hold another config than the run would
    use now (`detkit.study.records.check_configs`). A run's config is its experiment's of
    `configs` (`train_configs`, composed for the first seed) with its own top-level `seed`:
    the seed is nowhere else in the composed configs (an interpolation naming it would be;
    then the run's config is composed on its own)."""
    path = options["record"]
    if path is None:
        return
    records = load_records(path)
    if not records.runs:
        return
    by_experiment: dict[str, tuple[dict, bool]] = {}   # (portable config, whether it interpolates a seed)

    def current_config(spec) -> dict:
        if spec.experiment not in by_experiment:
            composed = configs[spec.experiment]
            by_experiment[spec.experiment] = portable_train_config(composed), _interpolates_seed(composed)
        config, seeded = by_experiment[spec.experiment]
        if config["seed"] == spec.seed:
            return config
        if seeded:
            return portable_train_config(check_config("train", run_overrides(spec)))
        return {**config, "seed": spec.seed}

    check_configs(path, records, specs, pretrain_spec is not None, current_config)


def pretrain_backbone(pretrain_spec, threads: int | None) -> None:
    """Train the pre-training run unless its backbone file exists, then write that file."""
    backbone = pretrained_backbone(pretrain_spec)
    if not backbone.is_file():
        result = run_sweep([pretrain_spec], jobs=1, threads_per_job=threads)
        if not pretrain_spec.finished:
            raise RuntimeError(f"pre-training {pretrain_spec.experiment} {result[pretrain_spec]}: see "
                               f"{pretrain_spec.run_dir / 'stdout.log'}")
        from detkit.engine.checkpoint import export_backbone  # torch: only when a backbone is exported

        export_backbone(pretrain_spec.run_dir / "checkpoints" / "last.pth", backbone)
    print(f"backbone of every run: {backbone}")


def open_records(options: dict, specs, pretrain_spec):
    """The sweep's records file (record=), checked against this sweep and this machine's
    pre-training backbone, with the pre-training entry stored; None without record=."""
    path = options["record"]
    if path is None:
        return None
    backbone = pretrained_backbone(pretrain_spec) if pretrain_spec is not None else None
    sha = file_sha256(backbone) if backbone is not None else None
    entry = pretrain_entry(pretrain_spec, sha) if pretrain_spec is not None else None
    return SweepRecords.open(path, load_records(path), specs, options["data"], sha, entry, backbone)


def write_reports(tables, specs, out: Path, records=None, recorded=(), same: dict | None = None) -> None:
    """Every table's report from the finished run folders of `specs` and the records (in the
    sweep's `records`) of the runs `recorded`, skipped as recorded there; each run spec of
    `same` ({spec: the spec whose run it is}, `same_run_sources`) reported as that run."""
    finished = [s.run_dir for s in specs if s.finished]
    runs = collect_runs(finished) if finished else []
    if recorded:
        runs += runs_from_records(records.path, [records.find(s) for s in recorded])
    for spec, source in (same or {}).items():
        if not any(r.experiment == spec.experiment and r.seed == spec.seed for r in runs):
            runs += [replace(r, experiment=spec.experiment, same_run_as=source.experiment) for r in runs
                     if r.experiment == source.experiment and r.seed == source.seed]
    for table in tables:
        markdown = write_report(table, runs, out / f"{table.name}.md", out / f"{table.name}.png")
        print(markdown)
        print(f"wrote {out / (table.name + '.md')}, {out / (table.name + '.png')} and {out / (table.name + '.svg')}")


def same_runs(configs: dict) -> list[list[str]]:
    """The groups (two or more) of experiments of `configs` (`train_configs`) whose training
    configs are identical, each in the order of `configs`: such rows are the same model
    trained the same way (on data=synthetic_geometry `dcnv2/regular` is `dcnv1/baseline`), so
    the sweep trains one run per seed for the whole group."""
    groups: list[tuple[dict, list[str]]] = []
    for experiment, composed in configs.items():
        config = portable_train_config(composed)
        group = next((g for c, g in groups if not config_differences(c, config)), None)
        if group is None:
            groups.append((config, [experiment]))
        else:
            group.append(experiment)
    return [group for _, group in groups if len(group) > 1]


def same_run_sources(specs, groups: list[list[str]], records=None, selected=None) -> dict:
    """{run spec not to train: the spec of the same group (`same_runs`) and seed whose run it
    is}. Per group and seed the run is the first member's that already finished (its folder)
    or is recorded in `records`, else the first member's among `selected` (the specs the
    sweep may train, rows=; None: all): a run made before the rows were known to be identical,
    or by a sweep of other rows, is used, not trained again; a member with a run of its own
    keeps it. A group with no member finished, recorded or selected is left out."""
    by_run = {(s.experiment, s.seed): s for s in specs}
    sources = {}
    for group in groups:
        for seed in dict.fromkeys(s.seed for s in specs):
            members = [by_run[(e, seed)] for e in group if (e, seed) in by_run]
            done = [s for s in members if s.finished or (records is not None and records.find(s) is not None)]
            trainable = [s for s in members if selected is None or s in selected]
            if not done and not trainable:
                continue
            chosen = (done or trainable)[0]
            sources.update({s: chosen for s in members if s not in done and s is not chosen})
    return sources


def ablate(argv: list[str]) -> int:
    """The whole command on `argv` (the arguments after the program name); its exit status."""
    argv, train = split_argv(argv)
    options = read_options(argv)
    # Every row of the tables, though rows= trains only some: identical rows are found among
    # all, so that a run another row already made is used, and the reports show every run there is.
    every, pretrain_spec = plan(options, train)
    specs = [s for s in every if options["rows"] is None or s.experiment in options["rows"]]
    configs = train_configs(every, options["seeds"])
    check_record_configs(options, every, pretrain_spec, configs)
    groups = same_runs(configs)
    for group in groups:
        print(f"same run: {', '.join(group)} have identical training configs: one run per seed for all of them")

    from detkit.config.build import build_data_source  # torch: only once the sweep starts

    build_data_source(next(iter(configs.values())).data).prepare()   # once, before parallel runs would race to generate it
    jobs, threads = options["jobs"], options["threads_per_job"]
    if pretrain_spec is not None:
        pretrain_backbone(pretrain_spec, threads and threads * jobs)
    records = open_records(options, every, pretrain_spec)
    same = same_run_sources(every, groups, records, selected=set(specs))

    def record_same_runs(source=None) -> None:
        """Record the rows sharing run `source` (None: every recorded source) as that run, as
        soon as it is recorded: a sweep cut short still leaves them in the records file."""
        for spec, its_source in same.items():
            if (source is None or its_source == source) and records.find(its_source) is not None:
                records.add_same_run(spec, its_source)

    if records is not None:
        record_same_runs()
    status = run_sweep([s for s in specs if s not in same], jobs=jobs, threads_per_job=threads, records=records,
                       on_record=record_same_runs if records is not None else None)
    recorded = [s for s in every if not s.finished and records is not None and records.find(s) is not None]
    write_reports(options["tables"], every, options["out"], records, recorded, same)
    failed = [s for s, result in status.items() if result.startswith("failed")]
    for spec in failed:
        print(f"error: {spec.experiment} seed {spec.seed} {status[spec]}: see {spec.run_dir / 'stdout.log'}",
              file=sys.stderr)
    for spec in [s for s, result in status.items() if result == "busy"]:
        print(f"note: {spec.experiment} seed {spec.seed} was being trained by another sweep and is not in this "
              f"report; run the command again once that sweep has finished", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    """Entry point: sys.argv; returns the exit status (errors a user can fix: one line, exit 2)."""
    return one_line_errors(ablate)(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
