"""Optimizer and learning-rate schedule for iteration-based detector training.

`build_optimizer`: SGD with momentum over the parameters that require gradients, in
groups that differ by learning rate and weight decay:

- offset-branch parameters (found with `detkit.ops.offset_branch_parameters`) get
  `base_lr * lr_mult[kind]`, kind "deform_conv" (the offset/mask convs of deformable
  convolutions) or "deform_roi_pool" (the offset fc layers of deformable RoI pooling);
  a kind missing from `lr_mult` gets 1.0. The DCN papers use 0.1 (DCNv2, conv offsets),
  1.0 and 0.01 (DCNv1, conv offsets and RoI pooling fc).
- parameters of normalisation layers (BatchNorm, GroupNorm, LayerNorm, ... : their
  scale and shift) get `weight_decay_norm` (default 0: decaying them towards zero
  only fights the normalisation; detectron2's default too). Every other parameter,
  biases included, gets `weight_decay`.

`build_scheduler`: a `LambdaLR` stepped once per iteration, so the learning rate used
by the update of iteration i (0-based) is `lr_i = group_lr * factor(i)` with

    factor(i) = warmup(i) * gamma ** (number of steps s with s <= i)
    warmup(i) = warmup_factor + (1 - warmup_factor) * i / warmup_iters   for i < warmup_iters
              = 1                                                           afterwards

(linear warm-up from `warmup_factor` of the learning rate, as in Goyal et al.).

The schedule config node (configs/schedule/*.yaml) names both builders as `_partial_`
nodes; `detkit.config.build.build_from_config` builds them with the model.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from detkit.ops import offset_branch_parameters

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "OFFSET_KINDS", "NORM_TYPES"]

logger = logging.getLogger(__name__)

OFFSET_KINDS = ("deform_conv", "deform_roi_pool")
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def build_optimizer(model: nn.Module, base_lr: float, momentum: float, weight_decay: float,
                    lr_mult: Mapping[str, float] | None = None,
                    weight_decay_norm: float = 0.0) -> torch.optim.SGD:
    """SGD over `model`'s trainable parameters in groups (see the module docstring).

    Every group carries `"name"` (e.g. "default", "norm", "deform_conv") and
    `"lr_mult"` for logging; its "lr" is already `base_lr * lr_mult`.
    """
    lr_mult = dict(lr_mult or {})
    unknown = sorted(set(lr_mult) - set(OFFSET_KINDS))
    if unknown:
        raise ValueError(f"lr_mult has unknown offset-branch kinds {unknown}; known: {list(OFFSET_KINDS)}")
    offset_kind = {id(p): kind for kind, _, p in offset_branch_parameters(model)}
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES)
                   for p in m.parameters(recurse=False)}

    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in offset_kind:
            name = offset_kind[id(param)]
            mult, decay = float(lr_mult.get(name, 1.0)), weight_decay
        elif id(param) in norm_params:
            name, mult, decay = "norm", 1.0, weight_decay_norm
        else:
            name, mult, decay = "default", 1.0, weight_decay
        group = groups.setdefault(name, {"name": name, "params": [], "lr": base_lr * mult,
                                         "lr_mult": mult, "weight_decay": float(decay)})
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no parameter that requires a gradient")
    for g in groups.values():
        logger.debug("param group %s: %d tensors, lr %.3g, weight decay %.3g",
                     g["name"], len(g["params"]), g["lr"], g["weight_decay"])
    return torch.optim.SGD(list(groups.values()), lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def lr_factor(iteration: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int],
              gamma: float) -> float:
    """The learning-rate multiplier of (0-based) iteration `iteration` (module docstring)."""
    factor = gamma ** sum(1 for s in steps if s <= iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


class _WarmupMultiStep:
    """Picklable LambdaLR function with plain-number state (its __dict__ goes into
    the scheduler's state_dict, which must load with torch.load(weights_only=True))."""

    def __init__(self, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> None:
        self.warmup_iters, self.warmup_factor = int(warmup_iters), float(warmup_factor)
        self.steps, self.gamma = [int(s) for s in steps], float(gamma)

    def __call__(self, iteration: int) -> float:
        return lr_factor(iteration, self.warmup_iters, self.warmup_factor, self.steps, self.gamma)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_iters: int, warmup_factor: float,
                    steps: Sequence[int], gamma: float, max_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then step decay, per iteration: call `scheduler.step()` after every
    `optimizer.step()`. Steps at or beyond `max_iters` never take effect (allowed, so
    that a shortened run keeps the schedule of the full one)."""
    steps = [int(s) for s in steps]
    if steps != sorted(steps) or any(s <= 0 for s in steps):
        raise ValueError(f"schedule steps must be positive and increasing; got {steps}")
    if warmup_iters < 0 or not 0 < warmup_factor <= 1:
        raise ValueError(f"need warmup_iters >= 0 and 0 < warmup_factor <= 1; got {warmup_iters}, {warmup_factor}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive; got {gamma}")
    late = [s for s in steps if s >= max_iters]
    if late:
        logger.info("lr steps %s are at or after max_iters %d: they do not take effect in this run", late, max_iters)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupMultiStep(warmup_iters, warmup_factor, steps, gamma))
