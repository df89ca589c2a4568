"""Detect objects in an image or a folder of images with a detkit checkpoint.

    python tools/predict.py checkpoint=PATH input=IMAGE_OR_FOLDER output=preds.json

Writes a JSON list of {"file_name", "category_id", "bbox": [x, y, w, h], "score"} with
boxes in the image's pixels. A Hydra app: key=value arguments (configs/predict.yaml),
`hydra.run.dir=DIR` for its run folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detkit.cli import CONFIG_DIR, one_line_errors  # noqa: E402
from detkit.engine.checkpoint import load_model  # noqa: E402
from detkit.engine.distributed import resolve_device  # noqa: E402
from detkit.inference import list_images, predict_files  # noqa: E402
from detkit.prediction_io import write_predictions  # noqa: E402


@hydra.main(config_path=str(CONFIG_DIR), config_name="predict", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    files = list_images(cfg.input)
    device = resolve_device(cfg.device)
    model, checkpoint = load_model(cfg.checkpoint, device)
    root = Path(cfg.input) if Path(cfg.input).is_dir() else None
    count = write_predictions(cfg.output, predict_files(model, files, checkpoint["label_to_category_id"],
                                                        device, cfg.batch_size, root))
    print(f"{count} detections in {len(files)} images -> {cfg.output}")


if __name__ == "__main__":
    main()
