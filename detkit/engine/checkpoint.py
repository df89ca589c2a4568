"""Checkpoints that survive kills and rebuild their model.

A detkit checkpoint is a dict saved with `torch.save` (docs/checkpoints.md):

    {"format": "detkit-checkpoint", "version": 1,
     "model": state_dict,
     "model_config": {...},          # the resolved model node (`_target_` names detkit builders)
     "data_config": {...},           # the resolved data node of the training run (`_target_`: a data source)
     "label_to_category_id": {...},  # model label -> dataset category id (COCO ids)
     "class_names": {...},           # model label -> name
     ... training state (optimizer, scheduler, iteration, RNG) for resumable runs}

Everything in it is plain containers, numbers, strings and tensors, so it loads with
`torch.load(weights_only=True)`. Loading one runs no code from it: `load_checkpoint`
refuses, before anything is built, configs whose `_target_` is not one of detkit's builders
(the registry of config targets, `detkit.config.registry.targets()`), Hydra options,
interpolations and non-plain values (`detkit.config.stored`), and `detkit.config.build.build_model` (and
`build_data_source` for the data config) looks builders up in that registry instead of
importing what a config names.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detkit.config.build import build_model
from detkit.config.registry import upgrade_config
from detkit.config.stored import CheckpointError, check_class_names, check_label_map, check_stored_config
from detkit.io import atomic_write

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_state_dict_strict",
           "load_model", "export_backbone"]

FORMAT = "detkit-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over `path`. A kill at any moment leaves either the old file or the
    new one, never a truncated one. A state that `load_checkpoint` would refuse (a config that
    is not plain resolved data naming detkit's builders, bad class mappings) is refused here,
    before anything is written: every checkpoint detkit writes loads."""
    _check_contents(dict(state), str(path))
    _atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, Path(path))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through `detkit.io.atomic_write`: a full disk or an unwritable folder is a
    one-line `WriteError` naming `path` (not torch's chained RuntimeError), the previous file
    kept and no temporary file left."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a detkit checkpoint; a clear CheckpointError if it is missing or not one, or if
    its configs or class mappings hold anything but plain data naming detkit's builders
    (`_check_contents`). The returned dict holds checked plain copies of those."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, unsafe contents ...
        raise CheckpointError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a detkit checkpoint (for torchvision weights use "
                              f"tools/import_torchvision.py)")
    return _check_contents(state, str(path))


# What torch.save writes before the pickle in its legacy (pre-zip) format: protocol 2 and the
# magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _unreadable(path: Path, exc: Exception) -> str:
    """One line saying why torch.load(weights_only=True) refused `path`: not a PyTorch archive,
    objects other than tensors and plain data (named when torch says which), or a damaged file.
    Never torch's own advice, which suggests loading the file unsafely."""
    if isinstance(exc, OSError):
        return f"cannot read checkpoint {path}: {exc.strerror or exc}"
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_LEGACY_MAGIC))
        # a zip file, also a truncated one (its first local header), or the legacy format
        archive = head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path) or head == _LEGACY_MAGIC
    except OSError as error:
        return f"cannot read checkpoint {path}: {error.strerror or error}"
    if not archive:
        return (f"{path} is not a detkit checkpoint: not a PyTorch archive (the zip file torch.save writes); "
                f"a detkit checkpoint is a training run's checkpoints/last.pth or tools/import_torchvision.py's output")
    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in message:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", message)
        what = f" ({found.group(1)})" if found else ""
        return (f"{path} is not a detkit checkpoint: it holds objects other than tensors and plain data{what}, "
                f"refused: loading it could run code from the file")
    first = message.strip().split(". ")[0].splitlines()[0] if message.strip() else type(exc).__name__
    return f"cannot read checkpoint {path}: a damaged or truncated PyTorch archive ({first})"


# Entries of a checkpoint that are configurations (checked and built only through
# detkit.config.stored). A new config entry is added here, so that every reader of
# checkpoints (the tools, resuming, export_backbone) gets it checked.
CONFIG_ENTRIES = ("model_config", "data_config")


def _check_contents(state: dict[str, Any], source: str) -> dict[str, Any]:
    """`state` with its configs and class mappings replaced by checked plain copies."""
    checked = dict(state)
    for key in CONFIG_ENTRIES:
        if state.get(key) is not None:
            checked[key] = upgrade_config(check_stored_config(state[key], source, root=key))
    if state.get("label_to_category_id") is not None:
        checked["label_to_category_id"] = check_label_map(state["label_to_category_id"], source,
                                                          "label_to_category_id")
    if state.get("class_names") is not None:
        checked["class_names"] = check_class_names(state["class_names"], source, "class_names")
    iteration = state.get("iteration")
    if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool)):
        raise CheckpointError(f"{source}: refused iteration: {type(iteration).__name__} is not an int")
    return checked


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights that must fit exactly; otherwise a CheckpointError listing the missing
    and unexpected keys and any shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not fit the model built from its config:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                lines.append(f"  {title} keys: {shown}")
        for k in mismatched[:10]:
            lines.append(f"  shape of {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint, load its weights, put it in eval mode.

    Returns (model, checkpoint dict)."""
    state = load_checkpoint(path)
    if "model_config" not in state or "model" not in state:
        raise CheckpointError(f"{path} holds no model config or weights")
    weights = state["model"]
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                   for k, v in weights.items()):
        raise CheckpointError(f"{path}: refused model: the weights are not a mapping of names to tensors")
    model = build_model(state["model_config"], str(path), root="model_config", allow_files=False)
    load_state_dict_strict(model, state["model"], str(path))
    return model.to(device).eval(), state


def export_backbone(checkpoint: str | os.PathLike, output: str | os.PathLike) -> int:
    """Write the ResNet backbone of a detkit checkpoint as a torchvision-style ResNet state
    dict (torchvision's parameter names, no `fc.*`, no offset branches), the format that
    `model.backbone.weights=PATH` loads (`detkit.modeling.backbone.load_torchvision_weights`):
    a detector trained here can initialise another, as an ImageNet ResNet would.
    Written atomically. Returns the number of tensors written."""
    state = load_checkpoint(checkpoint)
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{checkpoint} holds no model weights")
    backbone = {key[len("backbone."):]: value for key, value in weights.items()
                if key.startswith("backbone.") and ".offset_branch." not in key}
    if not backbone:
        raise CheckpointError(f"{checkpoint} has no backbone.* weights (keys start with "
                              f"{sorted({k.split('.')[0] for k in weights})})")
    _atomic_torch_save(backbone, Path(output))
    return len(backbone)
