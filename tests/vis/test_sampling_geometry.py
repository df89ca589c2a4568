"""follow_sampling_points on hand-built layers: the stacked geometry, offsets, resize.

The zero-offset expectations come from autograd through a plain conv stack of the same
geometry (all-ones 3x3 kernels; plain 1x1 convs where the stacking rule treats a layer
as point-wise): d output / d input counts how many paths reach every input position,
which is the receptive field with multiplicity, built without detkit.vis.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detkit.vis import ImageGeometry, follow_sampling_points, locate_unit, select_stage
from tests.vis.builders import conv_out, identity_geometry, synthetic_layer

KERNEL_TAPS = 9

# (bottom grid stride in network pixels, bottom grid size, layers): ("deform", stride, dilation)
# is a deformable 3x3 layer with padding = dilation; ("point", stride) a plain 1x1 conv.
STACKS = {
    "1 layer": (8, (20, 22), [("deform", 1, 1)]),
    "1 layer, stride 2": (8, (20, 22), [("deform", 2, 1)]),
    "2 layers, dilation 2 (dilated res5)": (16, (24, 26), [("deform", 1, 2), ("deform", 1, 2)]),
    "3 layers, dilation 2 (dilated res5)": (16, (28, 30), [("deform", 1, 2)] * 3),
    "3 layers, stride 2 first (res5)": (16, (24, 26), [("deform", 2, 1), ("deform", 1, 1), ("deform", 1, 1)]),
    "3 layers, 1x1/2 in between (BasicBlock)": (8, (28, 30), [("deform", 1, 1), ("point", 2), ("deform", 1, 1),
                                                                ("deform", 1, 1)]),
    "2 layers, stride 2 on top": (4, (20, 22), [("deform", 1, 1), ("deform", 2, 1)]),
}


def build_stack(bottom_stride: int, bottom_size: tuple[int, int], spec):
    """(LayerOffsets with zero offsets, in forward order; per layer its index in spec; top grid
    size and stride; image (= bottom network input) size)."""
    height, width = bottom_size[0] * bottom_stride, bottom_size[1] * bottom_stride
    geometry = identity_geometry(height, width)
    size, stride = bottom_size, bottom_stride
    layers, where = [], []
    for index, (kind, s, *rest) in enumerate(spec):
        if kind == "deform":
            d = rest[0]
            layers.append(synthetic_layer(f"layer{index}", size, stride, geometry, stride=s, dilation=d))
            where.append(index)
            size = (conv_out(size[0], s, d, d), conv_out(size[1], s, d, d))
        else:
            size = (conv_out(size[0], s, 0, 1, kernel=1), conv_out(size[1], s, 0, 1, kernel=1))
        stride *= s
    return layers, where, size, stride


def reference_counts(spec, input_size: tuple[int, int], unit: tuple[int, int]) -> torch.Tensor:
    """Paths from every input position to output `unit` of the plain conv stack `spec`."""
    x = torch.zeros(1, 1, *input_size, dtype=torch.float64, requires_grad=True)
    y = x
    for kind, s, *rest in spec:
        if kind == "deform":
            d = rest[0]
            y = F.conv2d(y, torch.ones(1, 1, 3, 3, dtype=torch.float64), stride=s, padding=d, dilation=d)
        else:
            y = F.conv2d(y, torch.ones(1, 1, 1, 1, dtype=torch.float64), stride=s)
    y[0, 0, unit[0], unit[1]].backward()
    return x.grad[0, 0]


def points_to_counts(points: np.ndarray, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Histogram of (x, y) image points on the grid of `stride` (they must fall on it)."""
    cols, rows = points[:, 0] / stride, points[:, 1] / stride
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-9)
    np.testing.assert_allclose(rows, np.round(rows), atol=1e-9)
    counts = torch.zeros(size, dtype=torch.float64)
    for (r, c), n in Counter(zip(np.round(rows).astype(int), np.round(cols).astype(int))).items():
        assert 0 <= r < size[0] and 0 <= c < size[1], "the test grid is too small for this stack"
        counts[r, c] = n
    return counts


