"""COCO box evaluation of detector outputs with pycocotools.

Box convention: the model returns boxes x1y1x2y2 in the pixels of the image it
was given. When the dataset resized that image (`target["scale"]`: resized
pixels per original pixel, set by `detkit.data.transforms.ResizeShortestSide`),
the evaluator divides the boxes by the scale to return to the original image's
pixels, which is what the ground-truth JSON uses; a target without "scale"
means scale 1. `scale` may also be a pair (scale_x, scale_y). When the target
has "orig_size" (height, width), the mapped boxes are clipped to it. Boxes are
then written as COCO [x, y, w, h] with the category id of their label
(`label_to_category_id`).

Which images count: only the images seen by `update` (every target's
`image_id`, whether or not it has detections) are evaluated, so evaluating a
subset of a split is fair; an image seen twice (e.g. a distributed sampler's
padding duplicates) keeps its last predictions.

Numbers are in percent (0-100). A value pycocotools reports as -1 (no ground
truth in that area range, or for that class) is returned as NaN.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCOEvaluator", "coco_records", "load_coco_results", "predictions_to_coco"]

logger = logging.getLogger(__name__)

#: The box metrics every detkit evaluation reports ("bbox/<key>" in metrics.json), in COCOeval's order.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _scale_xy(target: Mapping[str, Any]) -> tuple[float, float]:
    scale = target.get("scale", 1.0)
    scale = _as_numpy(scale).astype(np.float64).reshape(-1)
    if scale.size == 1:
        return float(scale[0]), float(scale[0])
    if scale.size == 2:
        return float(scale[0]), float(scale[1])
    raise ValueError(f"target['scale'] must be a number or (scale_x, scale_y); got {scale.tolist()}")


def _rounded(value: Any, digits: int | None) -> float:
    return float(value) if digits is None else round(float(value), digits)


def load_coco_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """COCO results ([{image_id, category_id, bbox, score}]) as the COCO object COCOeval takes
    beside `coco_gt`; an empty list gives an empty result set over the ground truth's images
    (pycocotools' loadRes refuses one). The entries are copied: loadRes adds keys to them."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                       "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def coco_records(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, label_to_category_id: Mapping[int, int],
                 bbox_digits: int | None = None, score_digits: int | None = None,
                 **fields: Any) -> list[dict[str, Any]]:
    """COCO result records of one image's detections.

    boxes [N, 4] float64 (x1, y1, x2, y2, pixels) become "bbox" [x, y, w, h]; scores [N];
    labels [N] model labels become "category_id" through `label_to_category_id` (KeyError for
    a label it lacks). Each record is {**fields, "category_id", "bbox", "score"} (that key
    order), the bbox values rounded to `bbox_digits` decimals and the score to `score_digits`
    (None: exact floats).
    """
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [{**fields, "category_id": int(label_to_category_id[int(label)]),
             "bbox": [_rounded(v, bbox_digits) for v in box], "score": _rounded(score, score_digits)}
            for box, score, label in zip(xywh, scores, labels)]


def predictions_to_coco(prediction: Mapping[str, Any], target: Mapping[str, Any],
                        label_to_category_id: Mapping[int, int]) -> list[dict[str, Any]]:
    """One image's model output -> COCO result entries in the original image's pixels (see module doc),
    bbox rounded to 3 decimals and score to 5 (`coco_records`)."""
    image_id = int(_as_numpy(target["image_id"]).reshape(-1)[0])
    boxes = _as_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _as_numpy(prediction["scores"]).astype(np.float64).reshape(-1)
    labels = _as_numpy(prediction["labels"]).astype(np.int64).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    if len(boxes) == 0:
        return []
    sx, sy = _scale_xy(target)
    if sx <= 0 or sy <= 0:
        raise ValueError(f"image {image_id}: scale must be positive; got {(sx, sy)}")
    boxes = boxes / np.array([sx, sy, sx, sy])
    if "orig_size" in target:
        h, w = (float(v) for v in _as_numpy(target["orig_size"]).reshape(-1)[:2])
        boxes = np.clip(boxes, 0.0, np.array([w, h, w, h]))
    unknown = sorted(set(labels.tolist()) - set(label_to_category_id))
    if unknown:
        raise ValueError(f"image {image_id}: predicted labels {unknown[:5]} have no category id "
                         f"(known labels: {sorted(label_to_category_id)[:10]}...)")
    return coco_records(boxes, scores, labels, label_to_category_id, bbox_digits=3, score_digits=5,
                        image_id=image_id)


