"""Effective dilation (DCNv1 Table 2) and its split by object size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detkit.modeling.backbone import deformable_layers
from detkit.study.offset_stats import (CATEGORIES, OffsetStatistics, activation_categories, effective_dilation,
                                      table2_markdown)
from detkit.vis import ImageGeometry, capture
from tests.vis.builders import build_tiny, identity_geometry, single_scale_config, smooth_image, synthetic_layer

KERNEL_TAPS = 9
TAP_I, TAP_J = np.divmod(np.arange(KERNEL_TAPS), 3)
COCO_SMALL, COCO_LARGE = 32 ** 2, 96 ** 2  # COCO's area ranges


def outward(delta: float) -> np.ndarray:
    """[9, 2] (dy, dx): tap (i, j) moved by delta * (i - 1, j - 1), away from the centre."""
    return np.stack([delta * (TAP_I - 1), delta * (TAP_J - 1)], axis=1).astype(np.float64)


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_zero_offsets_give_the_dilation(dilation):
    layer = synthetic_layer("l", (12, 14), 8, identity_geometry(96, 112), dilation=dilation)
    values = effective_dilation(layer)
    assert values.shape == (1, *layer.output_size)
    assert np.all(values == dilation)


@pytest.mark.parametrize("delta", [0.5, -0.25, 1.5])
def test_outward_offsets_add_to_the_dilation(delta):
    dilation = 2
    layer = synthetic_layer("l", (12, 14), 8, identity_geometry(96, 112), dilation=dilation,
                            offset=outward(delta)[:, :, None, None])
    np.testing.assert_allclose(effective_dilation(layer), dilation + delta, atol=1e-12)


def test_a_single_moved_tap_by_hand():
    # Only the centre tap moves right by 0.5: its horizontal pairs become 1.5 and 0.5 long
    # (mean unchanged), its two vertical pairs sqrt(1 + 0.25) each.
    offset = np.zeros((KERNEL_TAPS, 2, 1, 1))
    offset[4, 1] = 0.5
    layer = synthetic_layer("l", (6, 6), 8, identity_geometry(48, 48), offset=offset)
    pairs = [1.0] * 4 + [1.5, 0.5] + [1.0] * 4 + [np.sqrt(1.25)] * 2
    np.testing.assert_allclose(effective_dilation(layer), np.mean(pairs))


def test_model_with_injected_outward_offsets():
    model = build_tiny(**single_scale_config(dilate_res5=True, deform_kind="dcnv2"))
    layers = dict(deformable_layers(model))
    target = list(layers)[1]
    delta = 0.5
    with torch.no_grad():
        branch = layers[target].offset_branch
        branch.weight.zero_()
        branch.bias.zero_()
        branch.bias[:2 * KERNEL_TAPS] = torch.as_tensor(outward(delta).reshape(-1), dtype=torch.float32)
    result = capture(model, smooth_image(80, 100))
    stats = OffsetStatistics()
    stats.update(result.layers, np.zeros((0, 4)))
    table = stats.result()
    assert [entry["name"] for entry in table["layers"]] == list(layers)
    for entry in table["layers"]:
        expected = entry["dilation"][0] + (delta if entry["name"] == target else 0.0)
        background = entry["effective_dilation"]["background"]
        assert background["count"] > 0
        assert background["mean"] == pytest.approx(expected, abs=1e-6)
        assert background["std"] == pytest.approx(0.0, abs=1e-6)
        assert all(entry["effective_dilation"][c]["count"] == 0 for c in ("small", "medium", "large"))
        assert entry["mean_mask"]["background"] == pytest.approx(0.5, abs=1e-6)  # sigmoid(0)
    assert "res5b" in stats.table() and "2.50 ± 0.00" in stats.table()


def centres_in_box(stride: int, count: int, lo: float, hi: float) -> list[int]:
    """Grid indices u whose centre u * stride + 0.5 (box frame) lies in [lo, hi]."""
    return [u for u in range(count) if lo <= u * stride + 0.5 <= hi]


@pytest.mark.parametrize("side", [20.2, 60.3, 130.7])
def test_size_split_with_one_box(side):
    stride, grid = 4, 48
    size = grid * stride
    geometry = identity_geometry(size, size)
    box = np.array([30.1, 22.7, 30.1 + side, 22.7 + side])
    area = side * side
    category = "small" if area < COCO_SMALL else "medium" if area < COCO_LARGE else "large"
    rows = centres_in_box(stride, grid, box[1], box[3])
    cols = centres_in_box(stride, grid, box[0], box[2])
    # Outward offsets (delta) only for activations on the box.
    delta, dilation = 0.75, 1
    offset = np.zeros((KERNEL_TAPS, 2, grid, grid))
    offset[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = outward(delta)[:, :, None, None]
    layer = synthetic_layer("backbone.layer4.0.conv2", (grid, grid), stride, geometry, dilation=dilation,
                            offset=offset)
    stats = OffsetStatistics()
    stats.update([layer], box[None])
    result = stats.result()["layers"][0]["effective_dilation"]
    inside = len(rows) * len(cols)
    assert result[category]["count"] == inside
    assert result[category]["mean"] == pytest.approx(dilation + delta)
    assert result["background"]["count"] == grid * grid - inside
    assert result["background"]["mean"] == pytest.approx(dilation)
    for other in set(CATEGORIES) - {category, "background"}:
        assert result[other]["count"] == 0 and result[other]["mean"] is None
    assert result["all"]["count"] == grid * grid


def test_smallest_box_wins_and_padding_is_ignored():
    stride, grid = 4, 40
    # Network 150x160 padded to 160x160: rows whose centre is past the image are padding.
    geometry = ImageGeometry((150, 160), (150, 160), (160, 160))
    layer = synthetic_layer("l", (grid, grid), stride, geometry)
    large = np.array([0.0, 0.0, 120.0, 120.0])
    small = np.array([40.0, 40.0, 60.0, 60.0])
    categories = activation_categories(layer, np.stack([small, large]))
    for r in range(grid):
        for c in range(grid):
            y, x = r * stride + 0.5, c * stride + 0.5
            if y >= geometry.original_size[0]:
                expected = -1
            elif small[0] <= x <= small[2] and small[1] <= y <= small[3]:
                expected = CATEGORIES.index("small")
            elif large[0] <= x <= large[2] and large[1] <= y <= large[3]:
                expected = CATEGORIES.index("large")
            else:
                expected = CATEGORIES.index("background")
            assert categories[r, c] == expected, (r, c)


def test_statistics_accumulate_over_images():
    geometry = identity_geometry(64, 64)
    gen = np.random.default_rng(0)
    stats, values = OffsetStatistics(), []
    for _ in range(3):
        offset = gen.normal(scale=0.5, size=(KERNEL_TAPS, 2, 16, 16))
        mask = gen.uniform(size=(KERNEL_TAPS, 16, 16))
        layer = synthetic_layer("l", (16, 16), 4, geometry, offset=offset, mask=mask)
        stats.update([layer], np.zeros((0, 4)))
        values.append(effective_dilation(layer).reshape(-1))
    result = stats.result()
    entry = result["layers"][0]
    everything = np.concatenate(values)
    assert result["num_images"] == 3
    assert entry["effective_dilation"]["background"]["count"] == everything.size
    assert entry["effective_dilation"]["background"]["mean"] == pytest.approx(everything.mean())
    assert entry["effective_dilation"]["background"]["std"] == pytest.approx(everything.std())
    assert entry["modulated"] and 0 < entry["mean_mask"]["background"] < 1


def test_stage_statistics_pool_the_layers_of_a_stage():
    """DCNv2's conv3-5 models are read per stage: a stage's numbers pool every activation of
    its deformable layers (so they equal the statistics of the concatenated values), and the
    table gets a per-stage block when there are several stages."""
    geometry = identity_geometry(64, 64)
    gen = np.random.default_rng(1)
    layers, by_stage = [], {"res4": [], "res5": []}
    for name, stage, dilation in (("backbone.layer3.0.conv2", "res4", 1), ("backbone.layer3.1.conv2", "res4", 1),
                                  ("backbone.layer4.0.conv2", "res5", 2)):
        offset = gen.normal(scale=0.3, size=(KERNEL_TAPS, 2, 16, 16))
        layer = synthetic_layer(name, (16, 16), 4, geometry, dilation=dilation, offset=offset, stage=stage)
        layers.append(layer)
        by_stage[stage].append(effective_dilation(layer).reshape(-1))
    stats = OffsetStatistics()
    stats.update(layers, np.zeros((0, 4)))
    stages = {s["stage"]: s for s in stats.result()["stages"]}
    assert list(stages) == ["res4", "res5"]
    assert stages["res4"]["layers"] == ["res4a", "res4b"] and stages["res5"]["layers"] == ["res5a"]
    for stage, values in by_stage.items():
        pooled = np.concatenate(values)
        background = stages[stage]["effective_dilation"]["background"]
        assert background["count"] == pooled.size
        assert background["mean"] == pytest.approx(pooled.mean()) and background["std"] == pytest.approx(pooled.std())
    assert stages["res5"]["effective_dilation"]["background"]["mean"] > 1.5     # dilation 2 stays about 2
    table = stats.table()
    assert "res4a,res4b" in table and table.count("stage") == 1
    markdown = table2_markdown(stats.result())
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| layer | nominal dilation | small | medium | large | background |")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| res4a", "| res4b", "| res5a", "| **res4** (res4a, res4b)",
                                                     "| **res5** (res5a)"]
    res5 = stages["res5"]["effective_dilation"]["background"]
    assert f"{res5['mean']:.2f} ± {res5['std']:.2f}" in rows[-1]
