# CUDA compiler for building detkit's CUDA kernels on a machine without a GPU
# (or without a system CUDA toolkit matching torch).
#
# Usage, with the project's virtual environment active and torch installed:
#     source .ci/cuda_toolchain.sh
#
# What it does:
#   * installs from the package registry the nvcc matching torch.version.cuda
#     (major.minor X.Y): nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt and
#     nvidia-cuda-cccl, all pinned to X.Y.* (for CUDA 12: nvidia-cuda-nvcc-cu12
#     and nvidia-cuda-cccl-cu12). The runtime, cuBLAS, cuSPARSE and cuSOLVER
#     headers come with torch's own CUDA dependencies; the script checks them
#     all (detkit/_build.py's REQUIRED_HEADERS).
#   * exports CUDA_HOME (the wheel directory holding bin/nvcc), puts
#     $CUDA_HOME/bin first on PATH, and adds to LIBRARY_PATH a directory holding
#     the unversioned libcudart.so symlink the linker needs for -lcudart (the
#     wheel ships only libcudart.so.N).
#   * exports DETKIT_WITH_CUDA=1. TORCH_CUDA_ARCH_LIST is left alone: without
#     a GPU and without it, setup.py builds for every architecture the CUDA
#     version supports from Turing on, with PTX for the newest.
# Idempotent and quiet on success; returns non-zero with a message on failure
# (CPU-only torch, no virtual environment, missing headers).

_detkit_cuda_toolchain() {
    local py rules
    rules="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/detkit/_build.py"
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        echo "cuda_toolchain.sh: activate the virtual environment first (VIRTUAL_ENV is unset)" >&2
        return 1
    fi
    py="$VIRTUAL_ENV/bin/python"

    local cuda_xy
    cuda_xy=$("$py" -c 'import torch; v = torch.version.cuda; print(".".join(v.split(".")[:2]) if v else "")') || {
        echo "cuda_toolchain.sh: cannot import torch with $py" >&2
        return 1
    }
    if [ -z "$cuda_xy" ]; then
        echo "cuda_toolchain.sh: torch in $VIRTUAL_ENV is a CPU-only build (torch.version.cuda is None);" \
             "install a CUDA build of torch to compile the CUDA kernels" >&2
        return 1
    fi

    # The compiler wheels of torch's CUDA version X.Y, each pinned to X.Y.*: the newest
    # nvvm/crt are a newer minor whose PTX the pinned ptxas rejects. CCCL (cub/, thrust/,
    # cuda/std) comes with some torch builds' dependencies (13.2) and not with others
    # (13.0), so it is pinned too. CUDA 12 wheels carry a -cu12 suffix, and its nvcc wheel
    # bundles nvvm and crt.
    local wheels
    case "$cuda_xy" in
        12.*) wheels="nvidia-cuda-nvcc-cu12 nvidia-cuda-cccl-cu12" ;;
        *) wheels="nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-cccl" ;;
    esac
    # pip only when a wheel is missing or of another minor: re-sourcing is fast.
    # shellcheck disable=SC2086
    if ! "$py" - "$cuda_xy" $wheels <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    ok = all(version(p).startswith(sys.argv[1] + ".") for p in sys.argv[2:])
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
    then
        local specs="" wheel
        for wheel in $wheels; do specs="$specs $wheel==${cuda_xy}.*"; done
        # shellcheck disable=SC2086
        "$py" -m pip install -q --disable-pip-version-check $specs || {
            echo "cuda_toolchain.sh: pip could not install the CUDA ${cuda_xy} compiler wheels ($wheels)" >&2
            return 1
        }
    fi

    # Locate nvcc, the CUDA headers torch includes, and the versioned libcudart
    # inside the installed wheels (nvidia/cu13/... for CUDA 13,
    # nvidia/cuda_nvcc/... and siblings for CUDA 12); the header list is
    # detkit/_build.py's, the one setup.py checks.
    local found
    found=$("$py" - "$rules" <<'EOF'
import glob, importlib.util, os, sys, sysconfig
spec = importlib.util.spec_from_file_location("detkit_build_rules", sys.argv[1])
rules = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = rules
spec.loader.exec_module(rules)
nvidia = os.path.join(sysconfig.get_paths()["purelib"], "nvidia")
nvcc = sorted(glob.glob(os.path.join(nvidia, "*", "bin", "nvcc")))
cudart = sorted(glob.glob(os.path.join(nvidia, "*", "lib", "libcudart.so.[0-9]*")))
if not nvcc or not cudart:
    sys.exit(f"no nvcc or libcudart.so.N under {nvidia}")
cuda_home = os.path.dirname(os.path.dirname(nvcc[0]))
# CUDA 13 wheels share one include/ under CUDA_HOME; CUDA 12 wheels have one
# include/ per package, which then go on CPATH.
home_include = os.path.join(cuda_home, "include")
extra = [d for d in sorted(glob.glob(os.path.join(nvidia, "*", "include"))) if d != home_include]
missing = rules.missing_headers(cuda_home, os.pathsep.join(extra))
if missing:
    sys.exit("missing CUDA headers: " + ", ".join(missing))
split = not os.path.exists(os.path.join(home_include, "cuda_runtime.h"))
print(cuda_home)
print(cudart[0])
print(os.pathsep.join(extra) if split else "")
EOF
    ) || {
        echo "cuda_toolchain.sh: incomplete CUDA wheels in $VIRTUAL_ENV (see the message above)" >&2
        return 1
    }
    local cuda_home cudart extra_includes
    { read -r cuda_home; read -r cudart; read -r extra_includes; } <<<"$found"

    local link_dir="$VIRTUAL_ENV/cuda-link"
    mkdir -p "$link_dir" && ln -sfn "$cudart" "$link_dir/libcudart.so" || {
        echo "cuda_toolchain.sh: cannot create $link_dir/libcudart.so" >&2
        return 1
    }

    export CUDA_HOME="$cuda_home"
    case "$PATH:" in
        "$CUDA_HOME/bin:"*) ;;
        *) export PATH="$CUDA_HOME/bin:$PATH" ;;
    esac
    case ":${LIBRARY_PATH:-}:" in
        *":$link_dir:"*) ;;
        *) export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}" ;;
    esac
    local dir
    while IFS= read -r dir; do
        [ -n "$dir" ] || continue
        case ":${CPATH:-}:" in
            *":$dir:"*) ;;
            *) export CPATH="${CPATH:+$CPATH:}$dir" ;;
        esac
    done <<<"${extra_includes//:/$'\n'}"

    local nvcc_xy
    nvcc_xy=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
    if [ "$nvcc_xy" != "$cuda_xy" ]; then
        echo "cuda_toolchain.sh: nvcc under $CUDA_HOME is $nvcc_xy, torch needs $cuda_xy" >&2
        return 1
    fi

    # No TORCH_CUDA_ARCH_LIST here: with a GPU torch builds for it; without one
    # setup.py takes detkit/_build.py's default_arch_list (Turing to Blackwell + PTX).
    export DETKIT_WITH_CUDA=1
}

if _detkit_cuda_toolchain; then
    unset -f _detkit_cuda_toolchain
    return 0 2>/dev/null || exit 0
fi
unset -f _detkit_cuda_toolchain
# `return` when sourced; `exit` only if someone runs the file directly.
return 1 2>/dev/null || exit 1
