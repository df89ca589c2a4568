"""Detect objects with a detector exported by tools/export_onnx.py, in onnxruntime.

    python tools/predict_onnx.py onnx=model.onnx input=IMAGE_OR_FOLDER output=preds.json

(or `detkit-predict-onnx ...`, `python -m detkit.cli.predict_onnx ...`). Writes the JSON of
tools/predict.py (a list of {"file_name", "category_id", "bbox": [x, y, w, h], "score"},
boxes in the image's pixels), category ids from the file's metadata. Needs onnxruntime
(pip install -e ".[export]"), not the checkpoint. `skip_unreadable=true` skips unreadable
images as tools/predict.py does.
Exit status: 0 written; 2 (one line on stderr) for a bad file, input or argument.
"""
from __future__ import annotations

import sys
from pathlib import Path

from detkit.cli import run_app


def job(cfg) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ValueError("tools/predict_onnx.py needs onnxruntime: pip install -e \".[export]\"") from None
    from detkit.export.runtime import OnnxDetector, load_label_map
    from detkit.evaluation.inference import list_images, predict_files, skipped_summary
    from detkit.io import write_predictions

    files = list_images(cfg.input)
    detector = OnnxDetector(cfg.onnx, intra_op_threads=cfg.threads)
    root = Path(cfg.input) if Path(cfg.input).is_dir() else None
    skipped: list[Path] | None = [] if cfg.skip_unreadable else None
    detections = predict_files(detector, files, load_label_map(detector), "cpu", detector.batch_size, root,
                               skipped)
    count = write_predictions(cfg.output, detections)
    print(f"{count} detections in {len(files) - len(skipped or [])} images -> {cfg.output}")
    if skipped:
        print(skipped_summary(skipped, root), file=sys.stderr)


def main() -> None:
    run_app(job, "predict_onnx")


if __name__ == "__main__":
    main()
