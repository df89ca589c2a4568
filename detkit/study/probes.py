"""Inference-time probes of a trained model's deformable RoI pooling: what its offsets and
(modulated) bin weights carry.

`tools/probe_roi_pool.py roi_pool_probe=NAME` (`detkit.study.cli.probe_roi_pool`) evaluates a checkpoint with every `DeformRoIPool` in it
changed at inference (the weights are not touched):

- "no_offsets": the bins stay at their RoIAlign positions (offsets [K, 2, ph, pw] set to 0);
  a modulated pooler keeps its bin weights.
- "mask_roi_mean": each RoI's bin weights [K, 1, ph, pw] replaced by their mean over its
  ph x pw bins: the RoI keeps its overall scale, loses which bins it weighs more.
- "mask_batch_mean": every bin of every RoI of a forward pass weighed by the mean of all of
  them: one scale for all.

The AP lost under a probe is how much the trained model depends on what the probe removes.
It is not the gain the part brings over a model trained without it (that model would have
learnt differently): that is what the ablation tables measure.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from detkit.ops import DeformRoIPool

ROI_POOL_PROBES = ("no_offsets", "mask_roi_mean", "mask_batch_mean")
MASK_PROBES = ("mask_roi_mean", "mask_batch_mean")


def _probed(offset: Tensor, mask: Tensor | None, probe: str) -> tuple[Tensor, Tensor | None]:
    """offset [K, 2, ph, pw], mask [K, 1, ph, pw] or None -> the same with `probe` applied
    (a probe `probed_poolers` accepted for this pooler)."""
    if probe == "no_offsets":
        return torch.zeros_like(offset), mask
    if probe == "mask_roi_mean":
        return offset, mask.mean(dim=(1, 2, 3), keepdim=True).expand_as(mask).contiguous()
    return offset, mask.mean().expand_as(mask).contiguous()  # mask_batch_mean


def probed_poolers(model: nn.Module, probe: str) -> list[DeformRoIPool]:
    """The `DeformRoIPool`s of `model` that `probe` would change. Raises ValueError for an
    unknown probe, a model without deformable RoI pooling, or a mask probe on an unmodulated
    pooler (so a tool can check before it loads any data)."""
    if probe not in ROI_POOL_PROBES:
        raise ValueError(f"roi_pool_probe must be one of {list(ROI_POOL_PROBES)} (or null), got {probe!r}")
    poolers = [m for m in model.modules() if isinstance(m, DeformRoIPool)]
    if not poolers:
        raise ValueError(f"roi_pool_probe={probe!r}: the model has no deformable RoI pooling (its pooler kind is "
                         f"not 'deform' or 'mdeform')")
    if probe in MASK_PROBES and not all(p.modulated for p in poolers):
        raise ValueError(f"roi_pool_probe={probe!r} changes the bin weights of modulated deformable RoI pooling "
                         f"('mdeform'); this model's is not modulated ('deform')")
    return poolers


@contextlib.contextmanager
def roi_pool_probe(model: nn.Module, probe: str | None) -> Iterator[int]:
    """Within the block, every `DeformRoIPool` of `model` pools with `probe` applied to its
    predicted offsets and masks (module docstring); None changes nothing. Yields how many
    poolers were probed. Raises ValueError before changing anything where `probed_poolers`
    does."""
    if probe is None:
        yield 0
        return
    poolers = probed_poolers(model, probe)
    for pooler in poolers:
        predict = pooler.predict_offsets  # the class's method, bound

        def probed_predict(input: Tensor, rois: Tensor, predict=predict) -> tuple[Tensor, Tensor | None]:
            offset, mask = predict(input, rois)
            return _probed(offset, mask, probe)

        pooler.predict_offsets = probed_predict  # an instance attribute shadows the method
    try:
        yield len(poolers)
    finally:
        for pooler in poolers:
            del pooler.predict_offsets
