#!/usr/bin/env bash
# Wheels of detkit's dependencies that the lent GPU machine's image lacks (it has torch,
# torchvision, numpy, OpenCV, tensorboard, pytest and ninja, but no package index), for its
# Python 3.12 on x86-64, into .whl/ (git-ignored). benchmarks/gpu_check.sh installs them
# there. Run here, where the package index is reachable:
#     bash benchmarks/fetch_gpu_wheels.sh
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
ls -l .whl
