"""Which kernels setup.py builds (detkit/_build.py), for the environments a user meets."""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit import _build
from detkit._build import BuildConfigError, BuildFacts, decide, default_arch_list

REPO_ROOT = Path(__file__).resolve().parents[2]

CUDA_TORCH = BuildFacts(switch="", torch_version="2.14.1+cu130", torch_cuda="13.0",
                        cuda_home="/opt/cuda", nvcc_version="13.0", missing_headers=(),
                        gpu_visible=False, arch_list=None)


def facts(**changes) -> BuildFacts:
    return dataclasses.replace(CUDA_TORCH, **changes)


# ---------------------------------------------------------------- the decision table

def test_cpu_only_torch_builds_cpu_kernels():
    decision = decide(facts(torch_version="2.13.0+cpu", torch_cuda=None, cuda_home=None, nvcc_version=None,
                            gpu_visible=False))
    assert not decision.cuda
    assert decision.line() == "detkit: building CPU kernels only: torch 2.13.0+cpu is a CPU-only build"


def test_cpu_only_torch_with_cuda_forced_fails_early():
    with pytest.raises(BuildConfigError, match=r"DETKIT_WITH_CUDA=1, but torch 2.13.0\+cpu is a CPU-only build"):
        decide(facts(switch="1", torch_version="2.13.0+cpu", torch_cuda=None, nvcc_version=None))


def test_cuda_torch_without_gpu_or_arch_list_builds_cpu_kernels_even_with_a_matching_nvcc():
    """The case that broke every fresh set-up: a CUDA torch, the machine's nvcc 13.0, no GPU."""
    decision = decide(facts())
    assert not decision.cuda
    assert "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset" in decision.reason
    assert "DETKIT_WITH_CUDA=1" in decision.reason  # says how to insist


def test_cuda_torch_with_no_compiler():
    wanted = facts(arch_list="9.0", nvcc_version=None, cuda_home="/usr/local")
    decision = decide(wanted)
    assert not decision.cuda
    assert "no CUDA compiler: /usr/local/bin/nvcc is missing" in decision.reason
    assert "--cuda-compiler" in decision.reason
    with pytest.raises(BuildConfigError, match=r"cannot be built: no CUDA compiler.*setup_env.sh --cuda-compiler"):
        decide(dataclasses.replace(wanted, switch="1"))


def test_matching_compiler_without_gpu_and_without_arch_list_forced():
    decision = decide(facts(switch="1"))
    assert decision.cuda
    assert decision.arch_list == default_arch_list("13.0")
    assert "DETKIT_WITH_CUDA=1" in decision.reason and decision.arch_list in decision.reason
    assert decision.line().startswith("detkit: building CPU and CUDA kernels: ")


@pytest.mark.parametrize("gpu,arch", [(True, None), (False, "8.0;9.0")], ids=["gpu", "arch_list"])
def test_matching_compiler_when_wanted_builds_cuda_with_the_given_archs(gpu, arch):
    decision = decide(facts(gpu_visible=gpu, arch_list=arch))
    assert decision.cuda and decision.arch_list is None  # torch's own choice stays
    assert ("8.0;9.0" if arch else "the visible GPUs") in decision.reason


def test_mismatched_compiler():
    old = facts(gpu_visible=True, nvcc_version="12.4")
    decision = decide(old)
    assert not decision.cuda
    assert "nvcc under CUDA_HOME=/opt/cuda is 12.4, torch 2.14.1+cu130 needs CUDA 13.0" in decision.reason
    with pytest.raises(BuildConfigError, match=r"is 12.4, torch 2.14.1\+cu130 needs CUDA 13.0"):
        decide(dataclasses.replace(old, switch="1"))
    # Another minor of the same major: too risky to pick automatically, allowed when forced.
    minor = facts(gpu_visible=True, nvcc_version="13.2")
    assert not decide(minor).cuda
    assert decide(dataclasses.replace(minor, switch="1")).cuda


def test_incomplete_headers():
    """The machine's own CUDA 13.0 toolkit: nvcc matches, cuBLAS/cuSPARSE/cuSOLVER headers are absent."""
    system = facts(arch_list="9.0", cuda_home="/usr/local/cuda",
                   missing_headers=("cublas_v2.h", "cusparse.h", "cusolverDn.h"))
    decision = decide(system)
    assert not decision.cuda
    assert "CUDA headers missing under CUDA_HOME=/usr/local/cuda: cublas_v2.h, cusparse.h, cusolverDn.h" \
        in decision.reason
    with pytest.raises(BuildConfigError, match=r"headers missing.*cublas_v2.h.*installs nvcc 13.0 and its headers"):
        decide(dataclasses.replace(system, switch="1"))


