"""Detect objects with a detector exported by tools/export_onnx.py, in onnxruntime.

    python tools/predict_onnx.py onnx=model.onnx input=IMAGE_OR_FOLDER output=preds.json

The tool is detkit.cli.predict_onnx (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-predict-onnx`.
"""
import sys

from detkit.cli.predict_onnx import main

if __name__ == "__main__":
    sys.exit(main())
