"""Run every row of ablation tables for several seeds through the training tool.

Each (experiment, seed) is one training run in its own folder, `<out>/<experiment>/seed<N>/`,
so a row shared by two tables (DCNv1 Table 1's "res5a,b,c" is Table 3's "deformable conv")
is trained once. A run is a training-tool subprocess (tools/train.py's job, run from the
installed package, so no checkout is needed) in the caller's working folder:

    python -m detkit.cli.train experiment=<experiment> data=<data> seed=<N> \
        hydra.run.dir=<run folder> resume=true <train...>

with the run folder absolute (`out` resolved against the caller's working folder); the exact
override list is kept in `<run folder>/ablate.json`. Running the sweep again skips finished
runs (metrics.json present) made with the same overrides, resumes interrupted ones from their
last checkpoint, and refuses, before starting anything, a folder made with other overrides
(it would mix two settings in one report). With a records file (`detkit.study.records`,
tools/ablate.py record=PATH) the runs it holds are skipped too, and every finished run is
written into it, so that a sweep goes on from where another machine left it.
Runs go in seed-major order (every experiment with seed 0 first), so that a sweep cut
short still has whole seeds.

Pre-training (`plan_pretrain`): the papers fine-tune ImageNet models. With `pretrain=NAME`
the sweep first trains `experiment=pretrain/NAME` once into `<out>/pretrain/NAME/`, writes
its backbone (`detkit.engine.checkpoint.export_backbone`) to `backbone.pth` there and gives
it to every run as `model.backbone.weights`.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from detkit.study.records import SweepRecords
from detkit.study.tables import AblationTable
from detkit.config.compose import quote_override
from detkit.engine import preemption
from detkit.engine.preemption import EXIT_STOPPED, Interrupted
from detkit.io import file_lock

__all__ = ["RunSpec", "plan_runs", "check_run_folders", "run_overrides", "train_command", "run_sweep", "RUN_RECORD", "RUN_LOCK"]

TRAIN_MODULE = "detkit.cli.train"    # what every run executes (python -m)
RUN_RECORD = "ablate.json"       # the overrides a run folder was made with
RUN_LOCK = "sweep.lock"          # held by the sweep training the run (detkit.io.file_lock)


@dataclass(frozen=True)
class RunSpec:
    experiment: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...] = field(default=())   # every tools/train.py override of the run

    @property
    def finished(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()


def plan_runs(tables: list[AblationTable], data: str, seeds: list[int], out: str | Path,
              train_overrides: list[str] = ()) -> list[RunSpec]:
    """The runs of `tables` x `seeds`, each experiment once, seed-major."""
    experiments: list[str] = []
    for table in tables:
        experiments += [e for e in table.experiments if e not in experiments]
    out = Path(out).resolve()
    specs = []
    for seed in seeds:
        for experiment in experiments:
            run_dir = out / experiment / f"seed{seed}"
            overrides = (f"experiment={experiment}", f"data={data}", f"seed={seed}",
                         f"hydra.run.dir={quote_override(str(run_dir))}", *train_overrides)
            specs.append(RunSpec(experiment, int(seed), run_dir, tuple(overrides)))
    return specs


def plan_pretrain(name: str, out: str | Path, train_overrides: list[str] = ()) -> RunSpec:
    """The pre-training run `experiment=pretrain/<name>` in `<out>/pretrain/<name>/`."""
    run_dir = Path(out).resolve() / "pretrain" / name
    return RunSpec(f"pretrain/{name}", 0, run_dir,
                   (f"experiment=pretrain/{name}", f"hydra.run.dir={quote_override(str(run_dir))}", *train_overrides))


def pretrained_backbone(spec: RunSpec) -> Path:
    """Where the sweep writes the backbone of pre-training run `spec`."""
    return spec.run_dir / "backbone.pth"


def weights_override(path: str | Path) -> str:
    return f"model.backbone.weights={quote_override(str(path))}"


def check_run_folders(specs: list[RunSpec]) -> None:
    """ValueError if a run folder exists but was not made by the sweep with these overrides."""
    for spec in specs:
        if not spec.run_dir.exists():
            continue
        record = spec.run_dir / RUN_RECORD
        if not record.is_file():
            raise ValueError(f"{spec.run_dir} exists but was not made by tools/ablate.py (no {RUN_RECORD}); "
                             f"move it away or choose another out=")
        previous = json.loads(record.read_text()).get("overrides")
        if previous != list(spec.overrides):
            raise ValueError(f"{spec.run_dir} was made with other overrides ({' '.join(previous or [])}) than "
                             f"this sweep's ({' '.join(spec.overrides)}); choose another out= or delete the folder")


def run_overrides(spec: RunSpec) -> list[str]:
    """Every override the training run of `spec` is started with: its own, then resume=true
    (its config.yaml is the config composed from these)."""
    return [*spec.overrides, "resume=true"]


def train_command(spec: RunSpec) -> list[str]:
    """The command line of run `spec`: this interpreter, the training tool's module, its overrides."""
    return [sys.executable, "-m", TRAIN_MODULE, *run_overrides(spec)]


