"""Loading the compiled extension: a clear error from require_ops() when it is unusable (the ops
then run on the pure-PyTorch path, tests/ops/test_pure_ops.py), and no GPU needed to import."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

import detkit
import detkit.ops
from detkit.ops import _extension
from tests.helpers import generator, normal

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_COMMAND = "pip install --no-build-isolation -e ."


def _run_python(code: str, **env_changes: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_build_hint_names_the_build_command():
    assert BUILD_COMMAND in _extension.BUILD_HINT


def test_require_ops_raises_the_load_error(monkeypatch):
    message = "detkit's compiled ops are broken in this test. " + _extension.BUILD_HINT
    monkeypatch.setattr(_extension, "_load_error", message)
    with pytest.raises(RuntimeError, match=re.escape(message)) as info:
        detkit.ops.require_ops()
    assert str(info.value) == message


def test_ops_fall_back_without_the_extension(monkeypatch):
    """An unusable extension: require_ops() raises its reason, and the ops run on the pure path."""
    from detkit.ops import _dispatch

    monkeypatch.setattr(_extension, "_load_error", "unusable for this test; " + _extension.BUILD_HINT)
    monkeypatch.setattr(_extension, "LOADED", False)
    monkeypatch.setattr(_dispatch, "_has_kernel", {})
    monkeypatch.setattr(_dispatch, "_warned", False)
    gen = generator(1)
    x = normal((1, 2, 4, 4), gen)
    with pytest.raises(RuntimeError, match="unusable for this test"):
        detkit.ops.require_ops()
    with _dispatch.set_mode("auto"), pytest.warns(detkit.ops.PureOpsWarning, match="unusable for this test"):
        detkit.ops.deform_conv2d(x, normal((1, 18, 2, 2), gen), normal((2, 2, 3, 3), gen))
    detkit.ops.deform_roi_pool(x, torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64))
    detkit.ops.DeformConv2d(2, 2, 3).double()(x)


def test_require_ops_passes_when_loaded():
    assert _extension.LOADED
    detkit.ops.require_ops()  # must not raise


def test_messages_built_by_the_loader_explain_how_to_build():
    """Simulate a missing extension and a stale one in a fresh interpreter; the errors the
    loader builds name the problem and the build command."""
    result = _run_python(
        """
        import importlib, sys, types
        import torch

        sys.modules["detkit._C"] = None  # makes `from detkit import _C` raise ImportError
        from detkit.ops import _extension
        assert not _extension.LOADED
        print("MISSING:", _extension._load_error)
        import detkit.ops
        detkit.ops.deform_conv2d(torch.ones(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 1, 1, 1))
        try:
            detkit.ops.require_ops()
        except RuntimeError as exc:
            print("RAISED:", exc)

        sys.modules["detkit._C"] = types.SimpleNamespace(torch_version="0.0.1+stale", with_cuda=0)
        importlib.reload(_extension)
        assert not _extension.LOADED
        print("STALE:", _extension._load_error)
        """)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    missing = out[out.index("MISSING:"):out.index("RAISED:")]
    raised = out[out.index("RAISED:"):out.index("STALE:")]
    stale = out[out.index("STALE:"):]
    assert "could not be loaded" in missing and BUILD_COMMAND in missing
    assert torch.__version__ in missing
    assert BUILD_COMMAND in raised
    assert "0.0.1+stale" in stale and torch.__version__ in stale and BUILD_COMMAND in stale


def test_import_without_gpu():
    result = _run_python(
        """
        import torch
        import detkit, detkit.ops
        assert not torch.cuda.is_available()
        x = torch.ones(1, 1, 3, 3)
        y = detkit.ops.deform_conv2d(x, torch.full((1, 2, 3, 3), 0.25), torch.ones(1, 1, 1, 1))
        print("OK", detkit.__version__, detkit.ops.cuda_kernels_built(), float(y.sum()))
        """,
        CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")
    _, version, cuda_built, total = result.stdout.split()
    assert version == detkit.__version__
    assert cuda_built == str(detkit.ops.cuda_kernels_built())
    x = torch.ones(1, 1, 3, 3)
    expected = torchvision.ops.deform_conv2d(x, torch.full((1, 2, 3, 3), 0.25), torch.ones(1, 1, 1, 1))
    assert float(total) == pytest.approx(float(expected.sum()), rel=1e-6)
    assert float(total) < x.numel()  # the shifted samples lose what falls outside the image
