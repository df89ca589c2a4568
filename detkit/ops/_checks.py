"""Argument checks shared by the op wrappers: errors name the argument and what was expected."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """`value` as an (h, w) pair of ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_tensor(t: object, name: str, dim: int, shape_doc: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-d Tensor {shape_doc}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor, got dtype {t.dtype}")
    return t


def check_like(t: Tensor, name: str, reference: Tensor, reference_name: str = "input") -> None:
    """Same device and (outside autocast) same dtype as `reference`."""
    if t.device != reference.device:
        raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")
    if t.dtype != reference.dtype and not torch.is_autocast_enabled(reference.device.type):
        raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has dtype {reference.dtype}")
