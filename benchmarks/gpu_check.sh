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
#   bench_dcn  dcnv3_core / dcnv4_core in float32 and bfloat16 at InternImage-T's stage shapes,
#              against a depthwise 3x3 conv and the official DCNv3 / DCNv4 kernels, with how
#              far their results differ from detkit's               -> bench_dcn.md
#              (the official kernels compile in the background from the start of the build:
#              official_build.log; sources from fetch_gpu_wheels.sh's .whl/official/)
#   smoke      tools/train.py experiment=smoke device=cuda          -> smoke/
#   train_bf16 300 iterations of the default model, amp=bf16        -> train_bf16/ (metrics.json)
# and summary.md: one line per step with its status and time. Under $OUT (the device tool
# brings back at most 8 files) everything but summary.md is packed into results.tar.gz.
#
# Without a GPU the GPU steps are skipped (summary says so) and the script exits 0, so its
# CPU parts can be tested anywhere (tests/install/test_gpu_check.py).
#
# GPU_CHECK_ONLY="build test_cuda bench_dcn" runs only the steps it names (env and wheels
# always run): all the steps together can outlast one 10-minute device call, so a task that
# needs only some of them names those.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
final=${OUT:-gpu_check_out}
mkdir -p "$final"
final=$(cd "$final" && pwd)
out="$final/results"
rm -rf "$out"
mkdir -p "$out"
python=${PYTHON:-python3}
export python out  # for the steps that run this script's functions in a new bash
summary="$out/summary.md"
{
  echo "# detkit GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---|---|"
} > "$summary"

only=${GPU_CHECK_ONLY:-}
selected() {
  [ -z "$only" ] || [[ " $only " == *" $1 "* ]]
}

