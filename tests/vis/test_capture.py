"""capture / follow_sampling_points / RoI bins on real (tiny) detkit detectors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from detkit.modeling.backbone import deformable_layers
from detkit.ops import DeformConv2d
from detkit.vis import (capture, capture_deformable_offsets, follow_sampling_points, locate_unit, roi_bins,
                        select_stage)
from detkit.vis.sampling import deformable_conv_stages
from tests.vis.builders import MAX_SIZE, MIN_SIZE, build_tiny, single_scale_config, smooth_image

IMAGE_H, IMAGE_W = 80, 100
KERNEL_TAPS = 9
TAP_I, TAP_J = np.divmod(np.arange(KERNEL_TAPS), 3)


def resized_size(height: int, width: int) -> tuple[int, int]:
    """GeneralizedRCNNTransform's eval resize (shorter side MIN_SIZE, longer at most MAX_SIZE)."""
    scale = min(MIN_SIZE / min(height, width), MAX_SIZE / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def set_constant_offsets(layer, offsets: np.ndarray, mask_logits: np.ndarray | None = None) -> None:
    """Make a DeformConv2d predict `offsets` [9, 2] (dy, dx per tap) everywhere (and mask logits [9])."""
    with torch.no_grad():
        layer.offset_branch.weight.zero_()
        bias = torch.as_tensor(offsets, dtype=torch.float32).reshape(-1)
        if mask_logits is not None:
            bias = torch.cat([bias, torch.as_tensor(mask_logits, dtype=torch.float32)])
        layer.offset_branch.bias.copy_(bias)


def sorted_points(points: np.ndarray) -> np.ndarray:
    rounded = np.round(points, 6)
    return rounded[np.lexsort((rounded[:, 1], rounded[:, 0]))]


def image_to_pixels(net_x, net_y, ratio_x, ratio_y):
    return (np.asarray(net_x) + 0.5) * ratio_x - 0.5, (np.asarray(net_y) + 0.5) * ratio_y - 0.5


def test_capture_reads_offsets_masks_and_geometry():
    model = build_tiny()
    names = [name for name, _ in deformable_layers(model)]
    modules = dict(deformable_layers(model))
    target = names[2]
    gen = np.random.default_rng(0)
    offsets, logits = gen.uniform(-1, 1, size=(KERNEL_TAPS, 2)), gen.uniform(-2, 2, size=KERNEL_TAPS)
    set_constant_offsets(modules[target], offsets, logits)
    detections, layers = capture_deformable_offsets(model, smooth_image(IMAGE_H, IMAGE_W))
    assert [layer.name for layer in layers] == names
    assert set(detections) >= {"boxes", "scores", "labels"}
    assert torch.all(detections["scores"][:-1] >= detections["scores"][1:])
    network = resized_size(IMAGE_H, IMAGE_W)
    backbone = model.backbone
    for layer in layers:
        assert layer.geometry.original_size == (IMAGE_H, IMAGE_W)
        assert layer.geometry.network_size == network
        # BasicBlock: conv2 works on its stage's grid.
        stage_stride = backbone.strides[layer.stage]
        assert layer.input_stride == (stage_stride, stage_stride)
        assert layer.output_size == tuple(math.ceil(p / stage_stride) for p in layer.geometry.padded_size)
        assert layer.modulated and np.all((layer.mask > 0) & (layer.mask < 1))
    chosen = layers[names.index(target)]
    np.testing.assert_allclose(chosen.offset[0], np.broadcast_to(offsets[:, :, None, None], chosen.offset.shape[1:]),
                               atol=1e-6)
    sigmoid = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(chosen.mask[0], np.broadcast_to(sigmoid[:, None, None], chosen.mask.shape[1:]),
                               atol=1e-6)


def test_layer_stages_come_from_the_model():
    model = build_tiny(backbone={"deform_blocks": {"res2": [0], "res4": "all", "res5": [-1]}})
    backbone = model.backbone
    stage_modules = {"res2": backbone.layer1, "res3": backbone.layer2, "res4": backbone.layer3,
                     "res5": backbone.layer4}
    holder = {id(m): stage for stage, module in stage_modules.items() for m in module.modules()}
    modules = dict(deformable_layers(model))
    stages = deformable_conv_stages(model)
    assert list(stages) == list(modules)
    assert stages == {name: holder[id(m)] for name, m in modules.items()}
    assert sorted(set(stages.values())) == ["res2", "res4", "res5"]
    _, layers = capture_deformable_offsets(model, smooth_image(IMAGE_H, IMAGE_W))
    assert [layer.stage for layer in layers] == list(stages.values())
    assert [layer.name for layer in select_stage(layers, "layer3")] == [n for n, s in stages.items() if s == "res4"]
    # A bare ResNet answers for itself; a DeformConv2d outside any ResNet has no stage.
    assert deformable_conv_stages(backbone) == {name.removeprefix("backbone."): s for name, s in stages.items()}
    assert deformable_conv_stages(nn.Sequential(DeformConv2d(3, 3, 3, 1, padding=1))) == {"0": None}


def test_capture_restores_training_mode():
    model = build_tiny().train()
    capture(model, smooth_image(IMAGE_H, IMAGE_W))
    assert model.training and model.rpn.training
    model.eval()
    capture(model, smooth_image(IMAGE_H, IMAGE_W))
    assert not model.training


def test_zero_offsets_dilated_res5_in_original_pixels():
    model = build_tiny(**single_scale_config(dilate_res5=True))
    backbone = model.backbone
    dilation, stride = 2, backbone.strides["res5"]  # dilated res5: stride 16 all through the stage
    assert stride == backbone.strides["res4"]
    network = resized_size(IMAGE_H, IMAGE_W)
    ratio_y, ratio_x = IMAGE_H / network[0], IMAGE_W / network[1]
    assert (ratio_y, ratio_x) != (1.0, 1.0)
    _, layers = capture_deformable_offsets(model, smooth_image(IMAGE_H, IMAGE_W))
    assert len(layers) == 3 and all(layer.stage == "res5" for layer in layers)
    point = (55.0, 42.0)
    levels = follow_sampling_points(layers, point, num_layers=3, stage="res5")
    assert [len(level) for level in levels] == [9, 81, 729]
    # The unit is the res5 position nearest to the point.
    net_x, net_y = (point[0] + 0.5) / ratio_x - 0.5, (point[1] + 0.5) / ratio_y - 0.5
    row, col = round(net_y / stride), round(net_x / stride)
    for depth, level in enumerate(levels, start=1):
        steps = np.arange(-depth, depth + 1) * dilation * stride
        xs, ys = image_to_pixels(col * stride + steps, row * stride + steps, ratio_x, ratio_y)
        expected = {(round(x, 6), round(y, 6)) for x in xs for y in ys}
        assert {tuple(p) for p in np.round(level, 6).tolist()} == expected


def test_zero_offsets_with_a_strided_first_layer():
    model = build_tiny(**single_scale_config(dilate_res5=False))
    backbone = model.backbone
    in_stride, out_stride = backbone.strides["res4"], backbone.strides["res5"]
    conv_stride = out_stride // in_stride
    assert conv_stride == 2
    network = resized_size(IMAGE_H, IMAGE_W)
    ratio_y, ratio_x = IMAGE_H / network[0], IMAGE_W / network[1]
    _, layers = capture_deformable_offsets(model, smooth_image(IMAGE_H, IMAGE_W))
    assert [layer.stride for layer in layers] == [(2, 2), (1, 1), (1, 1)]
    unit = (1, 1)
    unit_xy = image_to_pixels(unit[1] * out_stride, unit[0] * out_stride, ratio_x, ratio_y)
    assert locate_unit(layers[-1], unit_xy) == unit
    levels = follow_sampling_points(layers, unit_xy, num_layers=3)
    # Explicit composition: two stride-1 3x3 layers on the stride-32 grid, then the stride-2
    # layer whose output m reads input 2m - 1 + k (k = 0, 1, 2) on the stride-16 grid.
    expected = []
    for ai, aj in zip(TAP_I, TAP_J):            # top layer
        for bi, bj in zip(TAP_I, TAP_J):        # middle layer
            mr, mc = unit[0] + ai - 1 + bi - 1, unit[1] + aj - 1 + bj - 1
            for ci, cj in zip(TAP_I, TAP_J):    # strided bottom layer
                r, c = conv_stride * mr - 1 + ci, conv_stride * mc - 1 + cj
                expected.append(image_to_pixels(c * in_stride, r * in_stride, ratio_x, ratio_y))
    np.testing.assert_allclose(sorted_points(levels[2]), sorted_points(np.array(expected)), atol=1e-6)


def test_injected_offsets_move_the_points_on_a_real_model():
    model = build_tiny(**single_scale_config(dilate_res5=True))
    layers_by_name = dict(deformable_layers(model))
    top_name = list(layers_by_name)[-1]
    image = smooth_image(IMAGE_H, IMAGE_W)
    point = (50.0, 40.0)
    _, plain = capture_deformable_offsets(model, image)
    before = follow_sampling_points(plain, point, num_layers=2)
    offsets = np.random.default_rng(3).uniform(-1.5, 1.5, size=(KERNEL_TAPS, 2))
    set_constant_offsets(layers_by_name[top_name], offsets)
    _, moved = capture_deformable_offsets(model, image)
    after = follow_sampling_points(moved, point, num_layers=2)
    stride = model.backbone.strides["res4"]
    network = resized_size(IMAGE_H, IMAGE_W)
    ratio_y, ratio_x = IMAGE_H / network[0], IMAGE_W / network[1]
    shift = np.stack([offsets[:, 1] * stride * ratio_x, offsets[:, 0] * stride * ratio_y], axis=1)
    np.testing.assert_allclose(after[0] - before[0], shift, atol=1e-4)
    # The layer below has zero offsets: its 9 points around each moved point move with it.
    np.testing.assert_allclose(after[1] - before[1], np.repeat(shift, KERNEL_TAPS, axis=0), atol=1e-4)


# ------------------------------------------------------------------------------- RoI bins

def test_roi_bins_zero_offsets_are_the_regular_grid():
    box = np.array([10.0, 20.0, 80.0, 55.0])
    bins_per_side = 7
    bins = roi_bins(box, np.zeros((2, bins_per_side, bins_per_side)), None, gamma=0.1)
    width, height = (box[2] - box[0]) / bins_per_side, (box[3] - box[1]) / bins_per_side
    for i in range(bins_per_side):
        for j in range(bins_per_side):
            np.testing.assert_allclose(bins.regular[i, j], [box[0] + j * width, box[1] + i * height,
                                                            box[0] + (j + 1) * width, box[1] + (i + 1) * height])
    np.testing.assert_array_equal(bins.shifted, bins.regular)
    assert bins.regular[0, 0, 0] == box[0] and bins.regular[-1, -1, 3] == pytest.approx(box[3])


def test_roi_bins_known_offset_shifts_by_gamma_offset_roi_size():
    box = np.array([5.0, 8.0, 69.0, 40.0])
    gamma = 0.1
    offset = np.random.default_rng(4).normal(size=(2, 3, 3))
    mask = np.random.default_rng(5).uniform(size=(1, 3, 3))
    bins = roi_bins(box, offset, mask, gamma)
    shift = np.stack([gamma * offset[0] * (box[2] - box[0]), gamma * offset[1] * (box[3] - box[1])], axis=-1)
    np.testing.assert_allclose(bins.shift, shift)
    sizes = bins.regular[..., 2:] - bins.regular[..., :2]
    np.testing.assert_allclose(bins.shifted[..., 2:] - bins.shifted[..., :2], sizes)  # bins move, keep their size
    np.testing.assert_array_equal(bins.mask, mask[0])


def test_model_roi_bins_with_known_pool_offsets():
    model = build_tiny()
    deform_pool = model.roi_heads.box_roi_pool.deform_pool
    bins_count = deform_pool.output_size[0] * deform_pool.output_size[1]
    gen = np.random.default_rng(6)
    offset = gen.normal(size=(2, *deform_pool.output_size))
    logits = gen.normal(size=bins_count)
    with torch.no_grad():
        last = deform_pool.offset_branch[-1]
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(np.concatenate([offset.reshape(-1), logits]), dtype=torch.float32))
    boxes = np.array([[4.0, 6.0, 60.0, 50.0], [30.0, 10.0, 90.0, 75.0]])
    result = capture(model, smooth_image(IMAGE_H, IMAGE_W), roi_boxes=boxes)
    assert len(result.roi_bins) == len(boxes)
    for box, bins in zip(boxes, result.roi_bins):
        np.testing.assert_allclose(bins.offset, offset, atol=1e-6)
        np.testing.assert_allclose(bins.mask, 1 / (1 + np.exp(-logits.reshape(deform_pool.output_size))), atol=1e-6)
        size = np.array([box[2] - box[0], box[3] - box[1]])
        expected_shift = deform_pool.gamma * np.moveaxis(offset, 0, -1) * size
        np.testing.assert_allclose(bins.shift, expected_shift, atol=1e-5)
        np.testing.assert_allclose(bins.regular[0, 0, :2], box[:2])
        np.testing.assert_allclose(bins.regular[-1, -1, 2:], box[2:])
    # Default: the top detections.
    top = capture(model, smooth_image(IMAGE_H, IMAGE_W), top_k=2)
    assert len(top.roi_bins) == min(2, len(top.detections["boxes"]))
    for k, bins in enumerate(top.roi_bins):
        np.testing.assert_allclose(bins.box, top.detections["boxes"][k].double().numpy())


