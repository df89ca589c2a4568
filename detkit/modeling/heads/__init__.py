"""RoI heads: feature pooling (plain or deformable) and the box head; the RPN."""
from detkit.modeling.heads.box_head import (FastRCNNPredictor, FastRCNNPredictorBuilder, TwoMLPHead,
                                            TwoMLPHeadBuilder)
from detkit.modeling.heads.poolers import POOLER_KINDS, RoIPooler, RoIPoolerBuilder, boxes_to_rois, fpn_levels
from detkit.modeling.heads.rpn import RPNBuilder, build_rpn

__all__ = ["POOLER_KINDS", "FastRCNNPredictor", "FastRCNNPredictorBuilder", "RPNBuilder", "RoIPooler",
           "RoIPoolerBuilder", "TwoMLPHead", "TwoMLPHeadBuilder", "boxes_to_rois", "build_rpn", "fpn_levels"]