# step NAME LIMIT_S LOG NEEDS_GPU COMMAND...
step() {
  local name=$1 limit=$2 log=$3 needs_gpu=$4
  shift 4
  if [ "$name" != env ] && [ "$name" != wheels ] && ! selected "$name"; then
    echo "| $name | not selected | 0 | |" >> "$summary"
    echo "[gpu_check] $name: not selected (GPU_CHECK_ONLY)"
    return 0
  fi
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

OFFICIAL_DIR=/tmp/official
export OFFICIAL_DIR

# The official DCNv3 / DCNv4 kernels, compiled in place under $OFFICIAL_DIR from the sources
# in .whl/official/. Prints one "official: ..." line per kernel, which the summary repeats.
official_build() {
  rm -rf "$OFFICIAL_DIR" && mkdir -p "$OFFICIAL_DIR"
  local archive dir
  archive=$(find .whl/official -maxdepth 1 -name 'DCNv4-*.tar.gz' 2> /dev/null | head -n 1)
  if [ -z "$archive" ]; then
    echo "official: DCNv4 skipped (no sources in .whl/official: run benchmarks/fetch_gpu_wheels.sh)"
  else
    tar xzf "$archive" -C "$OFFICIAL_DIR"
    dir=$(find "$OFFICIAL_DIR" -maxdepth 1 -name 'DCNv4-*' -type d | head -n 1)
    if (cd "$dir" && MAX_JOBS=6 nice -n 10 "$python" setup.py build_ext --inplace); then
      echo "official: DCNv4 built"
    else
      echo "official: DCNv4 skipped (its build failed, see official_build.log)"
    fi
  fi
  if [ ! -f .whl/official/ops_dcnv3.tar.gz ]; then
    echo "official: DCNv3 skipped (no sources: DCNv3 is on no package index; run" \
         "benchmarks/fetch_gpu_wheels.sh with DCNV3_SRC naming InternImage's ops_dcnv3 folder)"
  else
    mkdir -p "$OFFICIAL_DIR/ops_dcnv3" && tar xzf .whl/official/ops_dcnv3.tar.gz -C "$OFFICIAL_DIR/ops_dcnv3"
    # Recent torch no longer dispatches on Tensor::type() (its AT_DISPATCH calls fail to
    # compile): the one change to the official sources, to the dtype argument of those calls.
    sed -i 's/\([A-Za-z_]*\)\.type(), "/\1.scalar_type(), "/' "$OFFICIAL_DIR"/ops_dcnv3/src/cuda/*.cu
    if (cd "$OFFICIAL_DIR/ops_dcnv3" && MAX_JOBS=6 nice -n 10 "$python" setup.py build_ext --inplace); then
      echo "official: DCNv3 built"
    else
      echo "official: DCNv3 skipped (its build failed, see official_build.log)"
    fi
  fi
}

# dcnv3_core / dcnv4_core timings (CUDA events, medians) and agreement with the official kernels.
bench_dcn() {
  local waited=0
  while [ ! -f "$out/official_build.rc" ] && [ "$waited" -lt 150 ]; do
    sleep 5
    waited=$((waited + 5))
  done
  grep '^official:' "$out/official_build.log" 2> /dev/null || echo "official: build still running, not compared"
  "$python" - "$OFFICIAL_DIR" <<'PY'
import glob
import importlib.util
import os
import runpy
import statistics
import sys

import torch
import torch.nn.functional as F

import detkit.ops

root = sys.argv[1]
cuda = torch.device("cuda")
torch.backends.cudnn.benchmark = True
STAGES = [(56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32)]  # InternImage-T: H = W, C, G
BATCHES = [2, 16]
GEOMETRY = (3, 3, 1, 1, 1, 1, 1, 1)  # kernel, stride, padding, dilation (h, w each)


def load_extension(pattern: str, name: str):
    paths = sorted(glob.glob(os.path.join(root, pattern)))
    if not paths:
        return None, "not built"
    try:
        spec = importlib.util.spec_from_file_location(name, paths[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, ""
    except Exception as exc:  # noqa: BLE001
        return None, f"does not load: {exc}"


dcnv3_ext, dcnv3_why = load_extension("ops_dcnv3/DCNv3*.so", "DCNv3")
dcnv4_ext, dcnv4_why = load_extension("DCNv4-*/DCNv4/ext*.so", "ext")
tables = {}
for path in glob.glob(os.path.join(root, "DCNv4-*/DCNv4/functions/table.py")):
    tables = runpy.run_path(path)


def factor_up_to(n: int, limit) -> int:
    """The largest m <= 64 dividing n with limit(m) true (DCNv4's launch heuristic)."""
    best = 1
    for m in range(1, min(n, 64) + 1):
        if n % m == 0 and limit(m):
            best = m
    return best


def dcnv4_spec(b, h, w, g, d, backward: bool):
    """(d_stride, threads per block) as DCNv4's Python wrapper picks them: its tuned table,
    else its heuristic."""
    key = f"{b}x{h}x{w}x{g}x{d}"
    table = tables.get("BWDTABLE" if backward else "TABLE", {})
    if key in table:
        return int(table[key][0]), int(table[key][1])
    stride = (2 if d >= 64 else 1) if backward else 8
    cap = 256 if backward else 512
    m = factor_up_to(b * h * w, lambda m: m * g * d // stride <= cap)
    return stride, m * g * d // stride


def call_dcnv3_official(fn, *args):
    try:  # newer ops_dcnv3 take remove_center last, older ones do not
        return fn(*args, 0)
    except TypeError:
        return fn(*args)


def timed(fn, repeats: int = 25) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_diff(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def runs(b, hw, c, g, dtype):
    """name -> (forward fn, forward+backward fn, (output, grads) for the agreement check)."""
    d, k = c // g, 9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, hw, hw, c, generator=gen).to(cuda, dtype)
    offset = (torch.randn(b, hw, hw, g * k * 2, generator=gen) * 2).to(cuda, dtype)
    mask = torch.rand(b, hw, hw, g * k, generator=gen).to(cuda, dtype)
    packed = (g * k * 3 + 7) // 8 * 8
    om = torch.zeros(b, hw, hw, packed, device=cuda, dtype=dtype)
    om[..., :g * k * 3] = torch.cat([offset.view(b, hw, hw, g, 2 * k), mask.view(b, hw, hw, g, k)], -1).flatten(-2)
    grad = torch.randn(b, hw, hw, c, generator=gen).to(cuda, dtype)
    args = (*GEOMETRY, g, d, 1.0)
    out = {}

    def autograd_pair(f, leaves, grad_output=grad):
        leaves = [t.clone().requires_grad_(True) for t in leaves]
        return (lambda: f(*leaves)), (lambda: torch.autograd.grad(f(*leaves), leaves, grad_output))

    def v3_grads():
        leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
        y = detkit.ops.dcnv3_core(*leaves, *args)
        return y.detach(), torch.autograd.grad(y, leaves, grad)

    def v4_grads():
        leaves = [t.clone().requires_grad_(True) for t in (x, om)]
        y = detkit.ops.dcnv4_core(*leaves, *args)
        return y.detach(), torch.autograd.grad(y, leaves, grad)

    w = torch.randn(c, 1, 3, 3, generator=gen).to(cuda, dtype)
    # NCHW views of the channels-last tensors (channels_last memory format, cuDNN's NHWC kernels)
    x_nchw, grad_nchw = x.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    out["depthwise conv"] = (*autograd_pair(lambda t, wt: F.conv2d(t, wt, padding=1, groups=c), [x_nchw, w],
                                            grad_nchw), None)
    out["detkit dcnv3"] = (*autograd_pair(lambda *t: detkit.ops.dcnv3_core(*t, *args), [x, offset, mask]),
                           v3_grads)
    out["detkit dcnv4"] = (*autograd_pair(lambda *t: detkit.ops.dcnv4_core(*t, *args), [x, om]), v4_grads)
    def official(fwd, bwd):  # forward, forward then backward, (output, grads)
        return fwd, (lambda: (fwd(), bwd())), (lambda: (fwd(), bwd()))

    if dcnv3_ext is not None:
        out["official DCNv3"] = official(
            lambda: call_dcnv3_official(dcnv3_ext.dcnv3_forward, x, offset, mask, *args, 256),
            lambda: call_dcnv3_official(dcnv3_ext.dcnv3_backward, x, offset, mask, *args, grad, 256))
    if dcnv4_ext is not None:
        fs, ft = dcnv4_spec(b, hw, hw, g, d, False)
        bs, bt = dcnv4_spec(b, hw, hw, g, d, True)
        out["official DCNv4"] = official(
            lambda: dcnv4_ext.dcnv4_forward(x, om, *args, 256, 0, fs, ft, False),
            lambda: dcnv4_ext.dcnv4_backward(x, om, *args, 256, grad, 0, bs, bt, False))
    return out


NAMES = ["depthwise conv", "detkit dcnv3", "detkit dcnv4", "official DCNv3", "official DCNv4"]
print(f"# dcnv3_core / dcnv4_core on {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
print(f"official DCNv3: {'loaded' if dcnv3_ext else dcnv3_why}; official DCNv4: {'loaded' if dcnv4_ext else dcnv4_why}")
print("3x3, stride 1, padding 1, offset_scale 1; median ms over 25 runs (CUDA events) after warm-up;")
print("detkit through its autograd functions, the official kernels through their extensions' raw")
print("forward / backward calls; ratios: detkit dcnv3 / depthwise conv, official / detkit (> 1: detkit faster).")
problems = {}
for dtype in (torch.float32, torch.bfloat16):
    for mode in ("fwd", "fwd+bwd"):
        print(f"\n## {str(dtype).replace('torch.', '')}, {mode}\n")
        print("| N, HxW, C, G | " + " | ".join(NAMES) + " | dcnv3 / dw | off. v3 / dcnv3 | off. v4 / dcnv4 |")
        print("|---" * (len(NAMES) + 4) + "|")
        for b in BATCHES:
            for hw, c, g in STAGES:
                fns = runs(b, hw, c, g, dtype)
                ms = {}
                for name in NAMES:
                    if name not in fns:
                        continue
                    try:
                        ms[name] = timed(fns[name][0 if mode == "fwd" else 1])
                    except Exception as exc:  # noqa: BLE001
                        problems.setdefault((name, str(dtype)), str(exc).splitlines()[0][:200])
                cell = lambda n: f"{ms[n]:.3f}" if n in ms else "-"  # noqa: E731
                ratio = lambda a, z: f"{ms[a] / ms[z]:.2f}" if a in ms and z in ms else "-"  # noqa: E731
                print(f"| {b}, {hw}x{hw}, {c}, {g} | " + " | ".join(cell(n) for n in NAMES) + " | "
                      + " | ".join([ratio("detkit dcnv3", "depthwise conv"), ratio("official DCNv3", "detkit dcnv3"),
                                    ratio("official DCNv4", "detkit dcnv4")]) + " |")
                del fns
                torch.cuda.empty_cache()

print("\n## Agreement with the official kernels (max |difference| / max |official|)\n")
print("| dtype | N, HxW, C, G | kernel | output | grad input | grad offset (v3) / offset_mask (v4) | grad mask (v3) |")
print("|---|---|---|---|---|---|---|")
for dtype in (torch.float32, torch.bfloat16):
    for hw, c, g in STAGES:
        fns = runs(2, hw, c, g, dtype)
        for mine, theirs in (("detkit dcnv3", "official DCNv3"), ("detkit dcnv4", "official DCNv4")):
            if theirs not in fns:
                continue
            try:
                y, grads = fns[mine][2]()
                y_off, grads_off = fns[theirs][2]()
                cells = [f"{rel_diff(y, y_off):.1e}"] + [f"{rel_diff(a, z):.1e}" for a, z in zip(grads, grads_off)]
                cells += ["-"] * (4 - len(cells))
                print(f"| {str(dtype).replace('torch.', '')} | 2, {hw}x{hw}, {c}, {g} | {mine} | "
                      + " | ".join(cells) + " |")
            except Exception as exc:  # noqa: BLE001
                problems.setdefault((f"{mine} vs {theirs}", str(dtype) + " agreement"),
                                    str(exc).splitlines()[0][:200])
if problems:
    print("\n## Not measured\n")
    for (name, what), why in problems.items():
        print(f"- {name}, {what}: {why}")
PY
}

step env 60 env.txt 0 env_report
step wheels 120 wheels.log 0 install_wheels
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
official_pid=""
official_start=$(date +%s)
if [ "$have_gpu" = 1 ] && selected bench_dcn; then
  (
    # timeout runs the build in its own process group and passes a TERM on to all of it.
    timeout --kill-after=10 480 bash -c "$(declare -f official_build); official_build" \
      > "$out/official_build.log" 2>&1 &
    build_pid=$!
    trap 'kill "$build_pid" 2> /dev/null' TERM
    wait "$build_pid"
    echo $? > "$out/official_build.rc"
  ) &
  official_pid=$!
fi
# The build uses the visible GPU's architecture (TORCH_CUDA_ARCH_LIST unset): one arch, fast.
step build 300 build.log 1 env DETKIT_WITH_CUDA=1 MAX_JOBS=16 \
  "$python" -m pip install --no-build-isolation --no-deps -e .
step test_cuda 300 test_cuda.log 1 "$python" -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py \
  --junitxml="$out/test_cuda.xml"
step bench_f32 120 bench_cuda_float32.md 1 "$python" benchmarks/bench_ops.py --device cuda --dtype float32
step bench_bf16 120 bench_cuda_bfloat16.md 1 "$python" benchmarks/bench_ops.py --device cuda --dtype bfloat16
step bench_dcn 360 bench_dcn.md 1 bench_dcn
if [ -n "$official_pid" ]; then
  kill "$official_pid" 2> /dev/null
  wait "$official_pid" 2> /dev/null
  outcome=$(grep '^official:' "$out/official_build.log" 2> /dev/null | sed 's/^official: //' | paste -sd ';' -)
  echo "| official_build | ${outcome:-unfinished} | $(( $(date +%s) - official_start )) | official_build.log |" >> "$summary"
fi
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
