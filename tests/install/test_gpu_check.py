"""benchmarks/gpu_check.sh, the one-call GPU check: what can be checked without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
GPU_STEPS = ["build", "test_cuda", "bench_f32", "bench_bf16", "smoke", "train_bf16"]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "fetch_gpu_wheels.sh")], check=True)


def test_without_a_gpu_it_skips_the_gpu_steps_and_packs_its_results(tmp_path):
    # CUDA_VISIBLE_DEVICES="": no GPU for the script, also on a machine that has one.
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # Under $OUT only the summary and one archive: the device tool brings back at most 8 files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| step")}
    assert rows["env"] == "ok" and rows["wheels"] == "ok"
    assert all(rows[name] == "skipped (no GPU)" for name in GPU_STEPS), rows
    assert "GPU: none (GPU steps skipped)" in summary
    with tarfile.open(tmp_path / "results.tar.gz") as archive:
        env_report = archive.extractfile("./env.txt").read().decode()
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: False" in env_report
    assert "detkit: building" in env_report  # the build decision, as the GPU build will see it
