"""Export a trained detkit detector to one standard ONNX file (runs in stock onnxruntime).

    python tools/export_onnx.py checkpoint=PATH output=model.onnx [opset=19] [dynamic_batch=true]
    python tools/predict_onnx.py onnx=model.onnx input=IMAGE_OR_FOLDER output=preds.json

(or `detkit-export-onnx ...`, `python -m detkit.cli.export_onnx ...`). The file holds the whole
detector in default-domain ONNX operators: deformable convs as DeformConv, deformable RoI
pooling as RoiAlign over shifted bins, NMS as NonMaxSuppression (docs/deploy.md). Its input
is "images" [B, 3, H, W] float32 RGB in [0, 1], images of one size (B, H, W dynamic); its
outputs "boxes" [D, 4] (x1, y1, x2, y2 in the input's pixels), "scores", "labels", "image_index". The checkpoint's label_to_category_id and
class_names go into the file's metadata. Needs the export extra: pip install -e ".[export]".
Exit status: 0 written; 2 (one line on stderr, nothing written) for a bad checkpoint or
argument, or a model part that cannot be exported.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from detkit.cli import run_app


def job(cfg: DictConfig) -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"the ONNX export needs the export extra ({exc.name} is missing): "
                         "pip install -e \".[export]\"") from None
    import torch

    from detkit.engine.checkpoint import load_model
    from detkit.export import export_onnx

    input_size = None
    if cfg.input_size is not None:
        size = list(cfg.input_size) if not isinstance(cfg.input_size, int) else [cfg.input_size] * 2
        if len(size) != 2:
            raise ValueError(f"input_size must be [height, width], got {size}")
        input_size = (int(size[0]), int(size[1]))
    model, checkpoint = load_model(cfg.checkpoint, torch.device("cpu"))
    metadata = {key: checkpoint[key] for key in ("label_to_category_id", "class_names") if key in checkpoint}
    metadata["checkpoint"] = str(cfg.checkpoint)
    result = export_onnx(model, cfg.output, opset=int(cfg.opset), batch_size=int(cfg.batch_size),
                         input_size=input_size, dynamic_size=bool(cfg.dynamic_size),
                         dynamic_batch=bool(cfg.dynamic_batch), metadata=metadata, verify=bool(cfg.verify))
    for note in result.warnings:
        print(f"note: {note}", file=sys.stderr)
    size = "H x W dynamic" if result.dynamic_size else f"{result.input_size[0]} x {result.input_size[1]}"
    batch = "dynamic" if result.dynamic_batch else str(result.batch_size)
    print(f"wrote {result.path} (opset {result.opset}, batch {batch}, {size}; "
          f"{len(result.op_types)} standard op types: {', '.join(result.op_types)})")


def main() -> None:
    run_app(job, "export_onnx")


if __name__ == "__main__":
    main()
