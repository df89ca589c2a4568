"""COCO box evaluation of a checkpoint with its deformable RoI pooling changed at inference.

    python tools/probe_roi_pool.py checkpoint=PATH roi_pool_probe=mask_roi_mean

The tool is detkit.study.cli.probe_roi_pool (its documentation, options and exit statuses are
there); installed, it is also the console script `detkit-probe-roi-pool`.
"""
import sys

from detkit.study.cli.probe_roi_pool import main

if __name__ == "__main__":
    sys.exit(main())
