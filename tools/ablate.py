"""Run a whole ablation table (every row x every seed) and write its report.

    python tools/ablate.py table=dcnv1_table1                     # synthetic data, seeds 0 1 2
    python tools/ablate.py table=all jobs=2                       # every table, 2 runs at a time
    python tools/ablate.py table=dcnv2_table1 data=coco seeds=[0] out=/runs/dcnv2 -- \
        data.root=/data/coco model.backbone.weights=/w/resnet50.pth   # the paper's schedule
    python tools/ablate.py table=fpn_mmdet -- schedule.max_iters=1     # overrides for every run

The tool is detkit.study.cli.ablate (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-ablate`.
"""
import sys

from detkit.study.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