class COCOEvaluator:
    """Accumulates predictions, gathers them across processes, runs COCOeval (bbox).

    Usage::

        evaluator = COCOEvaluator(dataset.coco, dataset.label_to_category_id)
        for images, targets in loader:
            evaluator.update(model(images), targets)
        evaluator.gather()                 # all ranks (no-op without torch.distributed)
        if is_main_process:
            metrics = evaluator.evaluate() # {"bbox/AP": ..., "bbox/AP-<class>": ...}

    Args:
        coco_gt: the ground truth (pycocotools COCO, e.g. `CocoDetection.coco`).
        label_to_category_id: contiguous model label -> COCO category id. Only
            these categories are evaluated (all of the ground truth's when the
            mapping covers them).
        verbose: log the standard 12-line COCOeval summary in `evaluate` (INFO, logger
            "detkit.evaluation.coco_eval"); `summary` holds it either way.
    """

    def __init__(self, coco_gt: COCO, label_to_category_id: Mapping[int, int], verbose: bool = True) -> None:
        self.coco_gt = coco_gt
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        missing = sorted(set(self.label_to_category_id.values()) - set(coco_gt.cats))
        if missing:
            raise ValueError(f"category ids {missing[:10]} are not in the ground truth")
        self.verbose = verbose
        self.coco_eval: COCOeval | None = None
        self.summary: str | None = None  # COCOeval.summarize()'s text, set by evaluate()
        self.reset()

    def reset(self) -> None:
        """Forget all predictions."""
        self._results: dict[int, list[dict[str, Any]]] = {}
        self.coco_eval = None
        self.summary = None

    def update(self, predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add a batch: model outputs and the matching targets (for image_id, scale, orig_size)."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            image_id = int(_as_numpy(target["image_id"]).reshape(-1)[0])
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            self._results[image_id] = predictions_to_coco(prediction, target, self.label_to_category_id)

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images seen so far (sorted)."""
        return sorted(self._results)

    def gather(self) -> None:
        """Merge every rank's predictions into every rank (torch.distributed.all_gather_object).

        A no-op unless a process group with more than one process is initialised.
        Collective: all ranks must call it.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, self._results)
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in gathered:
            merged.update(part)
        self._results = merged

    def results(self) -> list[dict[str, Any]]:
        """The detections in COCO results format ([{image_id, category_id, bbox, score}]), by image id."""
        return [entry for image_id in sorted(self._results) for entry in self._results[image_id]]

    def evaluate(self) -> dict[str, float]:
        """Run COCOeval on the seen images and return the metrics in percent.

        Keys: "bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm",
        "bbox/APl" and "bbox/AP-<class name>" per evaluated category (AP over
        IoU .50:.95, all areas, 100 detections). NaN where COCOeval has no
        ground truth (an area range or a class absent from the seen images).
        With no image seen, every value is NaN. The COCOeval object stays in
        `self.coco_eval` and its 12-line summary text in `self.summary`.
        """
        cat_ids = sorted(set(self.label_to_category_id.values()))
        names = {c: str(self.coco_gt.cats[c].get("name", c)) for c in cat_ids}
        if not self._results:
            metrics = {f"bbox/{k}": math.nan for k in SUMMARY_KEYS}
            metrics.update({f"bbox/AP-{names[c]}": math.nan for c in cat_ids})
            return metrics
        coco_dt = load_coco_results(self.coco_gt, self.results())
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = self.image_ids
        coco_eval.params.catIds = cat_ids
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            coco_eval.summarize()
        self.summary = summary.getvalue()
        if self.verbose:
            logger.info("COCOeval summary:\n%s", self.summary.rstrip("\n"))
        self.coco_eval = coco_eval

        stats = coco_eval.stats
        metrics = {f"bbox/{k}": (float(stats[i]) * 100 if stats[i] >= 0 else math.nan)
                   for i, k in enumerate(SUMMARY_KEYS)}
        # precision: [IoU thresholds, recall thresholds, categories, area ranges, max dets]
        precision = coco_eval.eval["precision"]
        area_all = list(coco_eval.params.areaRngLbl).index("all")
        max_dets = list(coco_eval.params.maxDets).index(100)
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, area_all, max_dets]
            p = p[p > -1]
            metrics[f"bbox/AP-{names[cat_id]}"] = float(p.mean()) * 100 if p.size else math.nan
        return metrics
