"""Effective dilation of a checkpoint's deformable convs by object size (DCNv1 Table 2).

    python tools/analyze_offsets.py checkpoint=PATH                       # its dataset's val split
    python tools/analyze_offsets.py checkpoint=PATH data=coco data.root=/data/coco max_images=500
    python tools/analyze_offsets.py checkpoint=PATH images=FOLDER annotations=instances.json

The tool is detkit.study.cli.analyze_offsets (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-analyze-offsets`.
"""
import sys

from detkit.study.cli.analyze_offsets import main

if __name__ == "__main__":
    sys.exit(main())
