"""Box head of the Faster R-CNN RoI head: torchvision's, used as is.

- `TwoMLPHead(in_channels, representation_size)`: flatten the pooled RoI features
  [K, C, s, s] (in_channels = C * s * s) then fc6, ReLU, fc7, ReLU -> [K, representation_size].
  This is the DCN papers' "2fc" head (two 1024-d fc layers).
- `FastRCNNPredictor(in_channels, num_classes)`: `cls_score` -> [K, num_classes] logits
  (class 0 is background) and `bbox_pred` -> [K, 4 * num_classes] box deltas.

Parameter names (fc6, fc7, cls_score, bbox_pred) are torchvision's, so torchvision
Faster R-CNN checkpoints map onto `roi_heads.box_head.*` and `roi_heads.box_predictor.*`.
"""
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

__all__ = ["FastRCNNPredictor", "TwoMLPHead"]
