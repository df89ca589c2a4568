"""Deformable ops: functions over the compiled kernels, the layers that use them.

- `deform_conv2d`: deformable / modulated deformable convolution (DCNv1 / DCNv2).
- `deform_roi_pool`: deformable / modulated deformable RoI pooling.
- `dcnv3_core`, `dcnv4_core`: DCNv3 / DCNv4 sampling (InternImage's conventions, channels-last).
- Where the compiled extension is missing or has no kernel for the tensors' device, the ops
  run on a pure-PyTorch path (detkit/ops/pure/), warning once; `use_pure_ops()` or
  DETKIT_OPS=pure forces it, `ops_path(device)` says which runs, and `require_ops(device)`
  raises unless the compiled kernels do (docs/ops.md, "Which path runs where").
- `DeformConv2d`, `DeformRoIPool`: layers owning their zero-initialised offset branches.
- `DCNv3`, `DCNv4`: InternImage's / FlashInternImage's layers (their options and parameter
  names), channels-first; `OffsetSampling`: per-channel offsets (the Keras ConvOffset2D layer).
- `offset_branch_parameters`: finds those branches' parameters for lr multipliers.
- `detkit.ops.reference`: slow float64-friendly references used by the tests.
"""
from detkit.ops._dispatch import PureOpsWarning, require_ops, use_pure_ops
from detkit.ops._dispatch import path as ops_path
from detkit.ops._extension import cuda_kernels_built
from detkit.ops.dcnv3 import dcnv3_core, dcnv4_core
from detkit.ops.deform_conv import deform_conv2d
from detkit.ops.deform_roi_pool import deform_roi_pool
from detkit.ops.modules import DeformConv2d, DeformRoIPool, OffsetSampling, offset_branch_parameters
from detkit.ops.dcnv3_layers import DCNv3, DCNv4

__all__ = [
    "DCNv3",
    "DCNv4",
    "OffsetSampling",
    "DeformConv2d",
    "DeformRoIPool",
    "PureOpsWarning",
    "cuda_kernels_built",
    "dcnv3_core",
    "dcnv4_core",
    "deform_conv2d",
    "deform_roi_pool",
    "offset_branch_parameters",
    "ops_path",
    "require_ops",
    "use_pure_ops",
]