@pytest.mark.parametrize("name", list(STACKS))
def test_zero_offsets_give_the_plain_receptive_field(name):
    bottom_stride, bottom_size, spec = STACKS[name]
    layers, where, top_size, top_stride = build_stack(bottom_stride, bottom_size, spec)
    unit = (top_size[0] // 2, top_size[1] // 2)
    levels = follow_sampling_points(layers, (unit[1] * top_stride, unit[0] * top_stride), num_layers=len(layers))
    assert [len(level) for level in levels] == [KERNEL_TAPS ** (n + 1) for n in range(len(layers))]
    # Level n holds the points on the input grid of the n-th deformable layer from the top.
    for level, layer, index in zip(levels, reversed(layers), reversed(where)):
        expected = reference_counts(spec[index:], layer.input_size, unit)
        got = points_to_counts(level, layer.input_stride[0], layer.input_size)
        assert torch.equal(got, expected), f"{name}: level of {layer.name} differs from the plain conv stack"


def test_three_dilated_layers_cover_the_7x7_grid():
    stride, dilation, layers_count = 16, 2, 3
    geometry = identity_geometry(40 * stride, 40 * stride)
    layers = [synthetic_layer(f"l{i}", (40, 40), stride, geometry, dilation=dilation) for i in range(layers_count)]
    unit = (17, 21)  # (row, col)
    levels = follow_sampling_points(layers, (unit[1] * stride, unit[0] * stride))
    reach = layers_count  # each 3x3 layer reaches one dilated step further
    steps = np.arange(-reach, reach + 1) * dilation * stride
    expected = {(unit[1] * stride + dx, unit[0] * stride + dy) for dx in steps for dy in steps}
    assert {tuple(p) for p in levels[-1].round(9).tolist()} == expected
    assert len(levels[-1]) == KERNEL_TAPS ** layers_count


def test_uses_the_last_num_layers_and_the_stage():
    geometry = identity_geometry(32 * 16, 32 * 16)
    layers = [synthetic_layer(f"backbone.layer3.{i}.conv2", (32, 32), 16, geometry, dilation=1, stage="res4")
              for i in range(2)]
    layers += [synthetic_layer(f"backbone.layer4.{i}.conv2", (32, 32), 16, geometry, dilation=2, stage="res5")
               for i in range(2)]
    unit_xy = (16 * 16, 16 * 16)
    everything = follow_sampling_points(layers, unit_xy, num_layers=2)
    res5 = follow_sampling_points(layers, unit_xy, num_layers=2, stage="res5")
    alone = follow_sampling_points(layers[2:], unit_xy, num_layers=2)
    for a, b, c in zip(everything, res5, alone):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    res4 = follow_sampling_points(layers, unit_xy, num_layers=2, stage="res4")
    spread = {"res4": np.ptp(res4[0][:, 0]), "res5": np.ptp(res5[0][:, 0])}
    assert spread["res5"] == 2 * spread["res4"]  # dilation 2 vs 1 on the same grid
    assert [layer.name for layer in select_stage(layers, "layer4")] == [layer.name for layer in layers[2:]]
    with pytest.raises(ValueError, match="has 2 deformable conv layers"):
        follow_sampling_points(layers, unit_xy, num_layers=3, stage="res5")
    with pytest.raises(ValueError, match="unknown stage"):
        follow_sampling_points(layers, unit_xy, stage="res7")


def test_constant_offset_shifts_the_nine_points_by_offset_times_stride():
    # A resized image: original 90x120 -> network 60x96 (y scale 1.5, x scale 1.25).
    geometry = ImageGeometry((90, 120), (60, 96), (64, 96))
    ry, rx = 90 / 60, 120 / 96
    stride, size = 8, (8, 12)
    gen = np.random.default_rng(0)
    offset = gen.uniform(-2, 2, size=(KERNEL_TAPS, 2, 1, 1))  # (dy, dx) per tap, the same everywhere
    zero = synthetic_layer("plain", size, stride, geometry)
    moved = synthetic_layer("moved", size, stride, geometry, offset=offset)
    unit = (3, 5)
    unit_xy = ((unit[1] * stride + 0.5) * rx - 0.5, (unit[0] * stride + 0.5) * ry - 0.5)
    plain_points = follow_sampling_points([zero], unit_xy, num_layers=1)[0]
    moved_points = follow_sampling_points([moved], unit_xy, num_layers=1)[0]
    shift = np.stack([offset[:, 1, 0, 0] * stride * rx, offset[:, 0, 0, 0] * stride * ry], axis=1)
    np.testing.assert_allclose(moved_points - plain_points, shift, atol=1e-9)
    # And the absolute positions: tap (i, j) at (unit + (i - 1, j - 1) + offset) on the grid.
    i, j = np.divmod(np.arange(KERNEL_TAPS), 3)
    grid_x = (unit[1] + j - 1 + offset[:, 1, 0, 0]) * stride
    grid_y = (unit[0] + i - 1 + offset[:, 0, 0, 0]) * stride
    np.testing.assert_allclose(moved_points, np.stack([(grid_x + 0.5) * rx - 0.5, (grid_y + 0.5) * ry - 0.5], 1),
                               atol=1e-9)


def test_two_layers_with_constant_offsets_compose():
    stride, size, dilation = 16, (30, 30), 2
    geometry = identity_geometry(size[0] * stride, size[1] * stride)
    gen = np.random.default_rng(1)
    lower_offset = gen.uniform(-1.5, 1.5, size=(KERNEL_TAPS, 2, 1, 1))
    upper_offset = gen.uniform(-1.5, 1.5, size=(KERNEL_TAPS, 2, 1, 1))
    lower = synthetic_layer("lower", size, stride, geometry, dilation=dilation, offset=lower_offset)
    upper = synthetic_layer("upper", size, stride, geometry, dilation=dilation, offset=upper_offset)
    unit = (15, 14)
    levels = follow_sampling_points([lower, upper], (unit[1] * stride, unit[0] * stride), num_layers=2)
    i, j = np.divmod(np.arange(KERNEL_TAPS), 3)
    expected = []
    for k1 in range(KERNEL_TAPS):          # upper layer's tap
        y1 = unit[0] + (i[k1] - 1) * dilation + upper_offset[k1, 0, 0, 0]
        x1 = unit[1] + (j[k1] - 1) * dilation + upper_offset[k1, 1, 0, 0]
        for k2 in range(KERNEL_TAPS):      # lower layer's tap, around the upper one's location
            expected.append(((x1 + (j[k2] - 1) * dilation + lower_offset[k2, 1, 0, 0]) * stride,
                             (y1 + (i[k2] - 1) * dilation + lower_offset[k2, 0, 0, 0]) * stride))
    np.testing.assert_allclose(levels[1], np.array(expected), atol=1e-9)


def test_lower_offsets_are_interpolated_at_fractional_positions():
    # The lower layer's offsets are linear in the output position, so bilinear interpolation
    # is exact: at (r, c) they are (a*r + b*c, e*r + f*c).
    stride, size = 8, (24, 24)
    geometry = identity_geometry(size[0] * stride, size[1] * stride)
    a, b, e, f = 0.05, -0.03, 0.02, 0.04
    rows, cols = np.meshgrid(np.arange(size[0], dtype=np.float64), np.arange(size[1], dtype=np.float64),
                             indexing="ij")
    linear = np.stack([a * rows + b * cols, e * rows + f * cols])[None]  # [1, 2, Ho, Wo]
    lower = synthetic_layer("lower", size, stride, geometry, offset=np.broadcast_to(linear, (KERNEL_TAPS, 2) + size))
    upper_offset = np.random.default_rng(2).uniform(-0.9, 0.9, size=(KERNEL_TAPS, 2, 1, 1))
    upper = synthetic_layer("upper", size, stride, geometry, offset=upper_offset)
    unit = (11, 12)
    level2 = follow_sampling_points([lower, upper], (unit[1] * stride, unit[0] * stride), num_layers=2)[1]
    i, j = np.divmod(np.arange(KERNEL_TAPS), 3)
    expected = []
    for k1 in range(KERNEL_TAPS):
        r1 = unit[0] + i[k1] - 1 + upper_offset[k1, 0, 0, 0]
        c1 = unit[1] + j[k1] - 1 + upper_offset[k1, 1, 0, 0]
        for k2 in range(KERNEL_TAPS):
            expected.append(((c1 + j[k2] - 1 + e * r1 + f * c1) * stride, (r1 + i[k2] - 1 + a * r1 + b * c1) * stride))
    np.testing.assert_allclose(level2, np.array(expected), atol=1e-9)


def test_resize_is_undone():
    # Original 90x120 shown to the network as 60x96: every point scales back (half-pixel rule).
    geometry = ImageGeometry((90, 120), (60, 96), (64, 96))
    ry, rx = 90 / 60, 120 / 96
    stride, dilation = 16, 2
    layers = [synthetic_layer(f"l{i}", (4, 6), stride, geometry, dilation=dilation) for i in range(2)]
    point = (71.0, 40.0)  # original pixels
    net_x, net_y = (point[0] + 0.5) / rx - 0.5, (point[1] + 0.5) / ry - 0.5
    unit = (int(np.floor(net_y / stride + 0.5)), int(np.floor(net_x / stride + 0.5)))
    assert locate_unit(layers[-1], point) == unit
    levels = follow_sampling_points(layers, point, num_layers=2)
    steps = np.arange(-2, 3) * dilation * stride
    expected = {(round((unit[1] * stride + dx + 0.5) * rx - 0.5, 9), round((unit[0] * stride + dy + 0.5) * ry - 0.5, 9))
                for dx in steps for dy in steps}
    assert {tuple(p) for p in levels[1].round(9).tolist()} == expected
    centre = levels[0].mean(axis=0)
    # The unit is the grid cell nearest to the point: within half a cell (in original pixels).
    assert abs(centre[0] - point[0]) <= stride * rx / 2 and abs(centre[1] - point[1]) <= stride * ry / 2


def test_point_outside_the_image_is_an_error():
    geometry = identity_geometry(64, 64)
    layer = synthetic_layer("l", (8, 8), 8, geometry)
    for point in [(-1, 10), (10, 64), (64, 0), (float("nan"), 3)]:
        with pytest.raises(ValueError, match="outside the image"):
            follow_sampling_points([layer], point, num_layers=1)
