"""Visualising deformable layers: where they sample (DCNv1 Figures 5 and 7) and their
effective dilation (DCNv1 Table 2).

- `sampling`: hooked capture of offsets/masks (`capture`, `capture_deformable_offsets`),
  stacked sampling points (`follow_sampling_points`), deformable RoI bins (`roi_bins`).
- `draw`: OpenCV drawing on the original image; `sampling_figure` is the one-call picture.
- `offset_stats`: effective dilation per layer by object size (`OffsetStatistics`).
- `figures`: the papers' Figures 5 and 7 on an upscaled image (`paper_figures`: units on
  background / a small / a large object, `choose_units`, `sampling_panels`, `roi_bin_panels`).

Tools: tools/visualize.py, tools/analyze_offsets.py and tools/paper_figures.py.
"""
from detkit.vis.draw import (draw_box_outline, draw_detections, draw_points, draw_roi_bins, draw_sampling_points,
                             draw_unit_marker, sampling_figure, save_png, to_rgb_uint8)
from detkit.vis.figures import (Canvas, PaperFigures, Unit, UnitSampling, canvas_size, choose_units,
                                compose_panels, ground_truth_boxes, has_small_and_large, paper_figures,
                                roi_bin_panels, sample_units, sampling_panels, scale_roi_bins, unit_centres,
                                upscale)
from detkit.vis.offset_stats import (CATEGORIES, OffsetStatistics, activation_categories, effective_dilation,
                                     sampling_positions, table2_markdown)
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
    "Canvas", "PaperFigures", "Unit", "UnitSampling", "canvas_size", "choose_units", "compose_panels",
    "ground_truth_boxes", "has_small_and_large", "paper_figures", "roi_bin_panels", "sample_units",
    "sampling_panels", "scale_roi_bins", "unit_centres", "upscale",
    "CATEGORIES", "OffsetStatistics", "table2_markdown", "activation_categories", "effective_dilation", "sampling_positions",
]
