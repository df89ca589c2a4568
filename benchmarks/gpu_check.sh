#!/usr/bin/env bash
# Everything detkit needs to learn from a GPU, in one call of about 8 minutes, with every
# result written into one folder ($OUT when set, as on the lent GPU machine; else
# gpu_check_out/):
#
#   bash benchmarks/fetch_gpu_wheels.sh          # here, once: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh                 # there: build, CUDA tests, benchmarks, training
#
# Steps (each with its own time limit; a failed step is recorded and the next one runs):
#   env        python, torch, nvcc, GPU, missing packages          -> env.txt
#   wheels     pip install .whl/*.whl into /tmp/site (if present)   -> wheels.log
#   build      DETKIT_WITH_CUDA=1 pip install --no-build-isolation --no-deps -e .   -> build.log
#   test_cuda  pytest tests/ops/test_cuda.py (every CUDA-only check) -> test_cuda.log, test_cuda.xml
#   bench_f32  benchmarks/bench_ops.py --device cuda (vs torchvision's CUDA kernel, cuDNN)
#   bench_bf16 the same in bfloat16, plus autocast vs direct bf16   -> bench_*.md
#   smoke      tools/train.py experiment=smoke device=cuda          -> smoke/
#   train_bf16 300 iterations of the default model, amp=bf16        -> train_bf16/ (metrics.json)
# and summary.md: one line per step with its status and time. Under $OUT (the device tool
# brings back at most 8 files) everything but summary.md is packed into results.tar.gz.
#
# Without a GPU the GPU steps are skipped (summary says so) and the script exits 0, so its
# CPU parts can be tested anywhere (tests/install/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-gpu_check_out}
mkdir -p "$final"
final=$(cd "$final" && pwd)
out="$final/results"
rm -rf "$out"
mkdir -p "$out"
python=${PYTHON:-python3}
export python
summary="$out/summary.md"
echo "# detkit GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')" > "$summary"
echo >> "$summary"
echo "| step | status | seconds | output |" >> "$summary"
echo "|---|---|---|---|" >> "$summary"

# step NAME LIMIT_S LOG NEEDS_GPU COMMAND...
step() {
  local name=$1 limit=$2 log=$3 needs_gpu=$4
  shift 4
  if [ "$needs_gpu" = 1 ] && [ "$have_gpu" != 1 ]; then
    echo "| $name | skipped (no GPU) | 0 | |" >> "$summary"
    echo "[gpu_check] $name: skipped (no GPU)"
    return 0
  fi
  echo "[gpu_check] $name (limit ${limit}s) ..."
  local start status rc
  start=$(date +%s)
  if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs programs only
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" > "$out/$log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$out/$log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "| $name | $status | $(( $(date +%s) - start )) | $log |" >> "$summary"
  echo "[gpu_check] $name: $status"
}

have_gpu=0
if "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  have_gpu=1
fi

env_report() {
  echo "date: $(date -u)"
  echo "python: $("$python" --version 2>&1) at $(command -v "$python")"
  "$python" - <<'PY'
import importlib.util
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs")
need = ["torchvision", "numpy", "pycocotools", "hydra", "omegaconf", "tensorboard", "cv2", "pytest", "ninja"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("missing packages:", ", ".join(missing) if missing else "none")
PY
  echo "nvcc: $(nvcc --version 2>/dev/null | grep release || echo 'not found')"
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  "$python" detkit/_build.py 2>&1 || true
}

install_wheels() {
  # Wheels made by benchmarks/fetch_gpu_wheels.sh; the GPU image has no package index.
  if "$python" -c 'import pycocotools, hydra, omegaconf' 2> /dev/null; then
    echo "pycocotools, hydra-core and omegaconf are installed: nothing to install"
    return 0
  fi
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "pycocotools, hydra-core or omegaconf is missing and there is no .whl/ folder:" \
         "run benchmarks/fetch_gpu_wheels.sh where the package index is reachable" >&2
    return 1
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
}

step env 60 env.txt 0 env_report
step wheels 120 wheels.log 0 install_wheels
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
# The build uses the visible GPU's architecture (TORCH_CUDA_ARCH_LIST unset): one arch, fast.
step build 300 build.log 1 env DETKIT_WITH_CUDA=1 MAX_JOBS=16 \
  "$python" -m pip install --no-build-isolation --no-deps -e .
step test_cuda 200 test_cuda.log 1 "$python" -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py \
  --junitxml="$out/test_cuda.xml"
step bench_f32 120 bench_cuda_float32.md 1 "$python" benchmarks/bench_ops.py --device cuda --dtype float32
step bench_bf16 120 bench_cuda_bfloat16.md 1 "$python" benchmarks/bench_ops.py --device cuda --dtype bfloat16
export DETKIT_CACHE="$out/cache"
step smoke 120 smoke.log 1 "$python" tools/train.py experiment=smoke device=cuda "hydra.run.dir=$out/smoke"
step train_bf16 240 train_bf16.log 1 "$python" tools/train.py device=cuda amp=bf16 schedule.max_iters=300 \
  eval_period=0 checkpoint_period=300 "hydra.run.dir=$out/train_bf16"
rm -rf "$out/cache" "$out"/*/checkpoints "$out"/*/events.out.tfevents.*
echo >> "$summary"
echo "GPU: $([ "$have_gpu" = 1 ] && echo yes || echo 'none (GPU steps skipped)')" >> "$summary"
cp "$summary" "$final/summary.md"
if [ -n "${OUT:-}" ]; then
  tar czf "$final/results.tar.gz" -C "$out" . && rm -rf "$out"
fi
cat "$final/summary.md"
