"""Helpers of the ONNX export tests: export a module with the TorchScript exporter into
memory, check it, and run it in onnxruntime."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from detkit.export import graph_domains
from detkit.ops.onnx import register_symbolics


def export_module(module: torch.nn.Module, args: tuple, input_names: list[str], opset: int = 19,
                  dynamic_axes: dict | None = None) -> onnx.ModelProto:
    """`module` traced into an ONNX model (checked with onnx.checker, default domain only)."""
    register_symbolics()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                          dynamic_axes=dynamic_axes or {})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    assert graph_domains(model) == {""}, f"non-default domains {graph_domains(model)}"
    return model


def run_onnx(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run `model` in onnxruntime (CPU) on the feeds it takes (unused ones are dropped,
    as the exporter drops inputs the graph does not read)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n].detach().cpu().numpy() for n in names})
