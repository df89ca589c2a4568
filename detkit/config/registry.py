"""The registry of config targets: THE allowlist of what a `_target_` may name.

`targets()` maps every `_target_` of a detkit config (the model and backbone builders, the
data sources, the optimizer and schedule builders) to the callable it builds with. A target
is looked up here by its exact dotted name, never imported by name: `detkit.config.stored`
refuses any other name before anything is called, for configs read back from checkpoints and
for the training run's own (`detkit.config.build`), so a config naming anything else fails
before training rather than when its checkpoint is loaded. A new dataset is its class plus
one line here plus a config file (a model part is configured by flat keys of
`build_faster_rcnn`: no model config names a builder of a part);
tests/engine/test_checkpoint_safety.py checks that the names listed are exactly the
`_target_`s under configs/ and that each name is the import path of what it maps to.
`FILE_ARGUMENTS` names arguments that read a file (a stored config must leave them null), and
`REMOVED_ARGUMENTS` the arguments a builder no longer takes, with what configures their part
now (a config giving one is refused, saying so).

Importing this module imports neither torch nor detkit's data and model code: `targets()`
imports the builders when first called (the reason for the imports inside it: readers of
plain files, like the ablation report and `python -c "import detkit.config.stored"`, answer
without loading torch).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["targets", "allowed_targets", "file_arguments", "FILE_ARGUMENTS", "REMOVED_ARGUMENTS", "RENAMED_TARGETS",
           "upgrade_config"]


@functools.cache
def targets() -> Mapping[str, Callable[..., Any]]:
    """THE allowlist: dotted name -> the callable a `_target_` of that name builds with."""
    from detkit.data.sources import CocoFolder, SyntheticShapes
    from detkit.solver.optim import build_optimizer, build_scheduler
    from detkit.modeling.build import build_faster_rcnn, build_resnet

    return MappingProxyType({
        "detkit.modeling.build.build_faster_rcnn": build_faster_rcnn,
        "detkit.modeling.build.build_resnet": build_resnet,
        "detkit.data.sources.SyntheticShapes": SyntheticShapes,
        "detkit.data.sources.CocoFolder": CocoFolder,
        "detkit.solver.optim.build_optimizer": build_optimizer,
        "detkit.solver.optim.build_scheduler": build_scheduler,
    })


# Arguments of the targets above that name a file to read. A config stored in a checkpoint
# leaves them null (the checkpoint holds the weights; training stores `backbone.weights: null`).
FILE_ARGUMENTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "detkit.modeling.build.build_resnet": ("weights",),
})


_FASTER_RCNN = "detkit.modeling.build.build_faster_rcnn"
_POOLER_KEYS = "pooler_kind, pooler_output_size, pooler_sampling_ratio, deform_gamma, deform_hidden_dim"

# Arguments the targets above no longer take -> what configures their part now. Until 2026-12
# `build_faster_rcnn` also took its parts as nodes naming a builder (a second spelling of the
# flat keys); a config that still gives one is refused with this, before anything is built.
REMOVED_ARGUMENTS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    _FASTER_RCNN: MappingProxyType({
        "pooler": f"the RoI pooler is configured by the model's flat keys {_POOLER_KEYS}",
        "neck": "the FPN neck is configured by the model's flat key fpn_channels",
        "rpn": "the RPN is configured by the model's flat keys anchor_sizes, aspect_ratios and rpn_options",
        "box_head": "the 2fc box head is configured by the model's flat key representation_size",
        "box_predictor": "the box predictor (linear) has no options; the box head's width is the model's flat "
                         "key representation_size",
    }),
})


def allowed_targets() -> frozenset[str]:
    """The names of `targets()`."""
    return frozenset(targets())


def file_arguments() -> Mapping[str, tuple[str, ...]]:
    return FILE_ARGUMENTS


# `_target_` names of configs written before the optimizer builders moved to detkit.solver
# (2026-12), and the names of the same builders now: the run configs kept in the records of
# finished sweeps (docs/results/*.json) hold the old ones. Only comparisons of such configs
# with today's read this (`detkit.study.records.config_differences`); no config may name an
# old name to build with.
RENAMED_TARGETS: Mapping[str, str] = MappingProxyType({
    "detkit.engine.optim.build_optimizer": "detkit.solver.optim.build_optimizer",
    "detkit.engine.optim.build_scheduler": "detkit.solver.optim.build_scheduler",
})


_RESNET = "detkit.modeling.build.build_resnet"


def upgrade_config(node: Any) -> Any:
    """A stored config written by an earlier detkit, in today's argument names (a new tree; the
    input is not changed; anything not recognised is returned as it is, for the builders and
    checks to judge).

    Before the deformable layer kinds (2026-12), `build_resnet` chose between DCNv1 and DCNv2
    with `deform_modulated: bool` and took `deform_offset_groups: int`; those are now
    `deform_kind: dcnv1 | dcnv2` (with dcnv3, dcnv4, offset_sampling beside them),
    `deform_groups` and `deform_options: {}` (the old layers had no options). Checkpoints
    (`detkit.engine.checkpoint`) and the records of finished sweeps
    (`detkit.study.records.check_configs`) are read through this, so a run of before reads as
    the same run today. A node holding both an old and a new name is left alone."""
    if isinstance(node, list):
        return [upgrade_config(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: upgrade_config(value) for key, value in node.items()}
    old = {"deform_modulated", "deform_offset_groups"} & node.keys()
    new = {"deform_kind", "deform_groups", "deform_options"} & node.keys()
    modulated = node.get("deform_modulated", False)
    groups = node.get("deform_offset_groups", 1)
    if (node.get("_target_") == _RESNET and old and not new and isinstance(modulated, bool)
            and isinstance(groups, int) and not isinstance(groups, bool)):
        upgraded = {}
        for key, value in node.items():
            if key == "deform_modulated":
                upgraded["deform_kind"] = "dcnv2" if value else "dcnv1"
            elif key == "deform_offset_groups":
                upgraded["deform_groups"] = value
            else:
                upgraded[key] = value
        upgraded.setdefault("deform_kind", "dcnv1")
        upgraded.setdefault("deform_groups", 1)
        upgraded["deform_options"] = {}
        node = upgraded
    return node

