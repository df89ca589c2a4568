"""Build of detkit's compiled ops (`detkit._C`) from csrc/.

The C++ CPU kernels are always built. The CUDA kernels are built when
DETKIT_WITH_CUDA=1, or, when the variable is unset, when torch is a CUDA build
and the CUDA compiler under CUDA_HOME has the same major.minor version as
torch.version.cuda (a mismatched nvcc is the usual cause of broken builds, so
auto-detection does not try it). DETKIT_WITH_CUDA=0 skips them.

Build against the torch in the current environment:
    pip install --no-build-isolation -e .
"""
from __future__ import annotations

import glob
import os
import re
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_version(cuda_home: str | None) -> str | None:
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _want_cuda() -> bool:
    switch = os.environ.get("DETKIT_WITH_CUDA", "").strip()
    if switch in ("0", "1"):
        return switch == "1"
    if switch:
        raise SystemExit(f"DETKIT_WITH_CUDA must be 0, 1 or unset, got {switch!r}")
    if torch.version.cuda is None:
        return False
    nvcc = _nvcc_version(CUDA_HOME)
    torch_cuda = ".".join(torch.version.cuda.split(".")[:2])
    if nvcc != torch_cuda:
        print(f"detkit: building CPU kernels only (nvcc under CUDA_HOME={CUDA_HOME} is {nvcc}, "
              f"torch needs CUDA {torch_cuda}; set DETKIT_WITH_CUDA=1 to force the CUDA build)")
        return False
    return True


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("DETKIT_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp"]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("DETKIT_WITH_CUDA", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "detkit._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "detkit._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
