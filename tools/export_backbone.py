"""Write the ResNet backbone of a detkit checkpoint in torchvision's format.

    python tools/export_backbone.py checkpoint=CHECKPOINT.pth output=BACKBONE.pth
    python tools/train.py ... model.backbone.weights=BACKBONE.pth

The tool is detkit.cli.export_backbone (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-export-backbone`.
"""
import sys

from detkit.cli.export_backbone import main

if __name__ == "__main__":
    sys.exit(main())
