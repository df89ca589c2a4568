"""How much of a box AP (or of a difference of two) is the validation set: a paired bootstrap
over its images.

A validation set of a few hundred images is itself a sample: another draw of images from the
same distribution gives another AP. Resampling the images with replacement (the bootstrap)
and recomputing COCO AP on each resample measures that spread; resampling the same images
for every model (paired) measures it for their difference, which is what an ablation reads.

COCOeval's per-image matching (`COCOeval.evaluate`, the costly part) depends on one image's
ground truth and detections only, so it runs once per model; each resample then re-weights
those per-image results (an image drawn twice counts twice) and re-runs only
`COCOeval.accumulate` and `summarize`. This relies on pycocotools' layout of
`COCOeval.evalImgs`: one entry per (category, area range, image) in that nesting order,
for `params.catIds`, `params.areaRng` and `params.imgIds`.

Detections are COCO results (image_id, category_id, bbox [x, y, w, h] in the ground
truth's pixels, score), as a run's detections.json holds them.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.evaluation.coco_eval import load_coco_results

__all__ = ["ImageEvaluation", "evaluate_images", "load_detections", "resampled_ap", "bootstrap_ap",
           "BootstrapSummary", "summarize_bootstrap"]


@dataclass(frozen=True)
class ImageEvaluation:
    """COCOeval after `evaluate()` on every image of the ground truth (bbox, all its
    categories), ready to be re-accumulated on resamples of those images."""
    coco_eval: COCOeval
    image_ids: tuple[int, ...]

    @functools.cached_property
    def ap(self) -> float:
        """Box AP (IoU .50:.95, all areas, 100 detections) on all the images, in percent
        (accumulated once: the tool checks it against metrics.json and prints it)."""
        return resampled_ap(self, np.arange(len(self.image_ids)))


def load_detections(path: str | Path) -> list[dict[str, Any]]:
    """A detections.json (COCO results: a list of {image_id, category_id, bbox, score})."""
    path = Path(path)
    try:
        detections = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(detections, list) or not all(
            isinstance(d, dict) and {"image_id", "category_id", "bbox", "score"} <= set(d) for d in detections):
        raise ValueError(f"{path} must hold COCO results: a list of {{image_id, category_id, bbox, score}}")
    return detections


def evaluate_images(coco_gt: COCO, detections: Sequence[Mapping[str, Any]]) -> ImageEvaluation:
    """Match `detections` to `coco_gt` image by image (COCOeval.evaluate) over all its images
    and categories. ValueError for a detection on an image or category the ground truth lacks."""
    image_ids = tuple(sorted(coco_gt.getImgIds()))
    known_images, known_categories = set(image_ids), set(coco_gt.getCatIds())
    for d in detections:
        if d["image_id"] not in known_images:
            raise ValueError(f"a detection's image_id {d['image_id']} is not an image of the ground truth")
        if d["category_id"] not in known_categories:
            raise ValueError(f"a detection's category_id {d['category_id']} is not a category of the ground truth")
    coco_dt = load_coco_results(coco_gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.params.catIds = sorted(known_categories)
        coco_eval.evaluate()
    return ImageEvaluation(coco_eval, image_ids)


def resampled_ap(evaluation: ImageEvaluation, sample: np.ndarray) -> float:
    """Box AP in percent on the images `evaluation.image_ids[sample]` (indices; repeats count
    as that many copies of the image), NaN where no ground truth is left."""
    source = evaluation.coco_eval
    num_images = len(evaluation.image_ids)
    num_areas = len(source.params.areaRng)
    ids = [evaluation.image_ids[i] for i in sample]
    resampled = copy.copy(source)
    resampled.params = copy.deepcopy(source.params)
    resampled.params.imgIds = ids
    resampled._paramsEval = copy.deepcopy(source._paramsEval)
    resampled._paramsEval.imgIds = ids
    resampled.evalImgs = [source.evalImgs[(k * num_areas + a) * num_images + i]
                          for k in range(len(source.params.catIds)) for a in range(num_areas) for i in sample]
    with contextlib.redirect_stdout(io.StringIO()):
        resampled.accumulate()
        resampled.summarize()
    ap = resampled.stats[0]
    return float(ap) * 100 if ap >= 0 else math.nan


def bootstrap_ap(evaluations: Sequence[ImageEvaluation], draws: int = 200, seed: int = 0) -> np.ndarray:
    """(draws, models) box APs in percent, each row on one resample (with replacement) of the
    images, the same resample for every model. The evaluations must share their images."""
    if draws < 2:
        raise ValueError(f"draws must be at least 2, got {draws}")
    if not evaluations:
        raise ValueError("bootstrap_ap needs at least one evaluation")
    image_ids = evaluations[0].image_ids
    if any(e.image_ids != image_ids for e in evaluations):
        raise ValueError("the evaluations cover different images: compare runs evaluated on the same validation set")
    rng = np.random.default_rng(seed)
    values = np.empty((draws, len(evaluations)))
    for d in range(draws):
        sample = rng.integers(0, len(image_ids), len(image_ids))
        values[d] = [resampled_ap(e, sample) for e in evaluations]
    return values


@dataclass(frozen=True)
class BootstrapSummary:
    ap: tuple[float, ...]                    # per model, on all images
    sd: tuple[float, ...]                    # per model, over the resamples
    difference_sd: tuple[float | None, ...]  # per model: of (model - first model); None for the first
    difference_interval: tuple[tuple[float, float] | None, ...]   # 2.5 and 97.5 percentiles of it


def summarize_bootstrap(evaluations: Sequence[ImageEvaluation], values: np.ndarray) -> BootstrapSummary:
    """The spread of each model's AP and of its difference to the first model, from
    `bootstrap_ap`'s `values` (draws, models)."""
    differences = values - values[:, :1]
    return BootstrapSummary(
        ap=tuple(e.ap for e in evaluations),
        sd=tuple(float(v) for v in np.nanstd(values, axis=0, ddof=1)),
        difference_sd=(None, *(float(np.nanstd(differences[:, j], ddof=1)) for j in range(1, values.shape[1]))),
        difference_interval=(None, *((float(np.nanpercentile(differences[:, j], 2.5)),
                                      float(np.nanpercentile(differences[:, j], 97.5)))
                                     for j in range(1, values.shape[1]))))
