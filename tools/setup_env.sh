#!/usr/bin/env bash
# Sets up detkit from a fresh clone: a virtual environment in .venv, torch and
# torchvision from the package index, detkit's dependencies, and the compiled
# ops built from csrc/ against that torch.
#
#   bash tools/setup_env.sh                  # CPU kernels (+ CUDA ones if a matching nvcc is found)
#   bash tools/setup_env.sh --cuda-compiler  # also install nvcc from PyPI and build the CUDA kernels
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
python -c "import torch, torchvision" 2>/dev/null || {
  echo "[setup] installing torch and torchvision"
  pip install -q torch torchvision
}
if [ "$cuda_compiler" = 1 ]; then
  echo "[setup] installing the CUDA compiler matching torch"
  # shellcheck disable=SC1091
  source .ci/cuda_toolchain.sh
fi
echo "[setup] building detkit's ops and installing its dependencies"
MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation -e ".[test]"
python - <<'PY'
import torch
import detkit.ops as ops
ops.require_ops()
print(f"[setup] ready: torch {torch.__version__}, detkit ops loaded "
      f"(CUDA kernels {'built' if ops.cuda_kernels_built() else 'not built'})")
PY
