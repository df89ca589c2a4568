"""Write the ResNet backbone of a detkit checkpoint in torchvision's format.

    python tools/export_backbone.py CHECKPOINT.pth BACKBONE.pth
    python tools/train.py ... model.backbone.weights=BACKBONE.pth

The output loads wherever an ImageNet torchvision ResNet checkpoint does: a detector
trained here (e.g. experiment=pretrain/backbone_synthetic) initialises the backbone of
another, deformable blocks included (their offset branches start at zero).
Exit status: 0 done; 2 a missing or unreadable checkpoint (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detkit.cli import one_line_errors  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/export_backbone.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a detkit checkpoint (run folder/checkpoints/last.pth)")
    parser.add_argument("output", type=Path, help="where to write the backbone state dict")
    args = parser.parse_args(argv)
    from detkit.engine.checkpoint import export_backbone

    count = export_backbone(args.checkpoint, args.output)
    print(f"wrote {args.output} ({count} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)(sys.argv[1:]))