def run_sweep(specs: list[RunSpec], jobs: int = 1, threads_per_job: int | None = None,
              log=print, records: SweepRecords | None = None,
              on_record: Callable[[RunSpec], None] | None = None) -> dict[RunSpec, str]:
    """Train every unfinished run, `jobs` at a time, each with `threads_per_job` threads
    (default: cores // jobs). Returns {spec: "done" | "skipped" | "recorded" | "busy" |
    "stopped" | "failed (exit N)"}; a failed run does not stop the others. A run whose folder's lock
    (RUN_LOCK) another sweep holds is being trained by it and is left to it ("busy"), so two
    sweeps of the same rows started side by side share the runs out between them. Output of
    each run goes to <run folder>/stdout.log.
    With `records` (a records file, `detkit.study.records`), a run without a finished folder
    whose record is there is not trained ("recorded"), and every finished run (found so at the
    start, or finished by this sweep) is recorded there at once, then passed to `on_record`
    (tools/ablate.py records the rows that share the run there).
    A stop signal (SIGTERM, SIGINT, SIGUSR1; `detkit.engine.preemption`) starts no more runs,
    passes the signal on to the running ones, which stop after their current step with a
    checkpoint ("stopped"), and raises `Interrupted` once they have: the same sweep started
    again resumes them, as after a kill."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    status: dict[RunSpec, str] = {}
    todo = []
    for spec in specs:
        if spec.finished:
            status[spec] = "skipped"
            log(f"skip {spec.experiment} seed {spec.seed}: finished ({spec.run_dir / 'metrics.json'})")
            if records is not None:
                records.add(spec)
                if on_record is not None:
                    on_record(spec)
        elif records is not None and records.find(spec) is not None:
            status[spec] = "recorded"
            log(f"skip {spec.experiment} seed {spec.seed}: recorded ({records.path})")
        else:
            todo.append(spec)
    lock = threading.Lock()
    counter = iter(range(1, len(todo) + 1))

    def one(spec: RunSpec) -> None:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(spec.run_dir / RUN_LOCK, blocking=False) as mine:
            if mine:
                train(spec)
            else:
                with lock:
                    status[spec] = "busy"
                    log(f"[{next(counter)}/{len(todo)}] {spec.experiment} seed {spec.seed}: busy (another sweep "
                        f"is training it: {spec.run_dir / RUN_LOCK} is held), left to it")

    def train(spec: RunSpec) -> None:
        if spec.finished:     # another sweep finished it after this one started
            seconds, code = 0.0, 0
        else:
            (spec.run_dir / RUN_RECORD).write_text(json.dumps({"overrides": list(spec.overrides)}, indent=1))
            start = time.perf_counter()
            with open(spec.run_dir / "stdout.log", "ab") as output:
                with lock:
                    if stopping.is_set():    # a stop signal came before this run started
                        status[spec] = "not started"
                        return
                    process = subprocess.Popen(train_command(spec), stdout=output, stderr=subprocess.STDOUT,
                                               env=env)
                    running.add(process)
                try:
                    code = process.wait()
                finally:
                    with lock:
                        running.discard(process)
            seconds = time.perf_counter() - start
        if code == 0 and spec.finished:
            ap = json.loads((spec.run_dir / "metrics.json").read_text()).get("bbox/AP")
            result, detail = "done", f"box AP {ap:.2f}" if isinstance(ap, (int, float)) else "no AP"
        elif code == EXIT_STOPPED:
            result, detail = "stopped", f"its checkpoint is kept and the next sweep resumes it ({spec.run_dir})"
        else:
            result, detail = f"failed (exit {code})", f"see {spec.run_dir / 'stdout.log'}"
        with lock:
            status[spec] = result
            if records is not None and result == "done":
                records.add(spec)
                if on_record is not None:
                    on_record(spec)
            log(f"[{next(counter)}/{len(todo)}] {spec.experiment} seed {spec.seed}: {result} in "
                f"{seconds / 60:.1f} min, {detail}")

    recorded = sum(result == "recorded" for result in status.values())
    log(f"{len(todo)} runs to train ({len(specs) - len(todo) - recorded} finished"
        f"{f', {recorded} recorded' if recorded else ''}), {jobs} at a time, {threads} thread(s) each")
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()
    signals = preemption.current()
    with signals.deferred() if signals is not None else contextlib.nullcontext():
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, spec) for spec in todo]
            while not all(future.done() for future in futures):
                wait(futures, timeout=0.2)
                if signals is not None and signals.received is not None and not stopping.is_set():
                    _stop_runs(signals.received, stopping, running, lock, log)
            for future in futures:
                future.result()
    if stopping.is_set():
        stopped = [spec for spec, result in status.items() if result == "stopped"]
        raise Interrupted(signals.received, (
            f"stopped by {preemption.signal_name(signals.received)}: {len(stopped)} run(s) stopped with a checkpoint "
            f"({', '.join(f'{s.experiment} seed {s.seed}' for s in stopped) or 'none'}), "
            f"{sum(r == 'not started' for r in status.values())} not started; the same command resumes the sweep"))
    return status


def _stop_runs(signum: int, stopping: threading.Event, running: set, lock, log) -> None:
    """A stop signal reached the sweep: start no more runs, and pass the signal on to the
    running ones (each finishes its step, writes a checkpoint and exits with status 4; a run
    that got the signal itself, from the terminal's process group, ignores the second one)."""
    with lock:
        stopping.set()
        processes = list(running)
    log(f"{preemption.signal_name(signum)}: stopping {len(processes)} running run(s) after their current "
        f"step (each writes a checkpoint), starting no more")
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
