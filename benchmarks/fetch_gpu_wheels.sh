#!/usr/bin/env bash
# Wheels of detkit's dependencies that the lent GPU machine's image lacks (it has torch,
# torchvision, numpy, OpenCV, tensorboard, pytest and ninja, but no package index), for its
# Python 3.12 on x86-64, into .whl/ (git-ignored). benchmarks/gpu_check.sh installs them
# there. Run here, where the package index is reachable:
#     bash benchmarks/fetch_gpu_wheels.sh
#     DCNV3_SRC=/path/to/InternImage/classification/ops_dcnv3 bash benchmarks/fetch_gpu_wheels.sh
#
# It also puts into .whl/official/ the sources of the official DCNv3 / DCNv4 CUDA kernels,
# which gpu_check.sh compiles on the GPU machine to time detkit's dcnv3_core / dcnv4_core
# against them (it skips that comparison, saying why, for any that is missing):
#   * DCNv4: the sdist of the `DCNv4` package from the package index;
#   * DCNv3: not published on a package index; a copy of InternImage's ops_dcnv3 folder
#     (setup.py, src/, functions/) is packed when DCNV3_SRC names one.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl pycocotools "hydra-core>=1.3,<1.4" "omegaconf>=2.2,<2.4"  # hydra-core 1.3 needs omegaconf < 2.4
# antlr4-python3-runtime (omegaconf's parser) is published as a source archive only; it is
# pure Python, so a wheel built here installs there.
"$python" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.*"

mkdir -p .whl/official
# DCNv4's setup.py raises without a visible GPU, and pip runs it to read the package's
# metadata even for a download, so for that one command a sitecustomize module makes
# torch.cuda.is_available() true (and CUDA_HOME names an empty folder when unset). Nothing
# is compiled here.
shim=$(mktemp -d)
cat > "$shim/sitecustomize.py" <<'PY'
try:
    import torch.cuda
    torch.cuda.is_available = lambda: True
except Exception:
    pass
PY
if ! PYTHONPATH="$shim" CUDA_HOME="${CUDA_HOME:-$shim}" "$python" -m pip download -q --no-deps \
    --no-build-isolation --no-binary :all: -d .whl/official "DCNv4==1.0.0.post2"; then
  echo "fetch_gpu_wheels.sh: could not download the DCNv4 sources (torch must be importable here);" \
       "gpu_check.sh will skip the comparison with the official DCNv4" >&2
fi
rm -rf "$shim"
if [ -n "${DCNV3_SRC:-}" ] && [ -f "$DCNV3_SRC/setup.py" ] && [ -d "$DCNV3_SRC/src" ]; then
  tar czf .whl/official/ops_dcnv3.tar.gz -C "$DCNV3_SRC" --exclude=build --exclude='*.so' .
else
  echo "fetch_gpu_wheels.sh: DCNV3_SRC does not name InternImage's ops_dcnv3 folder (setup.py, src/);" \
       "gpu_check.sh will skip the comparison with the official DCNv3" >&2
fi
ls -l .whl .whl/official
