"""tools/ablate.py end to end: a one-iteration run of every table through the sweep command
(pre-training stage included) gives a report with every row; a second call reuses the
finished runs; a changed setting is refused before anything starts. The sweep runs in a
temporary working folder with a relative out= (resolved there), and starts its training runs
through the package (python -m detkit.cli.train), not through a checkout's script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from detkit.study.sweep import plan_runs, train_command
from detkit.study.tables import load_table, paper_table_names

REPO = Path(__file__).resolve().parents[2]
ABLATE = str(REPO / "tools" / "ablate.py")

pytestmark = pytest.mark.slow

TINY = ["schedule.max_iters=1", "schedule.warmup_iters=0", "schedule.steps=[]", "num_workers=0",
        "data.generator.num_train=8", "data.generator.num_val=4", "data.generator.max_objects=3",
        "tensorboard_sampling_images=0", "checkpoint_period=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("detkit_cache")
    return {**os.environ, "DETKIT_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}


def ablate(env, cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ABLATE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sweep(env, tmp_path_factory):
    work = tmp_path_factory.mktemp("ablate")
    out = work / "sweep"
    result = ablate(env, work, "table=all", "seeds=[3]", "jobs=2", "out=sweep", "--", *TINY)   # work/sweep
    return result, out, work


def test_every_table_reports_every_row(sweep):
    result, out, work = sweep
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in paper_table_names():
        table = load_table(name)
        text = (out / f"{name}.md").read_text()
        assert (out / f"{name}.png").is_file()
        rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
        assert len(rows) == len(table.rows)
        for row, line in zip(table.rows, rows):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0] == row.label and cells[1] == f"`{row.experiment}`"
            assert cells[2] == "3"                                   # the seed that ran
            assert "not run" not in line
            assert cells[-len(row.paper) - 1].endswith("M")           # parameters counted
    assert not (work / "outputs").exists()                            # everything under out=


def test_runs_start_from_the_pretrained_backbone(sweep):
    _, out, _ = sweep
    backbone = out / "pretrain" / "backbone_synthetic" / "backbone.pth"
    state = torch.load(backbone, weights_only=True)
    assert "conv1.weight" in state and "layer4.2.conv2.weight" in state
    assert not any(".offset_branch." in k or k.startswith("fc.") for k in state)
    pretrain_config = OmegaConf.load(out / "pretrain" / "backbone_synthetic" / "config.yaml")
    assert pretrain_config.data.generator.seed == 1                   # a split disjoint from the runs'
    for experiment in ("dcnv1/res5c", "fpn/mdconv_c3_c5"):
        run_dir = out / experiment / "seed3"
        config = OmegaConf.load(run_dir / "config.yaml")
        assert config.model.backbone.weights == str(backbone)
        assert config.seed == 3 and config.data.generator.seed == 0
        assert json.loads((run_dir / "ablate.json").read_text())["overrides"][0] == f"experiment={experiment}"
        # The pre-trained weights are what the run started from: the frozen stem still equals them.
        weights = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["model"]
        assert torch.equal(weights["backbone.conv1.weight"], state["conv1.weight"])


def test_second_call_reuses_finished_runs(sweep, env):
    result, out, work = sweep
    again = ablate(env, work, "table=dcnv1_table3", "seeds=[3]", f"out={out}", "--", *TINY, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "0 runs to train (4 finished)" in again.stdout
    assert again.stdout.count("skip ") == 4
    # rows= keeps only those experiments of the table (the report still lists every row).
    one_row = ablate(env, work, "table=dcnv1_table3", "rows=[dcnv1/dpool]", "seeds=[3]", f"out={out}", "--", *TINY,
                     timeout=300)
    assert one_row.returncode == 0, one_row.stderr
    assert "0 runs to train (1 finished)" in one_row.stdout
    assert one_row.stdout.count("skip ") == 1 and "skip dcnv1/dpool" in one_row.stdout


@pytest.mark.parametrize("args, message", [
    (["table=dcnv1_table3", "seeds=[3]", "--", *TINY[1:]], "was made with other overrides"),
    (["table=dcnv3"], "no ablation table 'dcnv3'"),
    (["table=dcnv1_table3", "seeds=[]"], "seeds must be a non-empty list"),
    (["table=dcnv1_table3", "jobs=0"], "jobs must be a positive integer"),
    (["table=dcnv1_table3", "rows=[dcnv2/regular]"], "rows: dcnv2/regular is not a row of table=dcnv1_table3"),
    (["table=dcnv1_table3", "--", "max_iters"], "after -- come key=value overrides"),
    (["table=dcnv1_table3", "--", "schedule.nonexistent=1"], "schedule.nonexistent"),
])
def test_bad_arguments_fail_before_anything_runs(sweep, env, args, message):
    _, out, work = sweep
    args = [a for a in args]
    args.insert(1, f"out={out}")
    before = sorted(p.name for p in out.rglob("*"))
    result = ablate(env, work, *args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == before


def test_runs_start_the_training_module(tmp_path):
    spec = plan_runs([load_table("dcnv1_table3")], "synthetic", [0], tmp_path / "out")[0]
    assert spec.run_dir == (tmp_path / "out" / spec.experiment / "seed0").resolve()
    assert train_command(spec) == [sys.executable, "-m", "detkit.cli.train", *spec.overrides, "resume=true"]
