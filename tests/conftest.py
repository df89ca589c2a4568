"""Suite-wide fixtures. Shared helper functions live in tests/helpers.py."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_defaults():
    """Every test starts from the same global seed (tests should still use their own generators)."""
    torch.manual_seed(0)
    yield
