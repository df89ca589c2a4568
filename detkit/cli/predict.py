"""Detect objects in an image or a folder of images with a detkit checkpoint.

    python tools/predict.py checkpoint=PATH input=IMAGE_OR_FOLDER output=preds.json

(or `detkit-predict ...`, `python -m detkit.cli.predict ...`). Writes a JSON list of
{"file_name", "category_id", "bbox": [x, y, w, h], "score"} with boxes in the image's
pixels. An unreadable image stops the tool (exit status 2, the file named) unless
`skip_unreadable=true`: then it is skipped with a warning, and the skipped images are listed at
the end (on stderr). A Hydra app: key=value arguments (configs/predict.yaml), `hydra.run.dir=DIR` for its
run folder (default outputs/predict/<time>, log predict.log).
Exit status: 0 written; 2 (one line on stderr) for a bad checkpoint, input or argument.
"""
from __future__ import annotations

import sys
from pathlib import Path

from detkit.cli import run_app
from detkit.engine.checkpoint import load_model
from detkit.utils.comm import resolve_device
from detkit.evaluation.inference import list_images, predict_files, skipped_summary
from detkit.io import write_predictions


def job(cfg) -> None:
    files = list_images(cfg.input)
    device = resolve_device(cfg.device)
    model, checkpoint = load_model(cfg.checkpoint, device)
    root = Path(cfg.input) if Path(cfg.input).is_dir() else None
    skipped: list[Path] | None = [] if cfg.skip_unreadable else None
    count = write_predictions(cfg.output, predict_files(model, files, checkpoint["label_to_category_id"],
                                                        device, cfg.batch_size, root, skipped))
    report(count, files, skipped, root, cfg.output)


def report(count: int, files: list[Path], skipped: list[Path] | None, root: Path | None, output) -> None:
    """The tool's last lines: what was written, and the images skipped (skip_unreadable=true)."""
    done = len(files) - len(skipped or [])
    print(f"{count} detections in {done} images -> {output}")
    if skipped:
        print(skipped_summary(skipped, root), file=sys.stderr)


def main() -> None:
    run_app(job, "predict")


if __name__ == "__main__":
    main()
