"""Multi-process training helpers, set up from torchrun's environment.

`torchrun --nproc_per_node=N tools/train.py ...` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. `init_distributed()` joins
them into the default process group: NCCL for CUDA tensors (each process on GPU
LOCAL_RANK) and gloo for CPU tensors, or gloo alone on a machine without CUDA. Without
WORLD_SIZE (or with WORLD_SIZE=1) nothing is initialised and every helper below acts
as a single process.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "env_world_size", "init_distributed", "is_distributed", "get_rank", "get_world_size", "get_local_rank",
    "is_main_process", "barrier", "all_gather_object", "broadcast_object", "cleanup", "resolve_device",
    "unwrap_model",
]


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset): how many processes torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_minutes: float = 30.0) -> bool:
    """Join torchrun's process group if there is one; True when running distributed.

    Idempotent. With CUDA available the default group has both backends
    ("cpu:gloo,cuda:nccl") and this process's current GPU is LOCAL_RANK.
    """
    if is_distributed():
        return True
    if env_world_size() <= 1:
        return False
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is set but {key} is not: start multi-process runs with torchrun")
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects); [obj] alone."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (the argument is ignored on the other ranks)."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if is_distributed():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """The device named by a tools' `device=` option: "auto" -> cuda if available else cpu;
    cpu, cuda, cuda:N checked (a ValueError naming the option otherwise, or when CUDA is
    asked for but absent); with several processes on CUDA, this process's GPU (LOCAL_RANK)."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but CUDA is not available (use device=cpu or device=auto)")
        if is_distributed():
            device = torch.device("cuda", get_local_rank())
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return device


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers (else the model itself)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
