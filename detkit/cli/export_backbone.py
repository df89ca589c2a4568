"""Write the ResNet backbone of a detkit checkpoint in torchvision's format.

    python tools/export_backbone.py checkpoint=CHECKPOINT.pth output=BACKBONE.pth
    python tools/train.py ... model.backbone.weights=BACKBONE.pth

(or `detkit-export-backbone ...`, `python -m detkit.cli.export_backbone ...`). A Hydra app
(configs/export_backbone.yaml) that writes no run folder. The output loads wherever an
ImageNet torchvision ResNet checkpoint does: a detector trained here (e.g.
experiment=pretrain/backbone_synthetic) initialises the backbone of another, deformable
blocks included (their offset branches start at zero).
Exit status: 0 done; 2 a missing or unreadable checkpoint, or a bad argument (one line on stderr).
"""
from __future__ import annotations

from pathlib import Path

from detkit.cli import run_app


def job(cfg) -> None:
    from detkit.engine.checkpoint import export_backbone

    output = Path(str(cfg.output))
    count = export_backbone(Path(str(cfg.checkpoint)), output)
    print(f"wrote {output} ({count} tensors)")


def main() -> None:
    run_app(job, "export_backbone")


if __name__ == "__main__":
    main()
