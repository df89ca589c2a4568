"""The DCNv1 paper's Figures 5 and 7 as pictures: sampling points by object size, deformable RoI bins.

What this module makes (tools/paper_figures.py writes it to files):

- Figure 5 (`sampling_panels`): three panels side by side, one per activation unit of the
  last of `num_layers` stacked deformable convs: a unit on background, one at the centre of a
  small object and one at the centre of a large object (`choose_units`). Each panel shows the
  unit's 9**num_layers sampling points (`follow_sampling_points`, the deepest level only, as
  the paper does) as small semi-transparent red dots, the unit as a green ring, and the
  object's ground-truth box drawn thin (on the background panel every box, faint).
- Figure 7 (`roi_bin_panels`): one panel per top detection with its deformable RoI pooling
  bins (`draw_roi_bins`: regular grid faint, shifted bins as small rectangles, opacity by the
  DCNv2 mask when modulated).
- `paper_figures(model, image, boxes, areas)` runs one hooked forward (`capture`) and makes
  both (`PaperFigures`, with a JSON-ready `summary()`).

Both are drawn on the image UPSCALED (`upscale`, bilinear) so that its shorter side is at
least `min_canvas` pixels: at a network's own resolution (~200 px) 729 points cover most of
the image and nothing can be read. Everything is computed in the ORIGINAL image's pixels
(pixel-index frame for points, corner frame x1y1x2y2 for boxes, as detkit/vis/sampling.py)
and only mapped to the canvas for drawing (`Canvas.map_points`, `Canvas.map_boxes`, the
resize's own rule), so the numbers of `summary()` do not depend on min_canvas.

Choosing the units (`choose_units`, from ground-truth boxes [N, 4] x1y1x2y2 and areas [N],
original pixels; `ground_truth_boxes` reads them from COCO annotations, the area being the
annotation's `area`, else the box's w * h):

- size buckets are COCO's (`size_category`: small < 32**2 <= medium < 96**2 <= large);
- small / large: the centre of the object of that bucket whose centre lies in no other box
  (so that the unit sits on that object alone), the one of largest area among those (among
  all of the bucket when every centre is covered); ValueError when the bucket is empty;
- background: among the candidate points (the centres of the top layer's units on the
  image, `unit_centres`, or every pixel), one inside no box (x1 <= x + 0.5 <= x2 and
  y1 <= y + 0.5 <= y2 counts as inside, as `activation_categories`), with the largest
  clearance: the distance to the nearest box or to the image border, whichever is nearer
  (the centre of the largest free disc in the image, so that its points stay on the
  picture); ValueError when every candidate lies in a box. Ties go to the first candidate
  in row-major order.

The unit itself is the top layer's output position nearest to the chosen point
(`locate_unit`); its centre (`LayerOffsets.output_to_image`) is what is drawn and what the
mean distance of its sampling points is measured from.

Pictures are HxWx3 uint8 RGB (cv2/numpy only): panels of the canvas's size under a title
strip of TITLE_HEIGHT pixels, separated by PANEL_GAP white columns.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
from torch import nn

from detkit.vis.draw import (_label_of, dim, draw_box_outline, draw_points, draw_roi_bins, draw_unit_marker,
                             to_rgb_uint8)
from detkit.data.coco import kept_annotations
from detkit.study.offset_stats import size_category
from detkit.vis.sampling import (LayerOffsets, RoIBins, capture, check_sampling_request, follow_sampling_points,
                                 locate_unit, select_stage)

__all__ = ["BUCKETS", "PANEL_TITLES", "TITLE_HEIGHT", "PANEL_GAP", "Unit", "UnitSampling", "Canvas",
           "PaperFigures", "ground_truth_boxes", "has_small_and_large", "choose_units", "unit_centres",
           "canvas_size", "upscale", "scale_roi_bins", "sample_units", "compose_panels", "sampling_panels",
           "roi_bin_panels", "paper_figures"]

#: The three units of Figure 5, in panel order.
BUCKETS = ("background", "small", "large")
PANEL_TITLES = {"background": "background", "small": "small object", "large": "large object"}
TITLE_HEIGHT = 36   # pixels of the title strip above every panel
PANEL_GAP = 8       # white pixel columns between panels
_BACKGROUND = (255, 255, 255)
_TITLE_COLOR = (0, 0, 0)


# --------------------------------------------------------------------------- choosing the units

@dataclass(frozen=True)
class Unit:
    """The point an activation unit is chosen for, in original pixels (pixel-index frame).

    bucket: "background", "small" or "large". box: the object's [4] (x1, y1, x2, y2) and
    area (annotation area) for an object, None for background."""

    bucket: str
    point: tuple[float, float]
    box: tuple[float, float, float, float] | None = None
    area: float | None = None


def ground_truth_boxes(annotations: Sequence[Mapping], image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """COCO annotation dicts of one image of (H, W) -> (boxes [N, 4] float64 x1y1x2y2 clipped to
    the image, areas [N]): crowd annotations and boxes left empty by the clipping are dropped,
    as `CocoDetection` does; the area is the annotation's `area` when it is a positive number,
    else the clipped box's w * h."""
    height, width = int(image_size[0]), int(image_size[1])
    boxes, areas = [], []
    for annotation, box in kept_annotations(annotations, width, height):
        x1, y1, x2, y2 = box
        area = annotation.get("area")
        valid = isinstance(area, numbers.Real) and not isinstance(area, bool) and math.isfinite(area) and area > 0
        boxes.append((x1, y1, x2, y2))
        areas.append(float(area) if valid else (x2 - x1) * (y2 - y1))
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(areas, np.float64)


