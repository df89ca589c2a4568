"""Evaluation: COCO box AP of detector outputs (pycocotools)."""
from detkit.evaluation.coco_eval import COCOEvaluator, predictions_to_coco

__all__ = ["COCOEvaluator", "predictions_to_coco"]
