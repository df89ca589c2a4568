# CUDA compiler for building detkit's CUDA kernels on a machine without a GPU
# (or without a system CUDA toolkit matching torch).
#
# Usage, with the project's virtual environment active and torch installed:
#     source .ci/cuda_toolchain.sh
#
# What it does:
#   * installs from the package registry the nvcc matching torch.version.cuda
#     (major.minor X.Y): nvidia-cuda-nvcc, nvidia-nvvm and nvidia-cuda-crt, all
#     pinned to X.Y.* (the newest nvvm/crt are a newer minor whose PTX the
#     pinned ptxas rejects). The runtime, cuBLAS, cuSPARSE, cuSOLVER and CCCL
#     headers come with torch's own CUDA dependencies; the script checks them.
#   * exports CUDA_HOME (the wheel directory holding bin/nvcc), puts
#     $CUDA_HOME/bin first on PATH, and adds to LIBRARY_PATH a directory holding
#     the unversioned libcudart.so symlink the linker needs for -lcudart (the
#     wheel ships only libcudart.so.N).
#   * exports DETKIT_WITH_CUDA=1 and, when unset, TORCH_CUDA_ARCH_LIST="8.0;9.0"
#     (A100, H100: a short list keeps CI builds fast).
# Idempotent and quiet on success; returns non-zero with a message on failure
# (CPU-only torch, no virtual environment, missing headers).

_detkit_cuda_toolchain() {
    local py
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

    # pip only when a wheel is missing or of another minor: re-sourcing is fast.
    if ! "$py" - "$cuda_xy" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    ok = all(version(p).startswith(sys.argv[1] + ".")
             for p in ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt"))
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
    then
        "$py" -m pip install -q --disable-pip-version-check \
            "nvidia-cuda-nvcc==${cuda_xy}.*" "nvidia-nvvm==${cuda_xy}.*" "nvidia-cuda-crt==${cuda_xy}.*" || {
            echo "cuda_toolchain.sh: pip could not install nvcc ${cuda_xy}" >&2
            return 1
        }
    fi

    # Locate nvcc, the CUDA headers torch includes, and the versioned libcudart
    # inside the installed wheels (nvidia/cu13/... for CUDA 13,
    # nvidia/cuda_nvcc/... and siblings for CUDA 12).
    local found
    found=$("$py" - <<'EOF'
import glob, os, sys, sysconfig
nvidia = os.path.join(sysconfig.get_paths()["purelib"], "nvidia")
nvcc = sorted(glob.glob(os.path.join(nvidia, "*", "bin", "nvcc")))
cudart = sorted(glob.glob(os.path.join(nvidia, "*", "lib", "libcudart.so.[0-9]*")))
if not nvcc or not cudart:
    sys.exit(f"no nvcc or libcudart.so.N under {nvidia}")
include_dirs = sorted(glob.glob(os.path.join(nvidia, "*", "include")))
needed = ["cuda_runtime.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h", "cuda_fp16.h", "cuda_bf16.h"]
missing = [h for h in needed if not any(os.path.exists(os.path.join(d, h)) for d in include_dirs)]
if not any(os.path.isdir(os.path.join(d, sub, "cub")) for d in include_dirs for sub in ("", "cccl")):
    missing.append("cub/ (CCCL)")
if missing:
    sys.exit("missing CUDA headers: " + ", ".join(missing))
cuda_home = os.path.dirname(os.path.dirname(nvcc[0]))
# CUDA 13 wheels share one include/ under CUDA_HOME; CUDA 12 wheels have one
# include/ per package, which then go on CPATH.
home_include = os.path.join(cuda_home, "include")
split = not os.path.exists(os.path.join(home_include, "cuda_runtime.h"))
extra = [d for d in include_dirs if d != home_include] if split else []
print(cuda_home)
print(cudart[0])
print(os.pathsep.join(extra))
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

    export DETKIT_WITH_CUDA=1
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
}

if _detkit_cuda_toolchain; then
    unset -f _detkit_cuda_toolchain
    return 0 2>/dev/null || exit 0
fi
unset -f _detkit_cuda_toolchain
# `return` when sourced; `exit` only if someone runs the file directly.
return 1 2>/dev/null || exit 1
