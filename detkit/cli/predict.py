"""Detect objects in an image or a folder of images with a detkit checkpoint.

    python tools/predict.py checkpoint=PATH input=IMAGE_OR_FOLDER output=preds.json

(or `detkit-predict ...`, `python -m detkit.cli.predict ...`). Writes a JSON list of
{"file_name", "category_id", "bbox": [x, y, w, h], "score"} with boxes in the image's
pixels. A Hydra app: key=value arguments (configs/predict.yaml), `hydra.run.dir=DIR` for its
run folder (default outputs/predict/<time>, log predict.log).
Exit status: 0 written; 2 (one line on stderr) for a bad checkpoint, input or argument.
"""
from __future__ import annotations

from pathlib import Path

from detkit.cli import run_app
from detkit.engine.checkpoint import load_model
from detkit.utils.comm import resolve_device
from detkit.evaluation.inference import list_images, predict_files
from detkit.io import write_predictions


def job(cfg) -> None:
    files = list_images(cfg.input)
    device = resolve_device(cfg.device)
    model, checkpoint = load_model(cfg.checkpoint, device)
    root = Path(cfg.input) if Path(cfg.input).is_dir() else None
    count = write_predictions(cfg.output, predict_files(model, files, checkpoint["label_to_category_id"],
                                                        device, cfg.batch_size, root))
    print(f"{count} detections in {len(files)} images -> {cfg.output}")


def main() -> None:
    run_app(job, "predict")


if __name__ == "__main__":
    main()
