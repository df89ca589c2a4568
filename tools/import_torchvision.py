"""Turn torchvision's fasterrcnn_resnet50_fpn weights into a detkit checkpoint.

    python tools/import_torchvision.py src=SRC.pth dst=DST.pth

The tool is detkit.cli.import_torchvision (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-import-torchvision`.
"""
import sys

from detkit.cli.import_torchvision import main

if __name__ == "__main__":
    sys.exit(main())
