"""COCO box evaluation of a detector on a dataset, shared by training and tools/eval.py.

One ordered pass over the dataset (each process its contiguous shard when
distributed, gathered on every rank), COCOeval on rank 0. Images are fed
`batch_size` at a time (default 1: a batch is zero-padded to its largest image, so
with more than one image per batch the border features, and the numbers, depend on
which images share a batch). Inference runs in float32 so that a checkpoint
evaluated later reproduces the numbers of the run that wrote it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn
from tqdm import tqdm

from detkit.data.coco import CocoDetection
from detkit.data.loader import build_test_loader
from detkit.utils import comm as dist
from detkit.evaluation.coco_eval import COCOEvaluator

__all__ = ["evaluate_detector", "coco_stats_table", "per_class_table"]

logger = logging.getLogger(__name__)


# The 12 numbers of COCOeval.summarize(), in its order.
_STATS_LABELS = (
    ("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100), ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100),
)


@torch.inference_mode()
def evaluate_detector(model: nn.Module, dataset: CocoDetection, device: torch.device | str,
                      label_to_category_id: Mapping[int, int] | None = None, batch_size: int = 1,
                      num_workers: int = 0) -> tuple[dict[str, float] | None, COCOEvaluator]:
    """Run `model` (eval mode) over `dataset` and COCO-evaluate its boxes.

    `label_to_category_id`: the model's labels -> category ids (default: the
    dataset's). Predictions of labels whose category is not in the dataset are
    dropped (e.g. a 91-label torchvision model on COCO's 80 categories).
    Collective when distributed: every rank must call it. Returns (metrics on
    rank 0 / None elsewhere, the evaluator holding the gathered detections).

    Progress: a tqdm bar of rank 0's batches on stderr, shown only when stderr is a
    terminal (tqdm's disable=None), so logs and CI output stay clean; it is cleared
    when the pass ends.
    """
    mapping = dict(label_to_category_id if label_to_category_id is not None else dataset.label_to_category_id)
    mapping = {int(k): int(v) for k, v in mapping.items() if int(v) in dataset.coco.cats}
    uncovered = sorted(set(dataset.coco.cats) - set(mapping.values()))
    if uncovered:
        raise ValueError(f"the model does not predict the dataset's category ids {uncovered[:10]} "
                         f"({len(uncovered)} of {len(dataset.coco.cats)})")
    known = torch.tensor(sorted(mapping))
    distributed = dist.get_world_size() > 1
    loader = build_test_loader(dataset, batch_size=batch_size, num_workers=num_workers, distributed=distributed)
    evaluator = COCOEvaluator(dataset.coco, mapping, verbose=False)
    was_training = model.training
    model.eval()
    progress = tqdm(loader, desc="evaluation", unit="batch", leave=False,
                    disable=None if dist.is_main_process() else True)
    for images, targets in progress:
        outputs = model([image.to(device) for image in images])
        outputs = [{k: v.cpu() for k, v in out.items()} for out in outputs]
        for out in outputs:
            keep = torch.isin(out["labels"], known)
            if not bool(keep.all()):
                for k in ("boxes", "scores", "labels"):
                    out[k] = out[k][keep]
        evaluator.update(outputs, targets)
    model.train(was_training)
    evaluator.gather()
    metrics = evaluator.evaluate() if dist.is_main_process() else None
    return metrics, evaluator


def coco_stats_table(evaluator: COCOEvaluator) -> str:
    """COCOeval's 12 summary numbers (percent), one per line."""
    if evaluator.coco_eval is None:
        return "(no detections to evaluate)"
    lines = []
    for (kind, iou, area, dets), value in zip(_STATS_LABELS, evaluator.coco_eval.stats):
        shown = f"{100 * value:6.2f}" if value >= 0 else "   n/a"
        lines.append(f"  {kind} @ IoU={iou:<9} area={area:<6} maxDets={dets:<3} = {shown}")
    return "\n".join(lines)


def per_class_table(metrics: Mapping[str, float]) -> str:
    """Per-class AP lines from evaluate()'s "bbox/AP-<name>" keys."""
    prefix = "bbox/AP-"
    rows = [(k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)]
    width = max((len(name) for name, _ in rows), default=5)
    return "\n".join(f"  {name:<{width}}  {v:6.2f}" if not math.isnan(v) else f"  {name:<{width}}     n/a"
                     for name, v in rows)
