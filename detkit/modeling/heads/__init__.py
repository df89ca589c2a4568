"""RoI heads: feature pooling (plain or deformable) and the box head."""
from detkit.modeling.heads.box_head import (FastRCNNPredictor, FastRCNNPredictorBuilder, TwoMLPHead,
                                            TwoMLPHeadBuilder)
from detkit.modeling.heads.poolers import POOLER_KINDS, RoIPooler, boxes_to_rois, fpn_levels

__all__ = ["POOLER_KINDS", "FastRCNNPredictor", "FastRCNNPredictorBuilder", "RoIPooler", "TwoMLPHead",
           "TwoMLPHeadBuilder", "boxes_to_rois", "fpn_levels"]
