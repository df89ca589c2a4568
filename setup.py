"""Build of detkit's compiled ops (`detkit._C`) from csrc/.

Without them detkit still works: DETKIT_BUILD_EXT=0 (or, the variable unset, no C++
compiler found) installs the Python package alone, and the ops run on their pure-PyTorch
path; one line says so (detkit/_build.py, `decide_extension`).

The C++ CPU kernels are always built. Whether the CUDA kernels are built too is
decided by detkit/_build.py (`decide(probe())`): when wanted (DETKIT_WITH_CUDA=1,
or a visible GPU, or TORCH_CUDA_ARCH_LIST set) and possible (a CUDA torch, nvcc
of its CUDA version, complete headers). The decision is printed as one line;
DETKIT_WITH_CUDA=1 with a toolchain that cannot work stops here with what is
missing.

Build against the torch in the current environment:
    pip install --no-build-isolation -e .
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch
from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_rules():
    # By path: importing the detkit package would need it built already.
    spec = importlib.util.spec_from_file_location("detkit_build_rules", os.path.join(ROOT, "detkit", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _extension():
    rules = _load_build_rules()
    try:
        wanted = rules.decide_extension(rules.probe_extension())
    except rules.BuildConfigError as exc:
        raise SystemExit(f"detkit: {exc}") from None
    if not wanted.build:
        print(wanted.line(), file=sys.stderr, flush=True)
        return None
    try:
        decision = rules.decide(rules.probe())
    except rules.BuildConfigError as exc:
        raise SystemExit(f"detkit: {exc}") from None
    print(decision.line(), file=sys.stderr, flush=True)

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("DETKIT_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp"]
    if not decision.cuda:
        return CppExtension(
            "detkit._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    if decision.arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = decision.arch_list
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("DETKIT_WITH_CUDA", None))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "detkit._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


def _packages() -> list[str]:
    # Here, not in pyproject.toml, because no package discovery finds detkit.configs: it is
    # the top-level configs/ folder (package-dir and package-data in pyproject.toml); its
    # config groups are listed too, as the data-only packages they are.
    groups = find_namespace_packages(where=os.path.join(ROOT, "configs"))
    return [*find_namespace_packages(where=ROOT, include=["detkit*"]), "detkit.configs",
            *(f"detkit.configs.{group}" for group in groups)]


_ext = _extension()
setup(
    packages=_packages(),
    ext_modules=[_ext] if _ext is not None else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)} if _ext is not None else {},
)
