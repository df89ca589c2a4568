"""detkit.study.figures (the DCNv1 Figures 5 and 7) and tools/paper_figures.py end to end.

The unit chooser and the canvas are checked on hand-made boxes and images; the tool runs in
subprocesses (started together in one module fixture, OMP_NUM_THREADS=1) on tiny detector
checkpoints and a two-image COCO folder that the fixture writes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from detkit.study.figures import (Canvas, Unit, UnitSampling, canvas_size, choose_units, compose_panels,
                                  ground_truth_boxes, has_small_and_large, paper_figures, sampling_panels, upscale)
from detkit.vis import draw_points
from detkit.vis.draw import POINT_COLOR, UNIT_COLOR
from detkit.study.figures import PANEL_GAP, TITLE_HEIGHT
from tests.vis.builders import build_tiny, smooth_image, write_coco_folder
from tests.vis.test_tools import NEWER_KINDS, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
TOOL = str(REPO / "tools" / "paper_figures.py")


def inside_any(point, boxes) -> bool:
    x, y = point[0] + 0.5, point[1] + 0.5
    return any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in np.asarray(boxes).reshape(-1, 4))


# --------------------------------------------------------------------------- choosing the units

def test_background_unit_is_the_centre_of_the_largest_free_disc():
    # 100 x 200 image, its left half one large object (a small one inside it): the free right
    # half is a 100 x 100 square whose centre (150, 50) (corner frame) is 50 from the box and
    # from the border. The pixel centres nearest to it, (149.5 | 150.5, 49.5 | 50.5), are 49.5
    # away; the first of them in row-major order is pixel (149, 49).
    boxes = [[0, 0, 100, 100], [10, 10, 20, 20]]
    background, small, large = choose_units(boxes, [100 * 100, 10 * 10], (100, 200))
    assert background.bucket == "background" and background.box is None and background.area is None
    assert background.point == (149.0, 49.0)
    assert not inside_any(background.point, boxes)
    assert small.bucket == "small" and small.box == (10.0, 10.0, 20.0, 20.0) and small.point == (14.5, 14.5)
    assert large.bucket == "large" and large.box == (0.0, 0.0, 100.0, 100.0) and large.area == 10000.0


def test_background_unit_is_chosen_among_the_candidates_outside_every_box():
    boxes = [[0, 0, 100, 100], [10, 10, 20, 20]]
    # (50, 50) is inside the large box, (100, 50) on its edge (100.5 > 100: outside), (199, 99)
    # in the corner (0.5 from the border), (160, 60) the freest.
    candidates = np.array([[50.0, 50.0], [199.0, 99.0], [160.0, 60.0], [100.0, 50.0]])
    background = choose_units(boxes, [10000, 100], (100, 200), candidates=candidates)[0]
    assert background.point == (160.0, 60.0)
    with pytest.raises(ValueError, match="no background unit"):
        choose_units(boxes, [10000, 100], (100, 200), candidates=candidates[:1])
    with pytest.raises(ValueError, match="no background unit"):       # every pixel of the image is in a box
        choose_units([[0, 0, 200, 100], [10, 10, 20, 20]], [20000, 100], (100, 200))


def test_small_and_large_units_pick_their_coco_buckets_by_annotation_area():
    annotations = [
        {"bbox": [0, 0, 10, 10], "area": 100},           # small
        {"bbox": [50, 50, 20, 20], "area": 400},         # small
        {"bbox": [100, 0, 60, 60], "area": 3600},        # medium
        {"bbox": [300, 0, 40, 40], "area": 500},         # small by its annotation area (box: 1600, medium)
        {"bbox": [0, 100, 100, 100]},                    # no area: the box's, 10000, large
        {"bbox": [120, 100, 120, 120], "area": 14400},   # large, the largest
        {"bbox": [0, 230, 400, 60], "area": 24000, "iscrowd": 1},   # crowd: not an object
        {"bbox": [390, 290, 50, 50], "area": 0},         # clipped to 10 x 10; area 0: the box's, 100
    ]
    boxes, areas = ground_truth_boxes(annotations, (300, 400))
    assert boxes.shape == (7, 4) and areas.tolist() == [100, 400, 3600, 500, 10000, 14400, 100]
    assert boxes[-1].tolist() == [390, 290, 400, 300]
    assert has_small_and_large(areas) and not has_small_and_large(areas[:4])
    _, small, large = choose_units(boxes, areas, (300, 400))
    assert small.box == (300.0, 0.0, 340.0, 40.0) and small.area == 500 and small.point == (319.5, 19.5)
    assert large.box == (120.0, 100.0, 240.0, 220.0) and large.area == 14400 and large.point == (179.5, 159.5)


def test_object_units_prefer_a_centre_on_that_object_alone():
    # The biggest large object has a small one at its centre; the other large one is chosen.
    boxes = [[0, 0, 200, 200], [90, 90, 110, 110], [250, 0, 350, 100]]
    _, small, large = choose_units(boxes, [40000, 400, 10000], (300, 400))
    assert large.box == (250.0, 0.0, 350.0, 100.0)
    assert small.box == (90.0, 90.0, 110.0, 110.0)      # covered by the big one, but the only small one


@pytest.mark.parametrize("areas, missing", [([3000, 10000], "no small"), ([100, 3000], "no large")])
def test_choose_units_needs_a_small_and_a_large_object(areas, missing):
    boxes = [[0, 0, 50, 60], [60, 0, 160, 100]]
    with pytest.raises(ValueError, match=missing):
        choose_units(boxes, areas, (200, 300))


def test_mean_distance_is_measured_from_the_unit_centre():
    points = np.array([[13.0, 24.0], [10.0, 20.0], [7.0, 16.0], [10.0, 30.0]])   # 5, 0, 5 and 10 away
    sampling = UnitSampling(Unit("small", (9.0, 21.0), (0.0, 0.0, 30.0, 30.0), 900.0), (0, 0), (10.0, 20.0),
                            points)
    assert sampling.mean_distance == pytest.approx(5.0)
    assert sampling.on_object
    assert not UnitSampling(Unit("background", (50.0, 50.0)), (0, 0), (50.0, 50.0), points).on_object


# --------------------------------------------------------------------------- the canvas

@pytest.mark.parametrize("size, min_canvas, expected", [
    ((100, 200), 512, (512, 1024)), ((300, 150), 512, (1024, 512)), ((77, 91), 512, (512, 605)),
    ((600, 800), 512, (600, 800)), ((120, 130), 120, (120, 130))])
def test_canvas_short_side_reaches_min_canvas_and_keeps_the_aspect(size, min_canvas, expected):
    assert canvas_size(size, min_canvas) == expected
    height, width = expected
    assert min(height, width) >= min_canvas
    assert abs(width / height - size[1] / size[0]) <= 1 / min(height, width)


def test_points_map_to_the_canvas_by_the_resize_scale():
    # An 80 x 100 image upscaled to a 160 px short side: 2 canvas pixels per image pixel, so
    # pixel (10, 20) (centre) is canvas (20.5, 40.5) and the box corner (10, 20) canvas (20, 40).
    image = np.zeros((80, 100, 3), np.uint8)
    image[20, 10] = 255
    canvas = upscale(image, min_canvas=160, fade=0)
    assert canvas.pixels.shape == (160, 200, 3) and canvas.scale == (2.0, 2.0)
    assert canvas.map_points([[10, 20]]).tolist() == [[20.5, 40.5]]
    assert canvas.map_boxes([[10, 20, 30, 40]]).tolist() == [[20, 40, 60, 80]]
    # The bright pixel, resized bilinearly, is centred where map_points puts it ...
    weight = canvas.pixels[..., 0].astype(np.float64)
    ys, xs = np.mgrid[0:160, 0:200]
    assert (weight * xs).sum() / weight.sum() == pytest.approx(20.5)
    assert (weight * ys).sum() / weight.sum() == pytest.approx(40.5)
    # ... and a point drawn at the mapped position is centred there too.
    drawn = draw_points(np.zeros((160, 200, 3), np.uint8), canvas.map_points([[10, 20]]), radius=2.0, alpha=1.0)
    red = drawn[..., 0].astype(np.float64)
    assert (red * xs).sum() / red.sum() == pytest.approx(20.5, abs=0.1)
    assert (red * ys).sum() / red.sum() == pytest.approx(40.5, abs=0.1)
    assert np.argwhere(red > 0)[:, 1].max() - np.argwhere(red > 0)[:, 1].min() <= 6   # a small dot


def test_overlapping_points_build_up_their_colour():
    once = draw_points(np.zeros((20, 20, 3), np.uint8), [[10, 10]], radius=2.0, alpha=0.35)
    thrice = draw_points(np.zeros((20, 20, 3), np.uint8), [[10, 10]] * 3, radius=2.0, alpha=0.35)
    assert once[10, 10, 0] == pytest.approx(0.35 * POINT_COLOR[0], abs=1)
    assert thrice[10, 10, 0] == pytest.approx((1 - 0.65 ** 3) * POINT_COLOR[0], abs=2)


def test_sampling_panels_put_each_unit_and_its_points_in_its_own_panel():
    canvas = upscale(np.full((80, 100, 3), 128, np.uint8), min_canvas=160, fade=0)
    box = (40.0, 30.0, 60.0, 50.0)
    samplings = [UnitSampling(Unit(bucket, (0.0, 0.0), None if bucket == "background" else box,
                                   None if bucket == "background" else 400.0),
                              (0, 0), (50.0 + 10 * k, 40.0), np.array([[10.0 + 20 * k, 20.0]] * 4))
                 for k, bucket in enumerate(("background", "small", "large"))]
    figure = sampling_panels(canvas, samplings, boxes=[box], alpha=0.5)
    height, width = canvas.pixels.shape[:2]
    assert figure.shape == (TITLE_HEIGHT + height, 3 * width + 2 * PANEL_GAP, 3)
    for k in range(3):
        left = k * (width + PANEL_GAP)
        panel = figure[TITLE_HEIGHT:, left:left + width].astype(int)
        assert (figure[:TITLE_HEIGHT, left:left + width].sum(axis=2) < 200).any()   # a dark title
        if k < 2:
            assert (figure[:, left + width:left + width + PANEL_GAP] == 255).all()    # the white gap
        for j in range(3):   # panel k has its own points, not the other panels'
            x, y = canvas.map_points([[10.0 + 20 * j, 20.0]])[0].round().astype(int)
            redder = panel[y, x, 0] - panel[y, x, 1] > 60
            assert redder == (j == k), (k, j)
        ux, uy = canvas.map_points([samplings[k].centre])[0]
        ring = panel[int(round(uy)) - 1:int(round(uy)) + 2, int(round(ux + 7)) - 1:int(round(ux + 7)) + 2]
        assert (np.abs(ring - np.array(UNIT_COLOR)).max(axis=2) < 60).any()        # the green ring
    with pytest.raises(ValueError, match="titles must be one per panel"):
        compose_panels([canvas.pixels], [])


def test_canvas_scale_is_per_axis():
    canvas = Canvas(np.zeros((512, 605, 3), np.uint8), (77, 91))
    sx, sy = canvas.scale
    assert sx == 605 / 91 and sy == 512 / 77
    assert canvas.map_points([[90.5, 76.5]])[0] == pytest.approx([604.5, 511.5])   # the far corner stays the corner


def test_pooling_only_models_draw_figure_7_alone():
    """DCNv1's deformable-pooling-only row has no sampling points to follow: Figure 5 is skipped
    (with the reason), Figure 7 is drawn; with nothing to draw at all it is an error."""
    pooling_only = build_tiny(backbone={"deform_blocks": {}}, pooler_kind="deform")
    boxes, areas = [[10, 10, 110, 110], [112, 5, 124, 17]], [10000, 144]
    figures = paper_figures(pooling_only, smooth_image(120, 130), boxes, areas, top_k=2)
    assert figures.fig5 is None and "no deformable conv layers" in figures.fig5_skipped
    assert figures.fig7 is not None and figures.fig7_skipped is None and len(figures.roi_bins) == 2
    summary = figures.summary()
    assert summary["units"] == [] and summary["num_points"] == 0 and summary["layers"] == []
    assert summary["fig5_skipped"] == figures.fig5_skipped
    with pytest.raises(ValueError, match="nothing to draw: the model has no deformable conv layers .* top_k=0"):
        paper_figures(pooling_only, smooth_image(120, 130), boxes, areas, top_k=0)


# --------------------------------------------------------------------------- tools/paper_figures.py

IMAGES = {1: (80, 100), 2: (120, 130)}
BOXES = {1: [[5, 5, 20, 20], [40, 20, 50, 50]],          # small, medium: no large object
         2: [[10, 10, 100, 100], [112, 5, 12, 12]]}      # large, small
TOP_K = 2


def write_coco(folder: Path) -> tuple[Path, Path]:
    return write_coco_folder(folder, IMAGES, BOXES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper_figures")
    dcn, align, plain = tmp / "dcn.pth", tmp / "align.pth", tmp / "plain.pth"
    write_checkpoint(dcn)
    write_checkpoint(align, pooler_kind="align")
    write_checkpoint(plain, backbone={"deform_blocks": {}}, pooler_kind="align")
    kinds = {kind: tmp / f"{kind}.pth" for kind in NEWER_KINDS}
    kind_layers = {kind: write_checkpoint(path, backbone=NEWER_KINDS[kind]) for kind, path in kinds.items()}
    images, annotations = write_coco(tmp)
    data = [f"images={images}", f"annotations={annotations}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "DETKIT_CACHE": str(tmp / "cache")}
    commands = {
        "dcn": [f"checkpoint={dcn}", *data, f"top_k={TOP_K}"],
        "align": [f"checkpoint={align}", *data, f"output_dir={tmp / 'align_out'}"],
        "no_deformable": [f"checkpoint={plain}", *data],
        "no_image_with_both": [f"checkpoint={dcn}", *data, "max_images=1"],
        "image_without_large": [f"checkpoint={dcn}", *data, "image_index=0"],
        **{f"kind_{kind}": [f"checkpoint={path}", *data, f"top_k={TOP_K}"] for kind, path in kinds.items()},
    }
    processes = {key: subprocess.Popen([sys.executable, TOOL, *args, f"hydra.run.dir={tmp / 'runs' / key}"],
                                       cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for key, args in commands.items()}
    results = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[key] = (process.returncode, stdout, stderr)
    return {"results": results, "tmp": tmp, "kind_layers": kind_layers}


def read_rgb(path: Path) -> np.ndarray:
    picture = cv2.imread(str(path))
    assert picture is not None, f"{path} is missing or unreadable"
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)


def test_tool_writes_fig5_fig7_and_figures_json(runs):
    code, stdout, stderr = runs["results"]["dcn"]
    assert code == 0, stderr
    out = runs["tmp"] / "runs" / "dcn"
    summary = json.loads((out / "figures.json").read_text())
    # The first image holding a small and a large object is the second one.
    assert summary["image"] == {"index": 1, "id": 2, "file_name": "2.png", "width": 130, "height": 120}
    assert summary["num_points"] == 9 ** 3 and len(summary["layers"]) == 3
    units = summary["units"]
    assert [unit["bucket"] for unit in units] == ["background", "small", "large"]
    assert all(unit["num_points"] == 729 for unit in units)
    assert all(np.isfinite(unit["mean_distance"]) and unit["mean_distance"] > 0 for unit in units)
    image_boxes = [[x, y, x + w, y + h] for x, y, w, h in BOXES[2]]
    assert units[0]["box"] is None and not inside_any((units[0]["x"], units[0]["y"]), image_boxes)
    assert units[1]["box"] == [112, 5, 124, 17] and units[1]["area"] == 144
    assert units[2]["box"] == [10, 10, 110, 110] and units[2]["area"] == 10000
    for unit in units:
        assert 0 <= unit["x"] < 130 and 0 <= unit["y"] < 120
    # Figure 5: three panels of the upscaled image (shorter side 512) under their titles.
    height, width = canvas_size(IMAGES[2], 512)
    assert summary["canvas"]["width"] == width and summary["canvas"]["height"] == height
    fig5 = read_rgb(out / "fig5_sampling.png")
    assert fig5.shape == (TITLE_HEIGHT + height, 3 * width + 2 * PANEL_GAP, 3)
    bare = upscale(read_rgb(runs["tmp"] / "images" / "2.png"), 512).pixels.astype(int)
    panels = [fig5[TITLE_HEIGHT:, k * (width + PANEL_GAP):k * (width + PANEL_GAP) + width].astype(int)
              for k in range(3)]
    for k, panel in enumerate(panels):
        assert np.abs(panel - bare).sum() > 0
        assert not np.array_equal(panel, panels[(k + 1) % 3])
    # Figure 7: one panel per top detection.
    assert len(summary["roi_bins"]) == TOP_K and summary["fig7_skipped"] is None
    scores = [roi["score"] for roi in summary["roi_bins"]]
    assert scores == sorted(scores, reverse=True)
    fig7 = read_rgb(out / "fig7_roi_bins.png")
    assert fig7.shape == (TITLE_HEIGHT + height, TOP_K * width + (TOP_K - 1) * PANEL_GAP, 3)
    assert summary["fig7"] == str(out / "fig7_roi_bins.png")


def test_tool_skips_fig7_for_a_pooler_that_is_not_deformable(runs):
    code, stdout, stderr = runs["results"]["align"]
    assert code == 0, stderr
    out = runs["tmp"] / "align_out"
    assert (out / "fig5_sampling.png").is_file() and not (out / "fig7_roi_bins.png").exists()
    summary = json.loads((out / "figures.json").read_text())
    assert summary["fig7"] is None and "not deformable" in summary["fig7_skipped"]
    assert summary["roi_bins"] == [] and all(unit["num_points"] == 729 for unit in summary["units"])
    assert "fig7 skipped: the RoI pooler is not deformable" in stdout + stderr


@pytest.mark.parametrize("key, message", [
    ("no_deformable", "no deformable layers"),
    ("no_image_with_both", "none of the first 1 images"),
    ("image_without_large", "no large ground-truth object"),
])
def test_tool_errors_are_one_line_with_exit_status_2(runs, key, message):
    code, _, stderr = runs["results"][key]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert not (runs["tmp"] / "runs" / key / "fig5_sampling.png").exists()


# The sampling points each newer kind's layer follows per level: DCNv3 and DCNv4 place k*k taps
# (with remove_center the centre is followed too, with weight 0: the geometry of the
# layer's sampling_offsets), the offset sampling layer one (a 1x1 filter).
POINTS_PER_LAYER = {"dcnv3": 9, "dcnv4": 9, "offset_sampling": 1}


@pytest.mark.parametrize("kind", sorted(NEWER_KINDS))
def test_tool_draws_and_measures_every_newer_kind(runs, kind):
    code, _, stderr = runs["results"][f"kind_{kind}"]
    assert code == 0, stderr
    out = runs["tmp"] / "runs" / f"kind_{kind}"
    summary = json.loads((out / "figures.json").read_text())
    followed = runs["kind_layers"][kind][-3:]
    assert summary["layers"] == followed, (summary["layers"], followed)
    points = POINTS_PER_LAYER[kind] ** 3
    assert summary["num_points"] == points
    assert [unit["bucket"] for unit in summary["units"]] == ["background", "small", "large"]
    assert all(unit["num_points"] == points and np.isfinite(unit["mean_distance"]) for unit in summary["units"])
    assert (out / "fig5_sampling.png").is_file() and (out / "fig7_roi_bins.png").is_file()
    assert len(summary["roi_bins"]) == TOP_K

