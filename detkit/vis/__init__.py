"""Visualising deformable layers: where they sample (the pictures of DCNv1 Figures
5 and 7).

- `sampling`: hooked capture of offsets/masks (`capture`, `capture_deformable_offsets`),
  stacked sampling points (`follow_sampling_points`), deformable RoI bins (`roi_bins`).
- `draw`: OpenCV drawing on the original image; `sampling_figure` is the one-call picture.

Tool: tools/visualize.py. The study's pictures built on these (the papers' Figures 5 and 7,
the offset statistics of Table 2) are `detkit.study.figures` and `detkit.study.offset_stats`.
"""
from detkit.vis.draw import (draw_box_outline, draw_detections, draw_points, draw_roi_bins, draw_sampling_points,
                             draw_unit_marker, sampling_figure, save_png, to_rgb_uint8)
from detkit.vis.sampling import (Capture, ImageGeometry, LayerOffsets, RoIBins, capture,
                                 capture_deformable_offsets, check_sampling_request, deformable_roi_bins,
                                 follow_sampling_points, has_deformable_pooling, locate_unit, roi_bins,
                                 select_stage)

__all__ = [
    "Capture", "ImageGeometry", "LayerOffsets", "RoIBins", "capture", "capture_deformable_offsets",
    "check_sampling_request", "deformable_roi_bins", "follow_sampling_points", "has_deformable_pooling",
    "locate_unit", "roi_bins", "select_stage",
    "draw_detections", "draw_roi_bins", "draw_sampling_points", "sampling_figure", "save_png", "to_rgb_uint8",
    "draw_points", "draw_unit_marker", "draw_box_outline",
]
