"""Export a detkit Faster R-CNN to one standard ONNX file.

`export_onnx(model, path, ...)` writes the whole eval-mode detector -- resize and
normalisation, the backbone with its deformable convs (ONNX `DeformConv`), the FPN or
single-scale layout, the RPN with its proposal NMS (`NonMaxSuppression`), the RoI pooler
(`RoiAlign`, `MaxRoiPool`, the deformable kinds as shifted 1x1 `RoiAlign` bins, see
`detkit.ops.onnx`), the box head, per-class NMS and the boxes mapped back to the input
image -- as default-domain ONNX operators that stock onnxruntime runs.

Why the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): it is the one of
the two that exports the *whole* detector. torch.export (the current exporter) stops at
the data-dependent sizes of the proposal / detection NMS in torchvision's RPN and RoI
heads (pytorch/vision #9306, #9462; with torch 2.14, GuardOnDataDependentSymNode at the
`boxes.numel() == 0` test of torchvision's batched NMS), while a trace records the NMS as
`NonMaxSuppression` with dynamic output sizes, and torchvision's detection parts (anchor
generator, box clamps, batching, top-k) have tracing code paths computing sizes from tensor
shapes. Two traced forwards, both driving the model's own modules (and, where a trace needs
another form of a step, the form that sits beside that step in `detkit.modeling`):
`detkit.export.batched.BatchedDetector` (the default: batch, height and width dynamic) and
`detkit.export.detector.ExportableDetector` (torchvision's per-image loops unrolled: batch
fixed). The TorchScript exporter's newest opset is 20,
which has `DeformConv` (opset 19). The current exporter is used for single layers
(`detkit.ops.onnx.custom_translation_table`, opsets 19-22).

Opsets 21 and 22 (DeformConv-22 adds bfloat16): the graph is traced at opset 20 and
converted with `onnx.version_converter`. onnxruntime's CPU provider runs no RoiAlign or
MaxRoiPool at those opsets, so the RoI pooler is first swapped for its gather form
(`detkit.modeling.heads.poolers.GatherRoIPooler`: the same arithmetic from Gather, Floor, Clip and
sums), which needs a fixed sampling ratio and cannot do the "pool" kind.

Checks that run before any file is written raise `OnnxExportError` naming the part of
the model concerned; the file is written (atomically) only after the exported graph has
passed `onnx.checker` and holds default-domain operators only.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkit.io import atomic_write
from detkit.modeling.detector import FasterRCNN
from detkit.export.batched import BatchedDetector
from detkit.export.detector import ExportableDetector
from detkit.modeling.heads.poolers import GatherRoIPooler, RoIPooler
from detkit.ops.modules import DeformConv2d, DeformRoIPool
from detkit.ops.onnx import MAX_OPSET, MAX_TORCHSCRIPT_OPSET, MIN_OPSET, OnnxExportError, register_symbolics

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "image_index"]
SUPPORTED_OPSETS = tuple(range(MIN_OPSET, MAX_OPSET + 1))  # 19..22
METADATA_KEY = "detkit"


@dataclass
class ExportResult:
    path: Path
    opset: int
    batch_size: int
    input_size: tuple[int, int]
    dynamic_size: bool
    dynamic_batch: bool
    op_types: list[str]
    domains: list[str]
    warnings: list[str] = field(default_factory=list)


def iter_nodes(graph) -> Iterator[Any]:
    """Every node of an ONNX graph, those inside If / Loop / Scan subgraphs included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def graph_domains(model_proto) -> set[str]:
    """The operator domains used by all nodes ("" is the default ONNX domain)."""
    return {node.domain for node in iter_nodes(model_proto.graph)}


