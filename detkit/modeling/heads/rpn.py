"""The region proposal network: torchvision's RPN built from plain options.

`build_rpn(in_channels, anchor_sizes, aspect_ratios, ...)`: an `AnchorGenerator` with one
group of sizes per feature map, one shared `RPNHead` and a `RegionProposalNetwork`.
`detkit.modeling.build.build_faster_rcnn` calls it with the model config's flat
`anchor_sizes` (null: the layout's default), `aspect_ratios` and `rpn_options` (the keyword
arguments after them).
"""
from __future__ import annotations

from collections.abc import Sequence

from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

__all__ = ["ASPECT_RATIOS", "build_rpn"]

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def build_rpn(in_channels: int, anchor_sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[float],
              pre_nms_top_n_train: int = 2000, pre_nms_top_n_test: int = 1000,
              post_nms_top_n_train: int = 2000, post_nms_top_n_test: int = 1000, nms_thresh: float = 0.7,
              fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
              positive_fraction: float = 0.5, score_thresh: float = 0.0) -> RegionProposalNetwork:
    """RPN over feature maps of `in_channels` channels, one group of `anchor_sizes` per map.

    Every map gets `aspect_ratios` (height / width) for each of its sizes; all maps need
    the same number of anchors per position (one RPNHead is shared). pre/post_nms_top_n
    are per feature map / per image, as in torchvision. Proposals are (x1, y1, x2, y2)
    boxes in network-input pixels.
    """
    sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    ratios = tuple(float(r) for r in aspect_ratios)
    if not sizes or not all(sizes) or not ratios:
        raise ValueError(f"anchor_sizes (one non-empty group per feature map) and aspect_ratios must be "
                         f"non-empty, got {sizes} and {ratios}")
    if len({len(level) for level in sizes}) != 1:
        raise ValueError(f"every feature map needs the same number of anchor sizes (the RPN head is "
                         f"shared), got {sizes}")
    anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes))
    head = RPNHead(int(in_channels), anchor_generator.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        anchor_generator, head, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
        batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        pre_nms_top_n={"training": int(pre_nms_top_n_train), "testing": int(pre_nms_top_n_test)},
        post_nms_top_n={"training": int(post_nms_top_n_train), "testing": int(post_nms_top_n_test)},
        nms_thresh=nms_thresh, score_thresh=score_thresh)
