"""Fixtures of the detkit.vis tests (builders live in tests/vis/builders.py)."""
import pytest

from tests.vis.builders import build_tiny, randomise_offset_branches


@pytest.fixture
def tiny_model():
    """The tiny R18-FPN DCNv2 detector (mdeform pooling) with small random offset branches."""
    model = build_tiny()
    randomise_offset_branches(model, std=0.02, seed=1)
    return model