def check_exportable(model: nn.Module, opset: int = MIN_OPSET, batch_size: int = 1) -> list[str]:
    """Raise OnnxExportError naming the model part that cannot become standard ONNX at
    `opset`; return warnings about parts that export with a documented caveat."""
    if not isinstance(model, FasterRCNN):
        raise OnnxExportError(f"export_onnx exports detkit FasterRCNN detectors; got a {type(model).__name__}")
    if opset not in SUPPORTED_OPSETS:
        deform = [n for n, m in model.named_modules() if isinstance(m, DeformConv2d)]
        where = f" (the model's deformable convs, e.g. {deform[0]}, become DeformConv)" if deform else ""
        raise OnnxExportError(f"opset {opset} is not supported: ONNX DeformConv exists from opset {MIN_OPSET}"
                              f"{where} and onnxruntime runs it up to opset {MAX_OPSET}; use opset "
                              f"{MIN_OPSET}..{MAX_OPSET}")
    pooler = getattr(model.roi_heads, "box_roi_pool", None)
    if opset > MAX_TORCHSCRIPT_OPSET and isinstance(pooler, RoIPooler):
        # onnxruntime's CPU provider has no RoiAlign / MaxRoiPool kernel at opset 21-22: the pooler
        # becomes gathers (detkit.modeling.heads.roi_align_gather), which need a fixed number of samples.
        if pooler.kind == "pool":
            raise OnnxExportError(f"roi_heads.box_roi_pool: the 'pool' kind (MaxRoiPool) does not run in "
                                  f"onnxruntime at opset {opset}; export with opset {MIN_OPSET} or 20")
        if pooler.sampling_ratio <= 0:
            raise OnnxExportError(f"roi_heads.box_roi_pool: adaptive sampling (sampling_ratio=0) has no "
                                  f"opset-{opset} form (RoiAlign does not run in onnxruntime there and a gather "
                                  f"needs a fixed sample count); export with opset {MIN_OPSET} or 20")
    if int(batch_size) < 1:
        raise OnnxExportError(f"batch_size must be at least 1, got {batch_size}")
    notes = []
    transform = model.transform
    if getattr(transform, "fixed_size", None) is not None:
        raise OnnxExportError("transform: a fixed_size resize is not supported by the export (detkit builds "
                              "min_size/max_size transforms)")
    if not isinstance(pooler, RoIPooler):
        raise OnnxExportError(f"roi_heads.box_roi_pool: only detkit's RoIPooler exports, got "
                              f"{type(pooler).__name__}")
    if getattr(model.roi_heads, "mask_roi_pool", None) is not None or \
            getattr(model.roi_heads, "keypoint_roi_pool", None) is not None:
        raise OnnxExportError("roi_heads: mask and keypoint heads are not exported (boxes only)")
    for name, module in model.named_modules():
        if isinstance(module, DeformRoIPool) and module.sampling_ratio <= 0:
            notes.append(f"{name}: sampling_ratio=0 (adaptive): a bin whose size is an exact integer may take "
                         "one sample more per side in ONNX than in the kernel (see detkit.ops.onnx)")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats is False:
            raise OnnxExportError(f"{name}: BatchNorm without running statistics cannot be exported in eval mode")
    return notes


class _ModuleTracker:
    """Forward hooks keeping the stack of running submodules, to name the part that fails."""

    def __init__(self, root: nn.Module) -> None:
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.handles = []
        for name, module in root.named_modules():
            if not name:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)
        return hook

    def _leave(self):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _part_name(name: str | None) -> str:
    if not name:
        return "the detector"
    return name[len("model."):] if name.startswith("model.") else name


def _locate_aten_op(wrapper: nn.Module, example: Tensor, op: str) -> str | None:
    """The innermost submodule that calls torch function `op` (e.g. "fft_rfft2") in a forward."""
    from torch.overrides import TorchFunctionMode

    tracker = _ModuleTracker(wrapper)
    found: list[str] = []
    short = op.split("::")[-1].split(".")[0].lstrip("_")

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if not found and name.lstrip("_") in (short, short.replace("linalg_", "").replace("fft_", "")):
                found.append(tracker.stack[-1] if tracker.stack else "")
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), Spy():
            wrapper(example)
    except Exception:  # noqa: BLE001 - only a diagnosis
        pass
    finally:
        tracker.close()
    return found[0] if found else None


def _export_bytes(wrapper: nn.Module, example: Tensor, opset: int, dynamic_size: bool,
                  dynamic_batch: bool) -> bytes:
    image_axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_size:
        image_axes.update({2: "height", 3: "width"})
    dynamic_axes = {"images": image_axes} if image_axes else {}
    dynamic_axes.update({name: {0: "detections"} for name in OUTPUT_NAMES})
    buffer = io.BytesIO()
    tracker = _ModuleTracker(wrapper)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic, expected here
            torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
    except OnnxExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the part that raised it
        part = tracker.stack[-1] if tracker.stack else None
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        op = getattr(exc, "op_name", None) or _aten_name(message)
        if part is None and op is not None:
            tracker.close()
            part = _locate_aten_op(wrapper, example, op)
        raise OnnxExportError(f"cannot export {_part_name(part)} to standard ONNX (opset {opset}): "
                              f"{message}") from exc
    finally:
        tracker.close()
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_stdout():
    """Discard what C++ writes to file descriptor 1 meanwhile: on a failure the TorchScript exporter
    dumps its whole IR graph there (torch's setup_onnx_logging always enables its log)."""
    import sys

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _aten_name(message: str) -> str | None:
    import re

    match = re.search(r"'?(aten::[A-Za-z0-9_.]+)'?", message)
    return match.group(1) if match else None


def _example_input(model: FasterRCNN, batch_size: int, input_size: tuple[int, int] | None) -> Tensor:
    if input_size is None:
        short = int(model.transform.min_size[-1])
        input_size = (short, int(min(round(short * 4 / 3), model.transform.max_size)))
    height, width = (int(v) for v in input_size)
    if height < 1 or width < 1:
        raise OnnxExportError(f"input_size must be positive (height, width), got {input_size}")
    generator = torch.Generator().manual_seed(0)
    return torch.rand((int(batch_size), 3, height, width), generator=generator)


