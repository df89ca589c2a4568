"""How much of a run's box AP, and of its difference to another run, is the validation set.

    python tools/eval_noise.py runs=[outputs/ablations/synthetic_geometry/fpn/baseline/seed0,outputs/ablations/synthetic_geometry/dcnv1/dpool/seed0]

The tool is detkit.study.cli.eval_noise (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-eval-noise`.
"""
import sys

from detkit.study.cli.eval_noise import main

if __name__ == "__main__":
    sys.exit(main())
