"""Detect objects in an image or a folder of images with a detkit checkpoint.

    python tools/predict.py checkpoint=PATH input=IMAGE_OR_FOLDER output=preds.json

The tool is detkit.cli.predict (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-predict`.
"""
import sys

from detkit.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