def export_onnx(model: FasterRCNN, path: str | os.PathLike, *, opset: int = MIN_OPSET, batch_size: int = 1,
                input_size: tuple[int, int] | None = None, dynamic_size: bool = True, dynamic_batch: bool = True,
                metadata: Mapping[str, Any] | None = None, verify: bool = False) -> ExportResult:
    """Write `model` (a detkit FasterRCNN, in eval mode) to `path` as one standard ONNX file.

    The file's input is "images" [B, 3, H, W] float32 RGB in [0, 1], a batch of images of
    one size: B is free with dynamic_batch=True (`detkit.export.batched.BatchedDetector`: the
    batched forms of the transform, RPN and RoI heads, with the per-image selections as index
    arithmetic), else fixed at batch_size (the per-image forward `ExportableDetector`,
    torchvision's loops unrolled); H and W are free unless
    dynamic_size=False (then fixed at input_size). Its outputs are "boxes" [D, 4] (x1, y1,
    x2, y2 in the input image's pixels), "scores" [D], "labels" [D] int64 and "image_index"
    [D] int64, the detections of all images in image order. batch_size and input_size
    (height, width) are also what is traced (default size: the transform's min_size by 4/3
    of it). `metadata` (e.g. label_to_category_id, class_names) is stored as JSON in
    the model's metadata under "detkit". verify=True also runs the graph in onnxruntime on
    the traced input and compares its detections with PyTorch's (same count, boxes within
    0.5 px, scores within 1e-3). Raises OnnxExportError before writing anything if a part
    of the model cannot be exported (or verification fails).
    """
    import onnx

    notes = check_exportable(model, opset, batch_size)
    register_symbolics()
    cpu_model = copy.deepcopy(model).to("cpu").float().eval()
    trace_opset = min(opset, MAX_TORCHSCRIPT_OPSET)
    if opset > trace_opset:
        cpu_model.roi_heads.box_roi_pool = GatherRoIPooler(cpu_model.roi_heads.box_roi_pool)
    wrapper = (BatchedDetector(cpu_model) if dynamic_batch else ExportableDetector(cpu_model)).eval()
    example = _example_input(cpu_model, batch_size, input_size)
    data = _export_bytes(wrapper, example, trace_opset, dynamic_size, dynamic_batch)
    proto = onnx.load_from_string(data)
    if opset > trace_opset:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as exc:  # noqa: BLE001
            raise OnnxExportError(f"cannot convert the opset-{trace_opset} graph to opset {opset}: "
                                  f"{str(exc).splitlines()[0]}") from exc
    domains = sorted(graph_domains(proto))
    if domains != [""]:
        custom = sorted({f"{n.domain}::{n.op_type}" for n in iter_nodes(proto.graph) if n.domain})
        raise OnnxExportError(f"the exported graph uses non-standard operators {custom}")
    info = {"format": "detkit-onnx", "version": 1, "opset": opset, "batch_size": int(batch_size),
            "dynamic_batch": bool(dynamic_batch), "input_size": list(example.shape[2:]),
            "dynamic_size": bool(dynamic_size),
            "num_classes": int(cpu_model.num_classes), **dict(metadata or {})}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info, sort_keys=True, default=_json_default)
    proto.producer_name = "detkit"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    data = proto.SerializeToString()
    if verify:
        _verify(wrapper, example, data)
    path = Path(path)
    _atomic_write(path, data)
    return ExportResult(path=path, opset=opset, batch_size=int(batch_size), input_size=tuple(example.shape[2:]),
                        dynamic_size=bool(dynamic_size), dynamic_batch=bool(dynamic_batch),
                        op_types=sorted({n.op_type for n in iter_nodes(proto.graph)}), domains=domains,
                        warnings=notes)


def _verify(wrapper: nn.Module, example: Tensor, data: bytes) -> None:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAMES[0]: example.numpy()})
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(example)]
    if got[0].shape != expected[0].shape:
        raise OnnxExportError(f"verification failed: onnxruntime gives {got[0].shape[0]} detections on the traced "
                              f"input, PyTorch {expected[0].shape[0]}")
    if len(expected[0]) and (np.abs(got[0] - expected[0]).max() > 0.5 or np.abs(got[1] - expected[1]).max() > 1e-3
                             or (got[2] != expected[2]).any()):
        raise OnnxExportError("verification failed: onnxruntime's detections on the traced input differ from "
                              "PyTorch's (boxes > 0.5 px, scores > 1e-3 or labels)")


def _json_default(value):
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


def _atomic_write(path: Path, data: bytes) -> None:
    """`detkit.io.atomic_write`: a full disk or an unwritable folder is a one-line WriteError
    naming `path`, and no partial file is left."""
    atomic_write(path, lambda handle: handle.write(data))


def read_metadata(model_proto_or_path) -> dict[str, Any]:
    """The "detkit" metadata JSON of an exported file ({} when absent)."""
    import onnx

    proto = model_proto_or_path
    if isinstance(proto, (str, os.PathLike)):
        proto = onnx.load(os.fspath(proto), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}