def test_switch_zero_and_bad_values():
    assert not decide(facts(switch="0", gpu_visible=True, arch_list="9.0")).cuda
    assert decide(facts(switch="0")).reason == "DETKIT_WITH_CUDA=0"
    with pytest.raises(BuildConfigError, match=r"DETKIT_WITH_CUDA must be 0, 1 or unset, got 'yes'"):
        decide(facts(switch="yes"))


@pytest.mark.parametrize("cuda,lowest,newest", [("13.0", "7.5", "12.0"), ("13.2", "7.5", "12.0"),
                                                ("12.8", "7.0", "12.0"), ("12.6", "7.0", "9.0")])
def test_default_arch_list(cuda, lowest, newest):
    archs = default_arch_list(cuda).split(";")
    assert archs[0] == lowest and archs[-1] == newest + "+PTX"
    assert all("+PTX" not in a for a in archs[:-1])
    versions = [tuple(int(p) for p in a.removesuffix("+PTX").split(".")) for a in archs]
    assert versions == sorted(versions)
    # One base arch per generation from Turing on: a cubin runs on later minors of its major.
    assert (7, 5) in versions and (8, 0) in versions and (9, 0) in versions


# ---------------------------------------------------------------- probing the environment

def test_missing_headers_looks_in_cuda_home_its_cccl_folder_and_cpath(tmp_path):
    home = tmp_path / "cuda"
    (home / "include" / "cccl" / "cub").mkdir(parents=True)
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cublas_v2.h"):
        (home / "include" / name).write_text("")
    assert _build.missing_headers(str(home)) == ("cusparse.h", "cusolverDn.h")
    extra = tmp_path / "split"
    extra.mkdir()
    (extra / "cusparse.h").write_text("")
    (extra / "cusolverDn.h").write_text("")
    assert _build.missing_headers(str(home), f"{tmp_path / 'absent'}{os.pathsep}{extra}") == ()
    assert _build.missing_headers(str(tmp_path / "nothing")) == _build.REQUIRED_HEADERS


def _fake_nvcc(home: Path, release: str) -> None:
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.48'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)


def test_nvcc_version(tmp_path):
    _fake_nvcc(tmp_path / "a", "13.0")
    assert _build.nvcc_version(str(tmp_path / "a")) == "13.0"
    assert _build.nvcc_version(str(tmp_path / "absent")) is None
    assert _build.nvcc_version(None) is None


def test_probe_reads_this_environment(monkeypatch):
    monkeypatch.setenv("DETKIT_WITH_CUDA", " 0 ")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    got = _build.probe()
    assert got.switch == "0" and got.arch_list is None
    assert got.torch_version == torch.__version__ and got.torch_cuda == torch.version.cuda
    assert got.gpu_visible == (torch.version.cuda is not None and torch.cuda.is_available())


def _run_rules(env_changes: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DETKIT_WITH_CUDA", "TORCH_CUDA_ARCH_LIST", "CPATH")}
    env.update(env_changes)
    return subprocess.run([sys.executable, str(REPO_ROOT / "detkit" / "_build.py")], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_script_prints_one_line_and_fails_early_when_forced_without_toolchain(tmp_path):
    """What tools/setup_env.sh prints before building, with CUDA_HOME pointing at an nvcc of
    the right version whose headers are absent."""
    _fake_nvcc(tmp_path, torch.version.cuda)
    auto = _run_rules({"CUDA_HOME": str(tmp_path)})
    assert auto.returncode == 0, auto.stderr
    if not torch.cuda.is_available():
        assert auto.stdout.splitlines() == [
            "detkit: building CPU kernels only: no GPU is visible and TORCH_CUDA_ARCH_LIST is unset "
            "(DETKIT_WITH_CUDA=1 builds the CUDA kernels without a GPU)"]
    forced = _run_rules({"CUDA_HOME": str(tmp_path), "DETKIT_WITH_CUDA": "1"})
    assert forced.returncode == 2
    lines = [line for line in forced.stderr.splitlines() if line.startswith("detkit:")]
    assert len(lines) == 1
    assert re.search(r"CUDA headers missing under CUDA_HOME=.*cuda_runtime\.h.*--cuda-compiler", lines[0])


# ---------------------------------------------------------------- one supported range

def test_setup_script_installs_the_torch_range_of_pyproject():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    script = (REPO_ROOT / "tools" / "setup_env.sh").read_text()
    for name in ("torch", "torchvision"):
        spec = re.search(rf'"({name}>=[0-9.]+,<[0-9.]+)"', pyproject).group(1)
        assert f'{name.upper()}_SPEC="{spec}"' in script, spec
    low, high = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', pyproject).groups()
    assert (low, high) == ("2.11", "2.16")
    assert "torch 2.11 to 2.15" in (REPO_ROOT / "README.md").read_text()
