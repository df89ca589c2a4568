"""Draw where a checkpoint's deformable layers sample on an image (DCNv1 Figures 5 and 7).

    python tools/visualize.py checkpoint=PATH input=IMAGE output=OUT.png
    python tools/visualize.py checkpoint=PATH input=IMAGE point=[120,80] stage=res5 num_layers=3

The tool is detkit.cli.visualize (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-visualize`.
"""
import sys

from detkit.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
