"""Drawing sampling points and deformable RoI bins with OpenCV, detections with torchvision.

Every function draws on an HxWx3 uint8 RGB array of the ORIGINAL image's size (colours
are RGB) and returns the array; `save_png` converts to BGR for `cv2.imwrite`.
`sampling_figure` is the one-call entry point (the trainer logs its result to TensorBoard).

Drawing (DCNv1 Figures 5 and 7): sampling points coloured by level (level 1, the last
layer's 9 taps, red; level 2 green; level 3 blue; deeper levels further colours), drawn
deepest level first as small semi-transparent dots; each activation unit a white circle
with a black rim. Deformable RoI bins: the regular bin grid faint, and every shifted bin as
a rectangle of half the bin's size around its shifted centre (whole bins would overlap),
joined to its regular centre by a thin line; for DCNv2 the opacity and thickness follow
the bin's mask. Detections: boxes with "class score" labels
(torchvision.utils.draw_bounding_boxes, at whole pixels).

Primitives of the paper-style pictures (detkit/study/figures.py), for an upscaled canvas:
`draw_points` (small discs blended one at a time, so that where points pile up the colour
builds up), `draw_unit_marker` (a ring with a cross, black-rimmed) and `draw_box_outline`
(a thin, optionally faint rectangle).

Points are in the pixel-index frame (OpenCV's: pixel (x, y) is centred on (x, y)); boxes
and bins are drawn at their corner coordinates as detectors conventionally do (half a
pixel apart, invisible at these sizes). Sub-pixel positions are kept with cv2's `shift`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from detkit.vis.sampling import (RoIBins, capture, check_sampling_request, follow_sampling_points, locate_unit,
                                 select_stage)

__all__ = ["LEVEL_COLORS", "POINT_COLOR", "UNIT_COLOR", "to_rgb_uint8", "dim", "draw_detections",
           "draw_sampling_points", "draw_roi_bins", "draw_points", "draw_unit_marker", "draw_box_outline",
           "sampling_figure", "save_png", "detection_centers"]

#: RGB colour of sampling-point level 1 (the last layer), 2, 3, ...
LEVEL_COLORS = ((255, 40, 40), (40, 220, 40), (40, 110, 255), (230, 200, 0), (200, 0, 220))
BOX_COLOR = (255, 220, 0)
BIN_COLOR = (255, 60, 200)
GRID_COLOR = (255, 255, 255)
POINT_COLOR = (255, 30, 30)   # the paper's red sampling points
UNIT_COLOR = (0, 230, 0)      # and its green activation unit
_SHIFT = 4  # cv2 fractional bits
_ONE = 1 << _SHIFT


def _fixed(value: float) -> int:
    return int(round(float(value) * _ONE))


def to_rgb_uint8(image) -> np.ndarray:
    """Tensor [3, H, W] float in [0, 1] (or uint8), or an HxWx3 array -> a new HxWx3 uint8 RGB array."""
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        if array.dim() != 3 or array.shape[0] != 3:
            raise ValueError(f"image must be a Tensor [3, H, W], got {tuple(array.shape)}")
        if array.is_floating_point():
            array = (array.clamp(0, 1) * 255).round()
        return np.ascontiguousarray(array.to(torch.uint8).permute(1, 2, 0).numpy())
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array.copy())


def dim(canvas: np.ndarray, amount: float = 0.4) -> np.ndarray:
    """Fade the image towards grey (in place) so that what is drawn on it stands out."""
    grey = np.full_like(canvas, 110)
    _blend(canvas, grey, amount)
    return canvas


def _thickness(canvas: np.ndarray) -> int:
    return max(1, int(round(min(canvas.shape[:2]) / 300)))


def _blend(canvas: np.ndarray, overlay: np.ndarray, alpha: float) -> None:
    cv2.addWeighted(overlay, alpha, canvas, 1 - alpha, 0, dst=canvas)


def _label_of(label: int, class_names: Mapping | Sequence | None) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, class_names.get(str(label), label)))
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


def _label_font() -> str:
    """The TrueType file of the label text: DejaVu Sans, shipped with matplotlib."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def draw_detections(canvas: np.ndarray, boxes, labels=None, scores=None, class_names=None,
                    color: tuple[int, int, int] = BOX_COLOR) -> np.ndarray:
    """Draw boxes [N, 4] (x1, y1, x2, y2 in the canvas's pixels, x1 <= x2 and y1 <= y2) on
    `canvas` (HxWx3 uint8 RGB, changed in place) and return it.

    torchvision.utils.draw_bounding_boxes draws each box, corners rounded to whole pixels, as an
    outline `_thickness` pixels wide inside the box in `color` (RGB), and its "name score" label
    (class_names: {label: name} or a list; the label number without it) in black on a `color`
    patch at the box's top-left corner, inside the box.
    """
    from torchvision.utils import draw_bounding_boxes

    boxes = torch.as_tensor(np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, np.float64)
                            ).reshape(-1, 4)
    if len(boxes) == 0:
        return canvas
    labels = None if labels is None else [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    scores = None if scores is None else [float(v) for v in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    texts = None
    if labels is not None or scores is not None:
        texts = [" ".join(([_label_of(labels[k], class_names)] if labels is not None else [])
                          + ([f"{scores[k]:.2f}"] if scores is not None else [])) for k in range(len(boxes))]
    image = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)      # [3, H, W] uint8
    drawn = draw_bounding_boxes(image, boxes.round(), texts, colors=tuple(int(c) for c in color),
                                width=_thickness(canvas), font=_label_font(),
                                font_size=max(10, round(min(canvas.shape[:2]) / 23)), label_colors=(0, 0, 0),
                                fill_labels=True)
    canvas[...] = drawn.permute(1, 2, 0).numpy()
    return canvas


def draw_sampling_points(canvas: np.ndarray, levels: Sequence[np.ndarray], unit_xy=None, alpha: float = 0.7,
                         radius: float | None = None) -> np.ndarray:
    """levels: [level 1 (9, 2), level 2 (81, 2), ...] (x, y) points; unit_xy the activation unit."""
    if radius is None:
        radius = max(1.5, min(canvas.shape[:2]) / 140)
    for index in range(len(levels) - 1, -1, -1):  # deepest (most numerous) first
        overlay = canvas.copy()
        color = LEVEL_COLORS[index % len(LEVEL_COLORS)]
        r = _fixed(radius * (1.0 + 0.25 * (len(levels) - 1 - index) / max(len(levels) - 1, 1)))
        points = [(_fixed(x), _fixed(y)) for x, y in np.asarray(levels[index], np.float64).reshape(-1, 2)
                  if np.isfinite(x) and np.isfinite(y) and abs(x) < 1e6 and abs(y) < 1e6]
        for centre in points:
            cv2.circle(overlay, centre, r + _ONE // 2, (0, 0, 0), -1, cv2.LINE_AA, _SHIFT)
        for centre in points:
            cv2.circle(overlay, centre, r, color, -1, cv2.LINE_AA, _SHIFT)
        _blend(canvas, overlay, alpha)
    if unit_xy is not None:
        x, y = float(unit_xy[0]), float(unit_xy[1])
        outer = _fixed(radius * 2.2)
        cv2.circle(canvas, (_fixed(x), _fixed(y)), outer, (0, 0, 0), _thickness(canvas) + 2, cv2.LINE_AA, _SHIFT)
        cv2.circle(canvas, (_fixed(x), _fixed(y)), outer, (255, 255, 255), _thickness(canvas), cv2.LINE_AA, _SHIFT)
    return canvas


def draw_roi_bins(canvas: np.ndarray, bins: RoIBins, color: tuple[int, int, int] = BIN_COLOR,
                  grid_alpha: float = 0.35) -> np.ndarray:
    """One RoI: its rectangle, its regular bin grid (faint) and its shifted bins (see the module docstring)."""
    thickness = _thickness(canvas)
    x1, y1, x2, y2 = bins.box
    ph, pw = bins.regular.shape[:2]
    overlay = canvas.copy()
    for j in range(1, pw):
        x = bins.regular[0, j, 0]
        cv2.line(overlay, (_fixed(x), _fixed(y1)), (_fixed(x), _fixed(y2)), GRID_COLOR, 1, cv2.LINE_AA, _SHIFT)
    for i in range(1, ph):
        y = bins.regular[i, 0, 1]
        cv2.line(overlay, (_fixed(x1), _fixed(y)), (_fixed(x2), _fixed(y)), GRID_COLOR, 1, cv2.LINE_AA, _SHIFT)
    _blend(canvas, overlay, grid_alpha)
    cv2.rectangle(canvas, (_fixed(x1), _fixed(y1)), (_fixed(x2), _fixed(y2)), BOX_COLOR, thickness,
                  cv2.LINE_AA, _SHIFT)
    centres, regular = bins.shifted_centers, bins.regular_centers
    half_w = (bins.regular[..., 2] - bins.regular[..., 0]) / 4
    half_h = (bins.regular[..., 3] - bins.regular[..., 1]) / 4
    weights = np.ones((ph, pw)) if bins.mask is None else np.clip(bins.mask, 0.0, 1.0)
    height, width = canvas.shape[:2]
    for i in range(ph):
        for j in range(pw):
            weight = float(weights[i, j])
            if weight <= 0.02:
                continue
            cx, cy = centres[i, j]
            rx, ry = regular[i, j]
            line = max(1, int(round(thickness * (0.5 + weight))))
            # Blend only the region this bin touches (49 bins x several RoIs on a large image).
            margin = line + 2
            x0 = int(np.clip(np.floor(min(rx, cx - half_w[i, j])) - margin, 0, width))
            x1 = int(np.clip(np.ceil(max(rx, cx + half_w[i, j])) + margin + 1, 0, width))
            y0 = int(np.clip(np.floor(min(ry, cy - half_h[i, j])) - margin, 0, height))
            y1 = int(np.clip(np.ceil(max(ry, cy + half_h[i, j])) + margin + 1, 0, height))
            if x1 <= x0 or y1 <= y0:
                continue
            region = canvas[y0:y1, x0:x1]
            overlay = region.copy()  # C-contiguous, for OpenCV
            cv2.line(overlay, (_fixed(rx - x0), _fixed(ry - y0)), (_fixed(cx - x0), _fixed(cy - y0)),
                     color, 1, cv2.LINE_AA, _SHIFT)
            cv2.rectangle(overlay, (_fixed(cx - x0 - half_w[i, j]), _fixed(cy - y0 - half_h[i, j])),
                          (_fixed(cx - x0 + half_w[i, j]), _fixed(cy - y0 + half_h[i, j])), color, line,
                          cv2.LINE_AA, _SHIFT)
            alpha = 0.25 + 0.75 * weight
            region[...] = cv2.addWeighted(overlay, alpha, region.copy(), 1 - alpha, 0)
    return canvas


def draw_points(canvas: np.ndarray, points, color: tuple[int, int, int] = POINT_COLOR, radius: float = 1.5,
                alpha: float = 0.35) -> np.ndarray:
    """Draw points [N, 2] (x, y in the canvas's pixel-index frame) on `canvas` (HxWx3 uint8 RGB,
    changed in place) as filled discs of `radius` pixels in `color`, each blended on its own
    with opacity `alpha` times its coverage of the pixel: n discs on the same pixel make it
    1 - (1 - alpha)**n opaque, so dense regions read as dense. A pixel's coverage is
    clip(radius + 0.5 - d, 0, 1) for d the distance of its centre from the point (a one-pixel
    soft edge; cv2's anti-aliased circles are a pixel or two wider at these radii).
    Non-finite points and points off the canvas are skipped."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    height, width = canvas.shape[:2]
    reach = int(np.ceil(radius)) + 1
    paint = np.asarray(color, np.float64)
    for x, y in np.asarray(points, np.float64).reshape(-1, 2):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        x0, y0 = max(int(np.floor(x)) - reach, 0), max(int(np.floor(y)) - reach, 0)
        x1, y1 = min(int(np.floor(x)) + reach + 2, width), min(int(np.floor(y)) + reach + 2, height)
        if x1 <= x0 or y1 <= y0:
            continue
        rows, cols = np.mgrid[y0:y1, x0:x1]
        coverage = np.clip(radius + 0.5 - np.hypot(cols - x, rows - y), 0.0, 1.0)[..., None] * alpha
        region = canvas[y0:y1, x0:x1]
        region[...] = np.round(region * (1.0 - coverage) + paint * coverage).astype(np.uint8)
    return canvas


def draw_unit_marker(canvas: np.ndarray, xy, color: tuple[int, int, int] = UNIT_COLOR,
                     radius: float = 7.0) -> np.ndarray:
    """Mark an activation unit at xy = (x, y) (canvas pixel-index frame): a ring of `radius`
    pixels and a cross whose arms start outside the ring (the points near the unit stay
    visible), both in `color` with a black rim; in place, returns `canvas`."""
    x, y = float(xy[0]), float(xy[1])
    centre = (_fixed(x), _fixed(y))
    arms = [((x - 2.2 * radius, y), (x - 1.2 * radius, y)), ((x + 1.2 * radius, y), (x + 2.2 * radius, y)),
            ((x, y - 2.2 * radius), (x, y - 1.2 * radius)), ((x, y + 1.2 * radius), (x, y + 2.2 * radius))]
    for paint, width in (((0, 0, 0), 4), (color, 2)):
        cv2.circle(canvas, centre, _fixed(radius), paint, width, cv2.LINE_AA, _SHIFT)
        for (ax, ay), (bx, by) in arms:
            cv2.line(canvas, (_fixed(ax), _fixed(ay)), (_fixed(bx), _fixed(by)), paint, width, cv2.LINE_AA, _SHIFT)
    return canvas


def draw_box_outline(canvas: np.ndarray, box, color: tuple[int, int, int] = BOX_COLOR, thickness: int = 1,
                     alpha: float = 1.0) -> np.ndarray:
    """A box [4] (x1, y1, x2, y2, canvas pixels, drawn at its corner coordinates) as a rectangle
    `thickness` pixels wide with opacity `alpha`; in place, returns `canvas`."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    overlay = canvas.copy() if alpha < 1.0 else canvas
    cv2.rectangle(overlay, (_fixed(x1), _fixed(y1)), (_fixed(x2), _fixed(y2)), color, int(thickness),
                  cv2.LINE_AA, _SHIFT)
    if alpha < 1.0:
        _blend(canvas, overlay, alpha)
    return canvas


def detection_centers(boxes, image_size: tuple[int, int]) -> np.ndarray:
    """Centres [N, 2] (x, y) of boxes in the pixel-index frame, kept inside an image of (H, W)."""
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, np.float64).reshape(-1, 4)
    height, width = image_size
    x = np.clip((boxes[:, 0] + boxes[:, 2]) / 2 - 0.5, 0, width - 1)
    y = np.clip((boxes[:, 1] + boxes[:, 3]) / 2 - 0.5, 0, height - 1)
    return np.stack([x, y], axis=1)


def sampling_figure(model: nn.Module, image, point: Sequence[float] | None = None, num_layers: int = 3,
                    stage: str | None = None, top_k: int = 3, class_names: Mapping | Sequence | None = None,
                    offset_group: int = 0) -> np.ndarray:
    """One picture of where the model's deformable layers sample on `image`.

    image: Tensor [3, H, W] RGB in [0, 1] (or HxWx3 uint8 RGB). Draws the `top_k` detections;
    the sampling points (`follow_sampling_points` through `num_layers` stacked deformable convs
    of `stage`, default: the last ones of the network) of the unit at `point` (x, y) in image
    pixels, or, when point is None, of the units at the centres of the top_k detections (the
    image centre when there is none), all in one picture; and, when the RoI pooler is
    deformable, the bins of the top_k detections. Returns HxWx3 uint8 RGB of the image's size.
    ValueError when the model has no deformable layer, the stage has fewer than num_layers
    deformable convs, or the point is outside the image. The model's train/eval mode is kept.
    """
    used_layers = check_sampling_request(model, stage, num_layers)
    canvas = dim(to_rgb_uint8(image))
    height, width = canvas.shape[:2]
    if point is not None:
        if len(point) != 2:
            raise ValueError(f"point must be [x, y], got {list(point)}")
        x, y = float(point[0]), float(point[1])
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point ({x:g}, {y:g}) is outside the image ({width}x{height} pixels: "
                             f"x in [0, {width}), y in [0, {height}))")
    result = capture(model, image, top_k=top_k)
    dets = result.detections
    k = max(int(top_k), 0)
    top_boxes = dets["boxes"][:k]
    for bins in result.roi_bins:
        draw_roi_bins(canvas, bins)
    if used_layers:
        if point is not None:
            units = np.array([[float(point[0]), float(point[1])]])
        elif len(top_boxes):
            units = detection_centers(top_boxes, (height, width))
        else:
            units = np.array([[(width - 1) / 2, (height - 1) / 2]])
        stack = select_stage(result.layers, stage)[-used_layers:]
        for unit in units:
            levels = follow_sampling_points(stack, unit, used_layers, offset_group=offset_group)
            row, col = locate_unit(stack[-1], unit)
            unit_x, unit_y = stack[-1].output_to_image(row, col)
            draw_sampling_points(canvas, levels, (float(unit_x), float(unit_y)))
    draw_detections(canvas, top_boxes, dets["labels"][:k], dets["scores"][:k], class_names)
    return canvas


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an HxWx3 uint8 RGB array as a PNG (creating the folder); OSError if it cannot."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write image {path} (is the extension .png?)")
