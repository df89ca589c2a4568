"""Render ablation reports from finished run folders: our numbers beside the papers'.

    python tools/report.py runs=[outputs/ablations/synthetic]                   # every table with runs there
    python tools/report.py runs=[RUN_DIR,RUN_DIR] table=dcnv1_table1            # one table (or table=[a,b])
    python tools/report.py runs=[outputs/ablations/synthetic] out=docs/reports  # NAME.md + NAME.png per table

The tool is detkit.study.cli.report (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-report`.
"""
import sys

from detkit.study.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
