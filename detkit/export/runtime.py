"""Run an exported detector file in onnxruntime with the interface of a detkit model.

`OnnxDetector(path)` is called like `FasterRCNN.eval()`: a list of [3, H, W] float RGB
tensors in [0, 1] -> one {"boxes", "scores", "labels"} dict per image, so
`detkit.evaluation.inference.predict_files` (the JSON of tools/predict.py) runs it unchanged.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detkit.export.onnx_export import INPUT_NAMES, METADATA_KEY, OUTPUT_NAMES


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("running exported models needs onnxruntime: pip install -e \".[export]\"") from exc
    return onnxruntime


class OnnxDetector:
    """An exported detkit detector in an onnxruntime InferenceSession (CPU by default).

    Attributes: metadata (the export's "detkit" JSON: opset, batch_size, dynamic_batch,
    label_to_category_id ...), batch_size (the traced batch; images per run when not
    dynamic_batch), session.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None) -> None:
        ort = _require_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
            raise ValueError(f"{path} is not a detkit export (inputs {inputs}, outputs {outputs}; expected "
                             f"{INPUT_NAMES} -> {OUTPUT_NAMES})")
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata: dict[str, Any] = json.loads(stored) if stored else {}
        self.batch_size = int(self.metadata.get("batch_size", 1))

    @property
    def label_to_category_id(self) -> dict[int, int] | None:
        mapping = self.metadata.get("label_to_category_id")
        return None if mapping is None else {int(k): int(v) for k, v in mapping.items()}

    def eval(self) -> OnnxDetector:  # the interface of an nn.Module in eval mode
        return self

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """images [batch_size, 3, H, W] float32 -> (boxes, scores, labels, image_index) arrays."""
        return tuple(self.session.run(None, {INPUT_NAMES[0]: np.ascontiguousarray(images, dtype=np.float32)}))

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.metadata.get("dynamic_batch", False))

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """One {"boxes", "scores", "labels"} dict per image. With a dynamic batch, consecutive
        images of one size run together; a fixed-batch file takes exactly batch_size images
        of one size per run."""
        images = list(images)
        chunks: list[list[Tensor]] = []
        for img in images:
            if self.dynamic_batch:
                if chunks and tuple(chunks[-1][0].shape) == tuple(img.shape):
                    chunks[-1].append(img)
                else:
                    chunks.append([img])
            elif not chunks or len(chunks[-1]) == self.batch_size:
                chunks.append([img])
            else:
                chunks[-1].append(img)
        results: list[dict[str, Tensor]] = []
        for chunk in chunks:
            if not self.dynamic_batch and (len(chunk) != self.batch_size
                                           or len({tuple(img.shape) for img in chunk}) != 1):
                raise ValueError(f"this export runs exactly {self.batch_size} images of one size at a time "
                                 f"(batch_size={self.batch_size}, dynamic_batch=false at export)")
            batch = torch.stack([img.detach().float().cpu() for img in chunk]).numpy()
            boxes, scores, labels, index = self.run(batch)
            for i in range(len(chunk)):
                keep = index == i
                results.append({"boxes": torch.from_numpy(boxes[keep]), "scores": torch.from_numpy(scores[keep]),
                                "labels": torch.from_numpy(labels[keep].astype(np.int64))})
        return results


def load_label_map(detector: OnnxDetector, fallback: Mapping[int, int] | None = None) -> dict[int, int]:
    """label -> category id from the export's metadata (or `fallback`); the identity otherwise."""
    mapping = detector.label_to_category_id or (dict(fallback) if fallback else None)
    if mapping is None:
        num_classes = int(detector.metadata.get("num_classes", 0))
        if num_classes < 2:
            raise ValueError("the ONNX file has no label_to_category_id metadata and no class count")
        mapping = {label: label for label in range(1, num_classes)}
    return mapping