@pytest.mark.parametrize("layout", ["fpn", "single_scale"])
def test_model_roi_bins_match_the_pooler(layout):
    model = build_tiny() if layout == "fpn" else build_tiny(**single_scale_config(dilate_res5=True))
    pooler = model.roi_heads.box_roi_pool
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        last = pooler.deform_pool.offset_branch[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.5)
    image = smooth_image(IMAGE_H, IMAGE_W)
    network = resized_size(IMAGE_H, IMAGE_W)
    ratio_y, ratio_x = IMAGE_H / network[0], IMAGE_W / network[1]
    # Square boxes whose side in network pixels is 60, 120, 240, 480: FPN levels 2..5.
    sides = [60.0, 120.0, 240.0, 480.0]
    net_boxes = torch.tensor([[8.0, 4.0, 8.0 + s, 4.0 + s] for s in sides], dtype=torch.float64)
    boxes = (net_boxes * torch.tensor([ratio_x, ratio_y, ratio_x, ratio_y], dtype=torch.float64)).numpy()
    result = capture(model, image, roi_boxes=boxes)
    if layout == "fpn":
        expected_levels = [min(max(math.floor(4 + math.log2(s / 224) + 1e-6), 2), 5) for s in sides]
        assert len(set(expected_levels)) == len(sides)
        assert [bins.feature for bins in result.roi_bins] == [f"p{level}" for level in expected_levels]
    else:
        assert [bins.feature for bins in result.roi_bins] == ["res5"] * len(sides)
        assert result.roi_bins[0].mask is None  # DCNv1 pooling

    # What the RoIPooler itself predicts for each box as a proposal.
    with torch.inference_mode():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        if model.neck is not None:
            features = model.neck(features)
        for k in range(len(sides)):
            seen = []
            handle = pooler.deform_pool.register_forward_hook(
                lambda module, args, out: seen.append(module.predict_offsets(*args)))
            try:
                pooler(features, [net_boxes[k:k + 1].float()], batch.image_sizes)
            finally:
                handle.remove()
            # The pooler calls deform_pool once per level, with no RoI on the other levels.
            (offset, mask), = [(o, m) for o, m in seen if len(o)]
            np.testing.assert_allclose(result.roi_bins[k].offset, offset[0].double().numpy(), atol=1e-5)
            if mask is not None:
                np.testing.assert_allclose(result.roi_bins[k].mask, mask[0, 0].double().numpy(), atol=1e-5)
            assert np.abs(result.roi_bins[k].offset).max() > 1e-3  # the offsets are not trivially zero
