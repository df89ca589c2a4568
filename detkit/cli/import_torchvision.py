"""Turn torchvision's fasterrcnn_resnet50_fpn weights into a detkit checkpoint.

    python tools/import_torchvision.py src=SRC.pth dst=DST.pth

(or `detkit-import-torchvision ...`, `python -m detkit.cli.import_torchvision ...`). A Hydra
app (configs/import_torchvision.yaml) that writes no run folder. SRC is a state dict of
`torchvision.models.detection.fasterrcnn_resnet50_fpn` (e.g. the COCO_V1 weights file, 37.0
box AP). DST holds the same weights under detkit's names plus the model config that rebuilds
the same detector (configs/model/faster_rcnn_r50_fpn.yaml: RGB in [0, 1], ImageNet
mean/std, shorter side 800, longer side at most 1333, the same post-processing) and
torchvision's 91-entry COCO label space (label == COCO category id).
`tools/predict.py checkpoint=DST.pth ...` then gives torchvision's detections.
Exit status: 0 written; 2 a missing file, weights that do not fit, or a bad argument (one
line on stderr).
"""
from __future__ import annotations

from pathlib import Path

from detkit.cli import run_app
from detkit.config.compose import CONFIG_DIR

# torchvision module prefix -> detkit module prefix; every other key keeps its name.
RENAMES = (("backbone.body.", "backbone."), ("backbone.fpn.", "neck.fpn."))
NUM_CLASSES = 91


def detkit_key(torchvision_key: str) -> str:
    for old, new in RENAMES:
        if torchvision_key.startswith(old):
            return new + torchvision_key[len(old):]
    return torchvision_key


def coco_class_names() -> dict[int, str]:
    """torchvision's COCO category names by label (shipped with torchvision, no download)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return {label: name for label, name in enumerate(names) if label > 0}


def convert(src: Path, dst: Path) -> None:
    """Write the detkit checkpoint `dst` of the torchvision state dict `src`."""
    import torch
    from omegaconf import OmegaConf

    from detkit.config.build import build_model
    from detkit.engine.checkpoint import load_state_dict_strict, save_checkpoint

    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    state = torch.load(src, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{src} does not hold a state dict of tensors")
    model_config = OmegaConf.load(CONFIG_DIR / "model" / "faster_rcnn_r50_fpn.yaml")
    model_config.num_classes = NUM_CLASSES
    model_config = OmegaConf.to_container(model_config, resolve=True)
    model = build_model(model_config)
    # BatchNorm step counters (present when the source model had trainable BN) mean nothing
    # to the frozen BN the imported model uses.
    weights = {detkit_key(k): v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    load_state_dict_strict(model, weights, str(src))
    save_checkpoint(dst, {
        "model": model.state_dict(),
        "model_config": model_config,
        "label_to_category_id": {label: label for label in range(1, NUM_CLASSES)},
        "class_names": coco_class_names(),
        "source": f"torchvision fasterrcnn_resnet50_fpn weights from {src.name}",
    })
    print(f"wrote {dst}")


def job(cfg) -> None:
    convert(Path(str(cfg.src)), Path(str(cfg.dst)))


def main() -> None:
    run_app(job, "import_torchvision")


if __name__ == "__main__":
    main()
