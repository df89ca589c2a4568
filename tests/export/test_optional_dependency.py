"""detkit imports and runs without the export extra (onnx, onnxscript, onnxruntime)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CODE = """
import sys
for name in ("onnx", "onnxscript", "onnxruntime"):
    sys.modules[name] = None          # any import of them now raises ImportError
import detkit, detkit.ops, detkit.ops.onnx, detkit.modeling.build, detkit.evaluation.inference, detkit.export
import detkit.modeling.heads.roi_align_gather
try:
    detkit.export.OnnxDetector("missing.onnx")
except RuntimeError as exc:
    assert "pip install -e" in str(exc), exc
else:
    raise AssertionError("OnnxDetector ran without onnxruntime")
print("ok")
"""


def test_detkit_imports_without_the_export_extra():
    result = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
