"""Suite-wide fixtures and the no-silent-skip rule. Shared helper functions live in tests/helpers.py."""
import pytest
import torch

#: The only reasons a test may be skipped: no GPU here (or a torch built without CUDA). Any
#: other skip, an xfail or a skipped module (an `importorskip` of a missing test dependency)
#: makes the run fail, so that a green run means every other test ran.
ALLOWED_SKIP_REASONS = ("no CUDA device available", "needs a CUDA build of torch")

_refused_skips: list[str] = []


@pytest.fixture(autouse=True)
def _deterministic_defaults():
    """Every test starts from the same global seed (tests should still use their own generators)."""
    torch.manual_seed(0)
    yield


def _skip_reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _note_skip(report) -> None:
    if report.skipped:
        reason = _skip_reason(report)
        if reason not in ALLOWED_SKIP_REASONS:
            _refused_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def pytest_terminal_summary(terminalreporter):
    if _refused_skips:
        terminalreporter.section("skipped for a reason other than no GPU (the run fails)", red=True)
        for line in _refused_skips:
            terminalreporter.line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _refused_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
