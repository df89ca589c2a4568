"""Train a detector (and evaluate it) as configured by configs/train.yaml.

    python tools/train.py                                  # the default: synthetic shapes, R18 CPU model
    python tools/train.py experiment=smoke                 # a tiny run checking the install
    python tools/train.py model=faster_rcnn_r50_fpn data=coco data.root=/data/coco schedule=coco_1x
    python tools/train.py hydra.run.dir=DIR resume=true    # continue an interrupted run
    torchrun --nproc_per_node=8 tools/train.py ... hydra.run.dir=DIR

The tool is detkit.cli.train (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-train`.
"""
import sys

from detkit.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
