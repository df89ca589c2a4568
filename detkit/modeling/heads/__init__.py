"""RoI heads: feature pooling (plain or deformable); the RPN. The box head and predictor are
torchvision's (`detkit.modeling.build.build_roi_heads`)."""
from detkit.modeling.heads.poolers import POOLER_KINDS, RoIPooler, boxes_to_rois, fpn_levels
from detkit.modeling.heads.rpn import build_rpn

__all__ = ["POOLER_KINDS", "RoIPooler", "boxes_to_rois", "build_rpn", "fpn_levels"]
