#!/usr/bin/env bash
# Sets up detkit from a fresh clone: a virtual environment in .venv, torch and
# torchvision from the package index, detkit's dependencies, and the compiled
# ops built from csrc/ against that torch.
#
#   bash tools/setup_env.sh                  # CPU kernels (+ CUDA ones when wanted and possible)
#   bash tools/setup_env.sh --cuda-compiler  # also install nvcc from PyPI and build the CUDA kernels
#   DETKIT_BUILD_EXT=0 bash tools/setup_env.sh  # no compiled ops: the pure-PyTorch path (also
#                                            # chosen by itself when no C++ compiler is found)
#
# Which kernels are built, and why, is decided by detkit/_build.py and printed
# before the build. The extras installed are [test,export] (pytest, ninja,
# onnx, onnxscript, onnxruntime), so one set-up serves training, tests and export.
#
# Safe to run again: it reuses .venv and only rebuilds the extension.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cuda_compiler=0
for arg in "$@"; do
  case "$arg" in
    --cuda-compiler) cuda_compiler=1 ;;
    *) echo "setup_env.sh: unknown option $arg (known: --cuda-compiler)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
pip install -q --upgrade pip
# torch first: the extension is compiled against it (hence --no-build-isolation below).
# The supported range, as in pyproject.toml (tests/install/test_build_decision.py checks they
# agree): an unbounded `pip install torch` could take a release that the project's own
# requirement would then replace, leaving the extension built against the wrong torch. pip
# does nothing when the installed versions already fit.
TORCH_SPEC="torch>=2.11,<2.16"
TORCHVISION_SPEC="torchvision>=0.26,<0.31"
echo "[setup] torch and torchvision ($TORCH_SPEC, $TORCHVISION_SPEC)"
pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
if [ "$cuda_compiler" = 1 ]; then
  echo "[setup] installing the CUDA compiler matching torch"
  # shellcheck disable=SC1091
  source .ci/cuda_toolchain.sh
fi
# The build decision, shown here because pip -q hides the build's own output; it exits 2
# with what is missing when DETKIT_WITH_CUDA=1 cannot work.
python detkit/_build.py | sed 's/^detkit: /[setup] /'
echo "[setup] building detkit's ops and installing its dependencies"
MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation -e ".[test,export]"
# The last line says which path detkit's ops take: the compiled kernels, or (installed with
# DETKIT_BUILD_EXT=0, or without a C++ compiler) the slower pure-PyTorch path. A build that
# was meant to produce the kernels and did not load fails here.
python - <<'PY'
import torch
import detkit.ops as ops
from detkit import _build
from detkit.ops import _extension
if _build.decide_extension(_build.probe_extension()).build:
    ops.require_ops()
if _extension.LOADED:
    cuda = "CPU and CUDA" if ops.cuda_kernels_built() else "CPU (CUDA kernels not built)"
    print(f"[setup] ready: torch {torch.__version__}, detkit ops on the compiled kernels: {cuda}")
else:
    print(f"[setup] ready: torch {torch.__version__}, detkit ops on the pure-PyTorch path (slower, "
          f"docs/benchmarks.md): {_extension.load_problem()}")
PY
