"""Draw the DCNv1 paper's Figures 5 and 7 from a checkpoint and one image of a COCO-format dataset.

    python tools/paper_figures.py checkpoint=PATH                          # its dataset's val split
    python tools/paper_figures.py checkpoint=PATH data=synthetic_geometry image_index=12
    python tools/paper_figures.py checkpoint=PATH images=FOLDER annotations=instances.json

The tool is detkit.study.cli.paper_figures (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-paper-figures`.
"""
import sys

from detkit.study.cli.paper_figures import main

if __name__ == "__main__":
    sys.exit(main())
