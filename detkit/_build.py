"""Whether `setup.py` compiles detkit's ops at all, which kernels (CPU only, or CPU and
CUDA), and why.

The extension is built unless DETKIT_BUILD_EXT=0, or (the variable unset) no C++ compiler
is found ($CXX, else c++, g++ or clang++; cl on Windows): detkit then installs without it
and its ops take the pure-PyTorch path (detkit/ops/_dispatch.py), and one line says so.
DETKIT_BUILD_EXT=1 insists, stopping the install when there is no compiler.

Stdlib only, so setup.py loads it by path before detkit is installed and
tools/setup_env.sh runs it as a script (`python detkit/_build.py`) to print the
decision before pip hides the build output. Both go through `decide(probe())`,
so the set-up script, `pip install --no-build-isolation -e .` and the tests
agree.

The CUDA kernels are built when they are wanted and can work:

- wanted: DETKIT_WITH_CUDA=1, or (the variable unset) a visible GPU or
  TORCH_CUDA_ARCH_LIST set; DETKIT_WITH_CUDA=0 never builds them;
- can work: torch is a CUDA build, nvcc under CUDA_HOME has torch's CUDA
  major.minor version (same major at least, when forced), and the headers that
  torch's CUDA headers include are there (a bare system nvcc often lacks the
  cuBLAS / cuSPARSE / cuSOLVER headers, a CUDA 13 one sometimes CCCL).

Wanted but unable: with DETKIT_WITH_CUDA=1 the build stops with what is missing
and how to get it; otherwise the CPU kernels are built and the line says why.
Forced without a GPU and without TORCH_CUDA_ARCH_LIST, the arch list is
`default_arch_list(torch's CUDA)` (torch's own default would need a GPU).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

#: Headers that ATen's CUDA headers (CUDAContext.h and what it includes) and
#: detkit's kernels need at compile time; "cub/" stands for NVIDIA's CCCL.
REQUIRED_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cublas_v2.h", "cusparse.h",
                    "cusolverDn.h", "cub/")

TOOLCHAIN_HINT = ("`bash tools/setup_env.sh --cuda-compiler` (or `source .ci/cuda_toolchain.sh` "
                  "in the active virtual environment) installs nvcc {cuda} and its headers from "
                  "PyPI and sets CUDA_HOME")


class BuildConfigError(RuntimeError):
    """The requested build cannot work; the message says what is missing and how to get it."""


# ---------------------------------------------------------------------------- the extension at all

@dataclass(frozen=True)
class ExtensionFacts:
    """What building the extension at all depends on (see `probe_extension`)."""

    switch: str                    # DETKIT_BUILD_EXT, "" when unset
    compiler: str | None           # path of the C++ compiler found, None when none is


@dataclass(frozen=True)
class ExtensionDecision:
    build: bool
    reason: str                    # one line for the user

    def line(self) -> str:
        if self.build:
            return f"detkit: building the compiled ops: {self.reason}"
        return (f"detkit: installing without the compiled ops ({self.reason}): they run on the "
                f"pure-PyTorch path, slower (docs/benchmarks.md); install a C++ compiler and "
                f"reinstall to build them")


def decide_extension(facts: ExtensionFacts) -> ExtensionDecision:
    """Build the extension or not; raises BuildConfigError when DETKIT_BUILD_EXT is invalid,
    or is 1 without a compiler."""
    if facts.switch not in ("", "0", "1"):
        raise BuildConfigError(f"DETKIT_BUILD_EXT must be 0, 1 or unset, got {facts.switch!r}")
    if facts.switch == "0":
        return ExtensionDecision(False, "DETKIT_BUILD_EXT=0")
    if facts.compiler is None:
        if facts.switch == "1":
            raise BuildConfigError("DETKIT_BUILD_EXT=1, but no C++ compiler was found ($CXX, c++, g++, "
                                   "clang++): install one (e.g. `apt-get install g++`, Xcode's command "
                                   "line tools, MSVC Build Tools), or unset DETKIT_BUILD_EXT to install "
                                   "without the compiled ops")
        return ExtensionDecision(False, "no C++ compiler found: $CXX, c++, g++, clang++")
    return ExtensionDecision(True, f"C++ compiler {facts.compiler}")


def find_cxx_compiler(environ: dict | None = None) -> str | None:
    """The C++ compiler a build would use: $CXX when set (its first word), else the first of
    c++, g++, clang++ (cl on Windows) on PATH; None when there is none."""
    import shlex
    import shutil

    environ = os.environ if environ is None else environ
    path = environ.get("PATH")
    cxx = environ.get("CXX", "").strip()
    if cxx:
        return shutil.which(shlex.split(cxx)[0], path=path)
    names = ("cl",) if sys.platform == "win32" else ("c++", "g++", "clang++")
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def probe_extension() -> ExtensionFacts:
    return ExtensionFacts(switch=os.environ.get("DETKIT_BUILD_EXT", "").strip(), compiler=find_cxx_compiler())


@dataclass(frozen=True)
class BuildFacts:
    """What the decision depends on (see `probe`)."""

    switch: str                    # DETKIT_WITH_CUDA, "" when unset
    torch_version: str             # torch.__version__
    torch_cuda: str | None         # torch.version.cuda ("13.0"), None for a CPU-only torch
    cuda_home: str | None          # torch.utils.cpp_extension.CUDA_HOME
    nvcc_version: str | None       # "13.0" from `$CUDA_HOME/bin/nvcc --version`, None if absent
    missing_headers: tuple[str, ...]  # REQUIRED_HEADERS not found (include dirs, see probe)
    gpu_visible: bool              # torch.cuda.is_available()
    arch_list: str | None          # TORCH_CUDA_ARCH_LIST, None when unset or empty


@dataclass(frozen=True)
class BuildDecision:
    cuda: bool
    reason: str                    # one line for the user
    arch_list: str | None = None   # TORCH_CUDA_ARCH_LIST to set for the build (None: leave as is)

    def line(self) -> str:
        kernels = "CPU and CUDA kernels" if self.cuda else "CPU kernels only"
        return f"detkit: building {kernels}: {self.reason}"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def default_arch_list(cuda_version: str) -> str:
    """GPU architectures (TORCH_CUDA_ARCH_LIST) to compile for when none is given: every
    generation the CUDA version supports from Turing on, each major with its base arch
    (a cubin runs on later minors of the same major: 8.6 covers 8.9, 12.0 covers 12.1),
    and PTX of the newest, which the driver compiles for GPUs newer than the list.

    CUDA 13 dropped Maxwell, Pascal and Volta; CUDA 12.8 added Blackwell (10.0, 12.0).
    """
    version = _major_minor(cuda_version)
    if version >= (13, 0):
        archs = ["7.5", "8.0", "8.6", "9.0", "10.0", "11.0", "12.0"]
    elif version >= (12, 8):
        archs = ["7.0", "7.5", "8.0", "8.6", "9.0", "10.0", "12.0"]
    else:
        archs = ["7.0", "7.5", "8.0", "8.6", "9.0"]
    archs[-1] += "+PTX"
    return ";".join(archs)


def _toolchain_problems(facts: BuildFacts, exact_minor: bool) -> list[str]:
    cuda = facts.torch_cuda
    if facts.nvcc_version is None:
        return [f"no CUDA compiler: {facts.cuda_home or '(CUDA_HOME unset)'}/bin/nvcc is missing or "
                f"does not run"]
    problems = []
    nvcc, wanted = _major_minor(facts.nvcc_version), _major_minor(cuda)
    if nvcc[0] != wanted[0] or (exact_minor and nvcc != wanted):
        problems.append(f"nvcc under CUDA_HOME={facts.cuda_home} is {facts.nvcc_version}, torch "
                        f"{facts.torch_version} needs CUDA {cuda}")
    if facts.missing_headers:
        problems.append(f"CUDA headers missing under CUDA_HOME={facts.cuda_home}: "
                        f"{', '.join(facts.missing_headers)}")
    return problems


def decide(facts: BuildFacts) -> BuildDecision:
    """The build for `facts`; raises BuildConfigError when DETKIT_WITH_CUDA is invalid, or
    is 1 and the CUDA build cannot work."""
    if facts.switch not in ("", "0", "1"):
        raise BuildConfigError(f"DETKIT_WITH_CUDA must be 0, 1 or unset, got {facts.switch!r}")
    if facts.switch == "0":
        return BuildDecision(False, "DETKIT_WITH_CUDA=0")
    forced = facts.switch == "1"
    if facts.torch_cuda is None:
        if forced:
            raise BuildConfigError(
                f"DETKIT_WITH_CUDA=1, but torch {facts.torch_version} is a CPU-only build "
                f"(torch.version.cuda is None): install a CUDA build of torch (`pip install torch` "
                f"from PyPI on Linux x86-64 gives one), or unset DETKIT_WITH_CUDA")
        return BuildDecision(False, f"torch {facts.torch_version} is a CPU-only build")
    hint = TOOLCHAIN_HINT.format(cuda=facts.torch_cuda)
    if forced:
        problems = _toolchain_problems(facts, exact_minor=False)
        if problems:
            raise BuildConfigError(f"DETKIT_WITH_CUDA=1, but the CUDA kernels cannot be built: "
                                   f"{'; '.join(problems)}. {hint[0].upper()}{hint[1:]}")
        why = "DETKIT_WITH_CUDA=1"
    else:
        if not facts.gpu_visible and facts.arch_list is None:
            return BuildDecision(False, "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset "
                                        "(DETKIT_WITH_CUDA=1 builds the CUDA kernels without a GPU)")
        why = "a GPU is visible" if facts.gpu_visible else "TORCH_CUDA_ARCH_LIST is set"
        problems = _toolchain_problems(facts, exact_minor=True)
        if problems:
            return BuildDecision(False, f"{why}, but {'; '.join(problems)} ({hint})")
    nvcc_note = f"nvcc {facts.nvcc_version} at {facts.cuda_home}"
    if facts.arch_list is None and not facts.gpu_visible:
        archs = default_arch_list(facts.torch_cuda)
        return BuildDecision(True, f"{why}; {nvcc_note}; no GPU and no TORCH_CUDA_ARCH_LIST, so "
                                   f"for archs {archs}", arch_list=archs)
    archs = facts.arch_list or "the visible GPUs"
    return BuildDecision(True, f"{why}; {nvcc_note}; archs {archs}")


# ---------------------------------------------------------------------------- probing

def nvcc_version(cuda_home: str | None) -> str | None:
    """major.minor of `$cuda_home/bin/nvcc`, None when it is missing or does not run."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def missing_headers(cuda_home: str | None, cpath: str | None = None) -> tuple[str, ...]:
    """REQUIRED_HEADERS found neither in `$cuda_home/include` (and its cccl/ folder, where
    CUDA 13 keeps CCCL) nor in the CPATH folders (where CUDA 12's split wheels put theirs)."""
    dirs = []
    if cuda_home:
        dirs += [os.path.join(cuda_home, "include"), os.path.join(cuda_home, "include", "cccl")]
    dirs += [d for d in (cpath or "").split(os.pathsep) if d]
    return tuple(h for h in REQUIRED_HEADERS
                 if not any(os.path.exists(os.path.join(d, h.rstrip("/"))) for d in dirs))


def probe() -> BuildFacts:
    """The facts of this environment: the installed torch, the environment variables and
    the compiler under torch's CUDA_HOME."""
    import logging

    import torch

    # Importing cpp_extension logs a warning when no GPU runtime is found: expected here.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    finally:
        logger.setLevel(level)

    torch_cuda = torch.version.cuda
    cuda_home = CUDA_HOME if torch_cuda else None
    return BuildFacts(
        switch=os.environ.get("DETKIT_WITH_CUDA", "").strip(),
        torch_version=torch.__version__,
        torch_cuda=torch_cuda,
        cuda_home=cuda_home,
        nvcc_version=nvcc_version(cuda_home),
        missing_headers=missing_headers(cuda_home, os.environ.get("CPATH")) if cuda_home else (),
        gpu_visible=bool(torch_cuda) and torch.cuda.is_available(),
        arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or None,
    )


def main() -> int:
    """Print the decision line; exit 2 with the reason when the requested build cannot work."""
    try:
        extension = decide_extension(probe_extension())
        if not extension.build:
            print(extension.line(), flush=True)
            return 0
        print(decide(probe()).line(), flush=True)
    except BuildConfigError as exc:
        print(f"detkit: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
