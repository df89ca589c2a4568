"""COCO box evaluation of a detkit checkpoint.

    python tools/eval.py checkpoint=outputs/train/<run>/checkpoints/last.pth
    python tools/eval.py checkpoint=PATH data=coco data.root=/data/coco

The tool is detkit.cli.eval (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-eval`.
"""
import sys

from detkit.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
