"""Deployment: a trained detkit detector as one standard ONNX file that stock onnxruntime runs.

- `export_onnx(model, path, ...)`: the whole eval-mode detector, default-domain ONNX ops
  only (detkit.export.onnx_export explains the exporter choice and the checks).
- `check_exportable(model, opset)`: the checks alone; `OnnxExportError` names the part.
- `OnnxDetector(path)`: the exported file in onnxruntime, called like the PyTorch model.
- `BatchedDetector(model)`: the traced forward of the default export ([B, 3, H, W] of one
  size, B free -> flat detections with their image index); `ExportableDetector(model)`: the
  per-image one (dynamic_batch=False, B fixed). Both only drive the model's own modules; the
  forms of a computation that a trace needs (the transform's resize, the batched proposal
  filter and post-processing, the pooler's gathers) sit beside that computation in
  `detkit.modeling` (`transform.py`, `heads/rpn.py`, `heads/roi_heads.py`, `heads/poolers.py`).

Needs the "export" extra (onnx, onnxscript, onnxruntime); importing detkit never does.
"""
from detkit.export.batched import BatchedDetector
from detkit.export.detector import ExportableDetector
from detkit.export.onnx_export import (
    ExportResult,
    check_exportable,
    export_onnx,
    graph_domains,
    iter_nodes,
    read_metadata,
)
from detkit.export.runtime import OnnxDetector, load_label_map
from detkit.ops.onnx import OnnxExportError

__all__ = [
    "BatchedDetector",
    "ExportResult",
    "ExportableDetector",
    "OnnxDetector",
    "OnnxExportError",
    "check_exportable",
    "export_onnx",
    "graph_domains",
    "iter_nodes",
    "load_label_map",
    "read_metadata",
]
