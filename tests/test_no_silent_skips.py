"""tests/conftest.py fails the run when a test is skipped for any reason but "no GPU"."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    for name, source in files.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    # The suite's conftest as a plugin, on test files of their own.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_no_gpu_skip_keeps_the_run_green(tmp_path):
    result = _pytest(tmp_path, {"test_gpu.py": """
        import pytest
        def test_runs():
            pass
        @pytest.mark.skipif(True, reason="no CUDA device available")
        def test_needs_a_gpu():
            pass
        @pytest.mark.skipif(True, reason="needs a CUDA build of torch")
        def test_needs_cuda_torch():
            pass
    """})
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped" in result.stdout


def test_any_other_skip_fails_the_run(tmp_path):
    result = _pytest(tmp_path, {
        "test_skipif.py": """
            import pytest
            @pytest.mark.skipif(True, reason="optional thing missing")
            def test_skipped():
                pass
            def test_runs():
                pass
        """,
        "test_importorskip.py": """
            import pytest
            pytest.importorskip("a_module_that_is_not_installed")
            def test_never_collected():
                pass
        """,
        "test_xfail.py": """
            import pytest
            @pytest.mark.xfail(reason="known bug")
            def test_fails():
                assert False
        """,
        "test_skip_call.py": """
            import pytest
            def test_skips_itself():
                pytest.skip("not today")
        """,
    })
    assert result.returncode == 1, result.stdout
    assert "skipped for a reason other than no GPU (the run fails)" in result.stdout
    for reason in ("test_skipif.py::test_skipped: optional thing missing",
                   "test_importorskip.py: could not import 'a_module_that_is_not_installed'",
                   "test_xfail.py::test_fails: xfail: known bug",
                   "test_skip_call.py::test_skips_itself: not today"):
        assert reason in result.stdout, result.stdout


def test_only_importorskip_still_fails(tmp_path):
    """A run whose only module is skipped collects no test (exit status 5): still a failure."""
    result = _pytest(tmp_path, {"test_only.py": """
        import pytest
        pytest.importorskip("a_module_that_is_not_installed")
    """})
    assert result.returncode == 1, result.stdout
