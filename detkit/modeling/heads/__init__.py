"""RoI heads: feature pooling (plain or deformable) and the box head."""
from detkit.modeling.heads.box_head import FastRCNNPredictor, TwoMLPHead
from detkit.modeling.heads.poolers import POOLER_KINDS, RoIPooler, boxes_to_rois, fpn_levels

__all__ = ["POOLER_KINDS", "FastRCNNPredictor", "RoIPooler", "TwoMLPHead", "boxes_to_rois", "fpn_levels"]
