"""Run a whole ablation table (every row x every seed) and write its report.

    python tools/ablate.py table=dcnv1_table1                     # synthetic data, seeds 0 1 2
    python tools/ablate.py table=all jobs=2                       # every table, 2 runs at a time
    python tools/ablate.py table=dcnv2_table1 data=coco seeds=[0] out=/runs/dcnv2 -- \
        data.root=/data/coco model.backbone.weights=/w/resnet50.pth   # the paper's schedule
    python tools/ablate.py table=fpn_mmdet -- schedule.max_iters=1     # overrides for every run

Options are in configs/ablate.yaml; everything after `--` is passed to every
tools/train.py run. Runs go to OUT/<experiment>/seed<N>/ (tools/train.py run
folders); finished runs are skipped and interrupted ones resumed when the command is run
again. Reports: OUT/<table>.md and OUT/<table>.png (tools/report.py renders them again from
the run folders at any time).

With data=synthetic the runs start from a backbone pre-trained once on a disjoint synthetic
split (pretrain=auto: experiment=pretrain/backbone_synthetic into OUT/pretrain/), as the
papers start from ImageNet weights; with data=coco pass ImageNet weights after --.

Exit status: 0 every run finished; 1 some run failed (the others still ran; the report
marks the missing rows); 2 a mistake in the arguments (one line on stderr, nothing started).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detkit.cli import check_config, one_line_errors  # noqa: E402


def _int_list(value, key: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{key} must be a non-empty list of non-negative integers, e.g. {key}=[0,1,2]; got {value!r}")
    return list(value)


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from detkit.ablation.tables import load_table, table_names

    train: list[str] = []
    if "--" in argv:
        argv, train = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    bad = [arg for arg in train if "=" not in arg or arg.startswith("-")]
    if bad:
        raise ValueError(f"after -- come key=value overrides for tools/train.py; got {' '.join(bad)}")
    cfg = check_config("ablate", argv)
    options = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    names = options["table"]
    names = table_names() if names == "all" else ([names] if isinstance(names, str) else list(names))
    tables = [load_table(str(n)) for n in names]
    seeds = _int_list(options["seeds"], "seeds")
    jobs = options["jobs"]
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs!r}")
    threads = options["threads_per_job"]
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads_per_job must be a positive integer or null; got {threads!r}")
    data, out = str(options["data"]), Path(str(options["out"]))

    from detkit.ablation.sweep import (check_run_folders, plan_pretrain, plan_runs, pretrained_backbone,
                                       run_sweep, weights_override)

    pretrain = options["pretrain"]
    if pretrain == "auto":
        pretrain = "backbone_synthetic" if data == "synthetic" else None
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
    specs = plan_runs(tables, data, seeds, out, train)
    check_run_folders(specs + ([pretrain_spec] if pretrain_spec else []))
    first_config = None
    for spec in specs[:len(specs) // len(seeds)]:   # every experiment once: the seeds only change seed=
        try:
            composed = check_config("train", list(spec.overrides))
        except ValueError as exc:
            raise ValueError(f"experiment {spec.experiment}: {exc}") from None
        first_config = first_config or composed

    from detkit.engine.datasets import prepare_data

    prepare_data(first_config.data)      # once, before parallel runs would race to generate it
    if pretrain_spec is not None:
        backbone = pretrained_backbone(pretrain_spec)
        if not backbone.is_file():
            result = run_sweep([pretrain_spec], jobs=1, threads_per_job=threads and threads * jobs)
            if not pretrain_spec.finished:
                raise RuntimeError(f"pre-training {pretrain_spec.experiment} {result[pretrain_spec]}: see "
                                   f"{pretrain_spec.run_dir / 'stdout.log'}")
            from detkit.engine.checkpoint import export_backbone

            export_backbone(pretrain_spec.run_dir / "checkpoints" / "last.pth", backbone)
        print(f"backbone of every run: {backbone}")
    status = run_sweep(specs, jobs=jobs, threads_per_job=threads)

    from detkit.ablation.report import collect_runs, write_report

    finished = [s.run_dir for s in specs if s.finished]
    runs = collect_runs(finished) if finished else []
    for table in tables:
        markdown = write_report(table, runs, out / f"{table.name}.md", out / f"{table.name}.png")
        print(markdown)
        print(f"wrote {out / (table.name + '.md')} and {out / (table.name + '.png')}")
    failed = [s for s, result in status.items() if result.startswith("failed")]
    for spec in failed:
        print(f"error: {spec.experiment} seed {spec.seed} {status[spec]}: see {spec.run_dir / 'stdout.log'}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)(sys.argv[1:]))
