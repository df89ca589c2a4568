"""Drawing and sampling_figure (the function the trainer calls)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from detkit.vis import (draw_detections, draw_roi_bins, draw_sampling_points, roi_bins, sampling_figure, save_png,
                        to_rgb_uint8)
from detkit.vis.draw import BOX_COLOR, LEVEL_COLORS
from tests.vis.builders import build_tiny, smooth_image

IMAGE_H, IMAGE_W = 80, 100


def test_points_are_drawn_where_they_are_in_their_level_colour():
    canvas = np.zeros((60, 80, 3), np.uint8)
    levels = [np.array([[10.0, 12.0], [50.0, 30.0]]), np.array([[70.0, 45.0]])]
    draw_sampling_points(canvas, levels, alpha=1.0, radius=2)
    for index, level in enumerate(levels):
        for x, y in level.astype(int):
            assert tuple(canvas[y, x]) == LEVEL_COLORS[index]
    assert canvas[0, 0].sum() == 0 and canvas[59, 40].sum() == 0  # far from every point


def test_detection_boxes_are_drawn_where_they_are():
    canvas = np.zeros((60, 80, 3), np.uint8)
    out = draw_detections(canvas, torch.tensor([[10.0, 15.0, 50.0, 45.0]]))
    assert out is canvas                                                  # drawn in place (sampling_figure)
    for y, x in [(15, 30), (45, 30), (30, 10), (30, 50), (15, 10), (45, 50)]:   # on the edges and corners
        assert tuple(canvas[y, x]) == BOX_COLOR, (y, x)
    for y, x in [(30, 30), (16, 11), (44, 49), (30, 5), (30, 55), (10, 30), (50, 30)]:  # inside / outside
        assert canvas[y, x].sum() == 0, (y, x)
    # The "name score" label: black text on a patch of the box colour, inside the box's top-left corner.
    labelled = draw_detections(np.zeros((60, 80, 3), np.uint8), [[10, 15, 50, 45]], [1], [0.5], {1: "ab"})
    inside = labelled[16:45, 11:50]
    assert np.all(inside == BOX_COLOR, axis=2).sum() > 20 and (labelled[16:30, 11:30].sum(axis=2) == 0).any()
    assert np.array_equal(labelled[40:45, 11:50], canvas[40:45, 11:50])   # the label sits at the top
    changed = np.argwhere(labelled.sum(axis=2) > 0)                      # nothing above or left of the box
    assert changed.min(axis=0).tolist() == [15, 10] and changed[:, 0].max() == 45


def test_roi_bins_are_drawn_inside_the_box_region():
    canvas = np.zeros((100, 120, 3), np.uint8)
    box = np.array([20.0, 30.0, 90.0, 80.0])
    offset = np.zeros((2, 3, 3))
    offset[0, 1, 1] = 2.0  # centre bin moved right by 0.1 * 2 * 70 = 14 px
    bins = roi_bins(box, offset, None, gamma=0.1)
    draw_roi_bins(canvas, bins)
    painted = np.argwhere(canvas.sum(axis=2) > 0)
    assert painted[:, 1].min() >= box[0] - 3 and painted[:, 1].max() <= box[2] + 3
    assert painted[:, 0].min() >= box[1] - 3 and painted[:, 0].max() <= box[3] + 3
    # The moved centre bin's rectangle is drawn around its shifted centre.
    cx, cy = bins.shifted_centers[1, 1]
    half_w = (bins.regular[1, 1, 2] - bins.regular[1, 1, 0]) / 4
    assert canvas[int(round(cy)), int(round(cx + half_w))].sum() > 0


def test_sampling_figure_is_an_rgb_image_of_the_image_size(tiny_model):
    image = smooth_image(IMAGE_H, IMAGE_W)
    tiny_model.train()
    figure = sampling_figure(tiny_model, image, num_layers=3, top_k=2)
    assert tiny_model.training  # the trainer's model stays in training mode
    assert figure.shape == (IMAGE_H, IMAGE_W, 3) and figure.dtype == np.uint8
    assert np.abs(figure.astype(int) - to_rgb_uint8(image).astype(int)).sum() > 0
    with_point = sampling_figure(tiny_model, image, point=(30, 20), num_layers=2, stage="res4")
    assert with_point.shape == (IMAGE_H, IMAGE_W, 3) and not np.array_equal(with_point, figure)


def test_save_png_writes_bgr(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 255  # red
    save_png(tmp_path / "sub" / "red.png", rgb)
    back = cv2.imread(str(tmp_path / "sub" / "red.png"))
    assert back.shape == rgb.shape and tuple(back[0, 0]) == (0, 0, 255)


def test_sampling_figure_errors(tiny_model):
    image = smooth_image(IMAGE_H, IMAGE_W)
    with pytest.raises(ValueError, match="stage res5 has 2 deformable conv layers"):
        sampling_figure(tiny_model, image, num_layers=3, stage="res5")
    with pytest.raises(ValueError, match="outside the image"):
        sampling_figure(tiny_model, image, point=(IMAGE_W, 3))
    plain = build_tiny(backbone={"deform_blocks": {}}, pooler_kind="align")
    with pytest.raises(ValueError, match="no deformable layers"):
        sampling_figure(plain, image)


def test_pooling_only_model_draws_bins():
    model = build_tiny(backbone={"deform_blocks": {}}, pooler_kind="deform")
    image = smooth_image(IMAGE_H, IMAGE_W)
    figure = sampling_figure(model, image, top_k=1)
    assert figure.shape == (IMAGE_H, IMAGE_W, 3)
    assert not np.array_equal(figure, sampling_figure(model, image, top_k=0))  # the box and its bins
    with pytest.raises(ValueError, match="stage res5 has 0 deformable conv layers"):
        sampling_figure(model, image, stage="res5")