def has_small_and_large(areas: Sequence[float] | np.ndarray) -> bool:
    """Whether the areas hold both a COCO-small and a COCO-large object."""
    buckets = {size_category(float(a)) for a in np.asarray(areas, np.float64).reshape(-1)}
    return {"small", "large"} <= buckets


def _inside(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[M, N] whether point m (pixel-index frame) lies in box n (corner frame, edges included)."""
    x, y = points[:, 0:1] + 0.5, points[:, 1:2] + 0.5
    return (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])


def _clearance(points: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """[M]: distance from each point to the nearest box (0 inside one) or image border."""
    height, width = image_size
    x, y = points[:, 0] + 0.5, points[:, 1] + 0.5
    clearance = np.minimum.reduce([x, width - x, y, height - y])
    for x1, y1, x2, y2 in boxes:  # one box at a time: memory of M, not M x N
        dx = np.maximum.reduce([x1 - x, np.zeros_like(x), x - x2])
        dy = np.maximum.reduce([y1 - y, np.zeros_like(y), y - y2])
        clearance = np.minimum(clearance, np.hypot(dx, dy))
    return clearance


def _object_unit(bucket: str, boxes: np.ndarray, areas: np.ndarray) -> Unit:
    members = [k for k in range(len(boxes)) if size_category(float(areas[k])) == bucket]
    if not members:
        limit = "area < 32^2" if bucket == "small" else "area >= 96^2"
        raise ValueError(f"the image has no {bucket} ground-truth object ({limit} pixels): Figure 5 needs a small "
                         f"and a large one")
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 - 0.5, (boxes[:, 1] + boxes[:, 3]) / 2 - 0.5], axis=1)
    inside = _inside(centres, boxes)

    def alone(k: int) -> bool:
        return not any(inside[k, j] for j in range(len(boxes)) if j != k)

    pool = [k for k in members if alone(k)] or members
    best = max(pool, key=lambda k: (float(areas[k]), -k))  # the largest; the first of equal ones
    return Unit(bucket, (float(centres[best, 0]), float(centres[best, 1])),
                tuple(float(v) for v in boxes[best]), float(areas[best]))


def choose_units(boxes, areas, image_size: tuple[int, int], candidates: np.ndarray | None = None) -> list[Unit]:
    """[background, small, large] Units of Figure 5 (see the module docstring for the rules).

    boxes: [N, 4] x1y1x2y2 and areas [N], original pixels; image_size: (H, W); candidates:
    [M, 2] (x, y) points the background unit may be (e.g. `unit_centres` of the top layer),
    default every pixel of the image. ValueError when the image has no small or no large
    object, or when no candidate lies outside every box."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    areas = np.asarray(areas, np.float64).reshape(-1)
    if len(areas) != len(boxes):
        raise ValueError(f"areas must be one per box: {len(boxes)} boxes, {len(areas)} areas")
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be (H, W) of at least one pixel, got {tuple(image_size)}")
    small, large = _object_unit("small", boxes, areas), _object_unit("large", boxes, areas)
    if candidates is None:
        ys, xs = np.mgrid[0:height, 0:width]
        candidates = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    candidates = np.asarray(candidates, np.float64).reshape(-1, 2)
    on_image = (candidates[:, 0] >= 0) & (candidates[:, 0] < width) & (candidates[:, 1] >= 0) \
        & (candidates[:, 1] < height)
    free = on_image & ~_inside(candidates, boxes).any(axis=1)
    if not free.any():
        raise ValueError(f"every one of the {len(candidates)} candidate units lies inside a ground-truth box: "
                         f"the image has no background unit")
    clearance = np.where(free, _clearance(candidates, boxes, (height, width)), -np.inf)
    x, y = candidates[int(np.argmax(clearance))]
    return [Unit("background", (float(x), float(y))), small, large]


def unit_centres(layer: LayerOffsets) -> np.ndarray:
    """[M, 2] (x, y) original-pixel centres of the layer's output positions on the resized
    image (not on the padding), row-major."""
    rows, cols = layer.valid_output_extent()
    row, col = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    x, y = layer.output_to_image(row.ravel(), col.ravel())
    return np.stack([np.asarray(x), np.asarray(y)], axis=1)


# --------------------------------------------------------------------------- sampling points of the units

@dataclass
class UnitSampling:
    """One unit's sampling points: `position` (row, col) of the top layer, `centre` (x, y) of
    that activation and `points` [9**num_layers, 2] (x, y), all in original pixels."""

    unit: Unit
    position: tuple[int, int]
    centre: tuple[float, float]
    points: np.ndarray

    @property
    def mean_distance(self) -> float:
        """Mean distance of the sampling points from the unit's centre, original pixels."""
        return float(np.hypot(self.points[:, 0] - self.centre[0], self.points[:, 1] - self.centre[1]).mean())

    @property
    def on_object(self) -> bool:
        """Whether the unit's centre lies in its object's box (False for background)."""
        if self.unit.box is None:
            return False
        return bool(_inside(np.array([self.centre]), np.array([self.unit.box]))[0, 0])


def _stack(layers: Sequence[LayerOffsets], num_layers: int, stage: str | None) -> list[LayerOffsets]:
    chosen = select_stage(layers, stage)
    if len(chosen) < num_layers:
        where = f"stage {stage}" if stage is not None else "the model"
        raise ValueError(f"{where} has {len(chosen)} deformable conv layers but num_layers={num_layers} needs "
                         f"{num_layers}")
    return list(chosen[-num_layers:])


def sample_units(layers: Sequence[LayerOffsets], units: Sequence[Unit], num_layers: int = 3,
                 stage: str | None = None, offset_group: int = 0) -> list[UnitSampling]:
    """The deepest level of `follow_sampling_points` (9**num_layers points) for each unit, through
    the last `num_layers` deformable layers of `stage` (None: of the network)."""
    stack = _stack(layers, int(num_layers), stage)
    out = []
    for unit in units:
        levels = follow_sampling_points(stack, unit.point, int(num_layers), offset_group=offset_group)
        row, col = locate_unit(stack[-1], unit.point)
        x, y = stack[-1].output_to_image(row, col)
        out.append(UnitSampling(unit, (row, col), (float(x), float(y)), levels[-1]))
    return out


# --------------------------------------------------------------------------- the canvas

def canvas_size(image_size: tuple[int, int], min_canvas: int) -> tuple[int, int]:
    """(Hc, Wc) of an image of (H, W) upscaled, aspect kept, so that its shorter side is at least
    `min_canvas` pixels (the shorter side becomes exactly min_canvas; never downscaled)."""
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be (H, W) of at least one pixel, got {tuple(image_size)}")
    if int(min_canvas) < 1:
        raise ValueError(f"min_canvas must be at least 1 pixel, got {min_canvas}")
    short = min(height, width)
    if short >= int(min_canvas):
        return height, width
    scale = int(min_canvas) / short
    if height <= width:
        return int(min_canvas), max(int(min_canvas), round(width * scale))
    return max(int(min_canvas), round(height * scale)), int(min_canvas)


@dataclass(frozen=True)
class Canvas:
    """An image resized for drawing: `pixels` [Hc, Wc, 3] uint8 RGB of an original image of
    `original_size` (H, W). Original pixel-index x maps to (x + 0.5) * sx - 0.5 (the bilinear
    resize's own rule), corner-frame coordinates to x * sx, with (sx, sy) = (Wc / W, Hc / H)."""

    pixels: np.ndarray
    original_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): canvas pixels per original pixel."""
        return self.pixels.shape[1] / self.original_size[1], self.pixels.shape[0] / self.original_size[0]

    def map_points(self, points) -> np.ndarray:
        """Points [N, 2] (x, y) original pixel-index frame -> canvas pixel-index frame."""
        sx, sy = self.scale
        points = np.asarray(points, np.float64).reshape(-1, 2)
        return (points + 0.5) * np.array([sx, sy]) - 0.5

    def map_boxes(self, boxes) -> np.ndarray:
        """Boxes [N, 4] (x1, y1, x2, y2, corner frame) original pixels -> canvas pixels."""
        sx, sy = self.scale
        return np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])

    def copy(self) -> np.ndarray:
        return self.pixels.copy()


def upscale(image, min_canvas: int = 512, fade: float = 0.4) -> Canvas:
    """The image (Tensor [3, H, W] RGB in [0, 1] or HxWx3 uint8 RGB) resized bilinearly to
    `canvas_size(..., min_canvas)` and faded towards grey by `fade` (`dim`), as a Canvas."""
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    out_h, out_w = canvas_size((height, width), min_canvas)
    pixels = rgb if (out_h, out_w) == (height, width) else cv2.resize(rgb, (out_w, out_h),
                                                                       interpolation=cv2.INTER_LINEAR)
    pixels = np.ascontiguousarray(pixels)
    if fade > 0:
        dim(pixels, fade)
    return Canvas(pixels, (height, width))


def scale_roi_bins(bins: RoIBins, sx: float, sy: float) -> RoIBins:
    """The bins with their box and bin rectangles (corner frame) scaled by (sx, sy); the
    normalised offsets and the mask stay as they are."""
    factor = np.array([sx, sy, sx, sy], np.float64)
    return replace(bins, box=np.asarray(bins.box, np.float64) * factor, regular=bins.regular * factor,
                   shifted=bins.shifted * factor)


# --------------------------------------------------------------------------- panels

def _title_strip(width: int, title: str) -> np.ndarray:
    strip = np.full((TITLE_HEIGHT, width, 3), _BACKGROUND, np.uint8)
    font, thickness, font_scale = cv2.FONT_HERSHEY_SIMPLEX, 2, 0.8
    (text_w, text_h), baseline = cv2.getTextSize(title, font, font_scale, thickness)
    if text_w > width - 8:  # long titles shrink to fit the panel
        font_scale *= (width - 8) / text_w
        (text_w, text_h), baseline = cv2.getTextSize(title, font, font_scale, thickness)
    origin = ((width - text_w) // 2, (TITLE_HEIGHT + text_h) // 2)
    cv2.putText(strip, title, origin, font, font_scale, _TITLE_COLOR, thickness, cv2.LINE_AA)
    return strip


def compose_panels(panels: Sequence[np.ndarray], titles: Sequence[str]) -> np.ndarray:
    """Panels (HxWx3 uint8 RGB, all of one size) side by side under their titles: an array of
    (TITLE_HEIGHT + H, n * W + (n - 1) * PANEL_GAP, 3), white between the panels."""
    if not panels:
        raise ValueError("compose_panels needs at least one panel")
    if len(titles) != len(panels):
        raise ValueError(f"titles must be one per panel: {len(panels)} panels, {len(titles)} titles")
    height, width = panels[0].shape[:2]
    if any(panel.shape != (height, width, 3) for panel in panels):
        raise ValueError(f"panels must all be {height}x{width}x3, got {[tuple(p.shape) for p in panels]}")
    out = np.full((TITLE_HEIGHT + height, len(panels) * width + (len(panels) - 1) * PANEL_GAP, 3), _BACKGROUND,
                  np.uint8)
    for index, (panel, title) in enumerate(zip(panels, titles)):
        left = index * (width + PANEL_GAP)
        out[:TITLE_HEIGHT, left:left + width] = _title_strip(width, title)
        out[TITLE_HEIGHT:, left:left + width] = panel
    return out


def sampling_panels(canvas: Canvas, samplings: Sequence[UnitSampling], boxes=None, point_radius: float = 2.0,
                    alpha: float = 0.35) -> np.ndarray:
    """Figure 5: one panel per UnitSampling (titled by PANEL_TITLES of its bucket) on copies of
    `canvas`: its points (`draw_points`, radius and alpha on the canvas), the unit's centre
    (`draw_unit_marker`), the object's box thin; on a background panel every ground-truth box
    of `boxes` ([N, 4] original pixels) thin and faint."""
    ground_truth = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, np.float64).reshape(-1, 4)
    panels, titles = [], []
    for sampling in samplings:
        panel = canvas.copy()
        if sampling.unit.box is not None:
            draw_box_outline(panel, canvas.map_boxes([sampling.unit.box])[0])
        else:
            for box in canvas.map_boxes(ground_truth):
                draw_box_outline(panel, box, alpha=0.5)
        draw_points(panel, canvas.map_points(sampling.points), radius=point_radius, alpha=alpha)
        draw_unit_marker(panel, canvas.map_points([sampling.centre])[0])
        panels.append(panel)
        titles.append(PANEL_TITLES.get(sampling.unit.bucket, sampling.unit.bucket))
    return compose_panels(panels, titles)


def roi_bin_panels(canvas: Canvas, bins: Sequence[RoIBins],
                   class_names: Mapping | Sequence | None = None) -> np.ndarray:
    """Figure 7: one panel per RoI (`draw_roi_bins` on a copy of `canvas`, the bins mapped to
    it), titled "class score" (the label number without class_names)."""
    if not bins:
        raise ValueError("roi_bin_panels needs at least one RoI")
    sx, sy = canvas.scale
    panels, titles = [], []
    for roi in bins:
        panels.append(draw_roi_bins(canvas.copy(), scale_roi_bins(roi, sx, sy)))
        name = "RoI" if roi.label is None else _label_of(roi.label, class_names)
        titles.append(name if roi.score is None else f"{name} {roi.score:.2f}")
    return compose_panels(panels, titles)


# --------------------------------------------------------------------------- both figures

@dataclass
class PaperFigures:
    """What `paper_figures` made: fig5 and fig7 (HxWx3 uint8 RGB, or None and why in
    fig5_skipped / fig7_skipped), the units' samplings, the RoI bins (original pixels), the
    canvas and the names of the deformable conv layers followed."""

    fig5: np.ndarray | None
    fig7: np.ndarray | None
    fig7_skipped: str | None
    samplings: list[UnitSampling]
    roi_bins: list[RoIBins]
    canvas: Canvas
    layer_names: list[str] = field(default_factory=list)
    class_names: Mapping | Sequence | None = None
    fig5_skipped: str | None = None

    def summary(self) -> dict:
        """A JSON-ready dict: the layers, the canvas, per unit its point, centre (x, y original
        pixels), bucket, box, area, number of points and mean distance, and per RoI its box,
        score, label and mean bin shift (original pixels)."""
        units = []
        for sampling in self.samplings:
            unit = sampling.unit
            units.append({"bucket": unit.bucket, "x": sampling.centre[0], "y": sampling.centre[1],
                          "point": list(unit.point), "position": list(sampling.position),
                          "box": None if unit.box is None else list(unit.box), "area": unit.area,
                          "on_object": sampling.on_object, "num_points": int(len(sampling.points)),
                          "mean_distance": sampling.mean_distance})
        rois = []
        for roi in self.roi_bins:
            shift = np.hypot(roi.shift[..., 0], roi.shift[..., 1])
            rois.append({"box": [float(v) for v in roi.box], "score": roi.score, "label": roi.label,
                         "class_name": None if roi.label is None else _label_of(roi.label, self.class_names),
                         "feature": roi.feature, "mean_bin_shift": float(shift.mean()),
                         "modulated": roi.mask is not None})
        height, width = self.canvas.pixels.shape[:2]
        return {"layers": list(self.layer_names),
                "num_points": int(len(self.samplings[0].points)) if self.samplings else 0,
                "canvas": {"width": width, "height": height, "scale": list(self.canvas.scale)},
                "units": units, "roi_bins": rois, "fig5_skipped": self.fig5_skipped,
                "fig7_skipped": self.fig7_skipped}


def paper_figures(model: nn.Module, image, boxes, areas, num_layers: int = 3, stage: str | None = None,
                  top_k: int = 3, min_canvas: int = 512, class_names: Mapping | Sequence | None = None,
                  point_radius: float = 2.0, alpha: float = 0.35) -> PaperFigures:
    """Figures 5 and 7 of one image (Tensor [3, H, W] RGB in [0, 1], or HxWx3 uint8 RGB) with its
    ground-truth boxes [N, 4] (x1y1x2y2, original pixels) and areas [N].

    One hooked forward (`capture`, the model's mode kept); the units (`choose_units`, the
    background one among the top layer's `unit_centres`) are followed through the last
    `num_layers` deformable convs of `stage` (None: of the network). Figure 7 shows the RoI
    bins of the `top_k` highest-scoring detections; it is None (fig7_skipped says why) when the
    RoI pooler is not deformable, top_k is 0 or nothing was detected; Figure 5 is None
    (fig5_skipped) when the model's only deformable layers are its RoI pooler's (DCNv1's
    deformable-pooling-only row). ValueError when the model has no deformable layer, the stage
    has fewer than num_layers, the image has no small or no large object or no background unit
    (for Figure 5), or neither figure can be drawn."""
    used = check_sampling_request(model, stage, int(num_layers))
    if int(top_k) < 0:
        raise ValueError(f"top_k must be 0 or more, got {top_k}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    areas = np.asarray(areas, np.float64).reshape(-1)
    if used:
        for bucket in ("small", "large"):  # before the forward: the cheap refusal first
            _object_unit(bucket, boxes, areas)
    result = capture(model, image, top_k=int(top_k))
    canvas = upscale(image, min_canvas)
    stack, samplings, fig5, fig5_skipped = [], [], None, "the model has no deformable conv layers"
    if used:
        stack = _stack(result.layers, used, stage)
        units = choose_units(boxes, areas, result.geometry.original_size, candidates=unit_centres(stack[-1]))
        samplings = sample_units(stack, units, used)
        fig5 = sampling_panels(canvas, samplings, boxes, point_radius=point_radius, alpha=alpha)
        fig5_skipped = None
    skipped = None
    if not result.deformable_pooling:
        skipped = "the RoI pooler is not deformable"
    elif int(top_k) == 0:
        skipped = "top_k=0"
    elif not result.roi_bins:
        skipped = "the model detected nothing on the image"
    if fig5 is None and skipped:
        raise ValueError(f"nothing to draw: {fig5_skipped} (no Figure 5) and {skipped} (no Figure 7)")
    fig7 = None if skipped else roi_bin_panels(canvas, result.roi_bins, class_names)
    return PaperFigures(fig5, fig7, skipped, samplings, list(result.roi_bins), canvas,
                        [layer.name for layer in stack], class_names, fig5_skipped)
