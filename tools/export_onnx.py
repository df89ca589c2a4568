"""Export a trained detkit detector to one standard ONNX file (runs in stock onnxruntime).

    python tools/export_onnx.py checkpoint=PATH output=model.onnx [opset=19] [dynamic_batch=true]
    python tools/predict_onnx.py onnx=model.onnx input=IMAGE_OR_FOLDER output=preds.json

The tool is detkit.cli.export_onnx (its documentation, options and exit statuses are there);
installed, it is also the console script `detkit-export-onnx`.
"""
import sys

from detkit.cli.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
