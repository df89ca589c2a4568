"""Faster R-CNN assembled from built parts: transform, backbone, optional neck, RPN, RoI heads.

The RPN (`torchvision.models.detection.rpn.RegionProposalNetwork`), the RoI heads
(`torchvision.models.detection.roi_heads.RoIHeads`: proposal matching and sampling,
box coding, losses, score threshold, per-class NMS, detections per image) and the
transform (`GeneralizedRCNNTransform`: ImageNet normalisation, resize by the shorter
side with a cap on the longer one, zero-padded batching to a multiple of 32, boxes
mapped back to input pixels) are torchvision's. `detkit.modeling.build` builds them
from plain arguments.

What this module adds: input checks with errors naming the image, the clipping of
ground-truth boxes to their image (see `clip_targets_to_image`), feature routing (the
RPN sees only `rpn_in_features`; the RoI pooler picks its own maps from all features),
and detections clamped to the input image (`postprocess`).

The forms of these steps that a trace needs (the ONNX export) sit beside the parts they
mirror: the transform's in `detkit.modeling.transform`, the RPN's batched proposal filter in
`detkit.modeling.heads.rpn`, the RoI heads' batched post-processing in
`detkit.modeling.heads.roi_heads`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image


def clip_targets_to_image(boxes: Tensor, labels: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Clip boxes [N, 4] (x1, y1, x2, y2) to an image of (height, width); drop the empty ones.

    A box partly outside keeps its part inside the image; a box wholly outside (or
    touching the image only along an edge) has no width or height left and is removed
    with its label. Returns (boxes [M, 4], labels [M]), M <= N, in the input order.
    """
    height, width = image_size
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    clipped = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], labels[keep]


class FasterRCNN(nn.Module):
    """Two-stage detector: transform -> backbone -> (neck) -> RPN -> RoI heads -> postprocess.

    Args:
        backbone: image [B, 3, H, W] (normalised, padded) -> {name: feature map}.
        rpn: torchvision RegionProposalNetwork; it is given only `rpn_in_features`, in
            that order (its anchor generator has one size group per feature map).
        roi_heads: torchvision RoIHeads; its `box_roi_pool` receives all features
            (backbone's, or the neck's when there is one) and picks its own.
        transform: torchvision GeneralizedRCNNTransform.
        neck: optional module mapping backbone features to the features used by the
            heads (e.g. `detkit.modeling.neck.FPN`).
        rpn_in_features: names of the feature maps the RPN runs on, e.g. ["res4"] or
            ["p2", "p3", "p4", "p5", "p6"].
        num_classes: number of classes including the background (label 0).

    forward(images, targets=None):
        images: list of [3, H_i, W_i] float RGB in [0, 1]; sizes may differ.
        targets (required in training, ignored in eval): one dict per image with
            "boxes" [N, 4] float (x1, y1, x2, y2) in input pixels and "labels" [N]
            int64 in [1, num_classes - 1]; N may be 0. Boxes are clipped to their
            image and those left empty dropped (`clip_targets_to_image`); other keys
            are ignored.
        Training returns {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
        "loss_box_reg"} scalars. Eval returns per image {"boxes": [D, 4] float in the
        input image's pixels, inside it; "scores": [D]; "labels": [D] int64}.

    Raises ValueError (TypeError for wrong types/dtypes) naming the image index for:
    missing targets in training, a target without "boxes"/"labels", boxes not [N, 4]
    float, non-finite boxes, degenerate boxes (x2 <= x1 or y2 <= y1), labels outside
    [1, num_classes - 1].
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: GeneralizedRCNNTransform, neck: nn.Module | None = None, *,
                 rpn_in_features: Sequence[str], num_classes: int) -> None:
        super().__init__()
        if isinstance(rpn_in_features, str):
            rpn_in_features = [rpn_in_features]
        self.rpn_in_features = tuple(str(n) for n in rpn_in_features)
        if not self.rpn_in_features:
            raise ValueError("rpn_in_features must name at least one feature map")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes counts the background and must be at least 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        cls_score = getattr(getattr(roi_heads, "box_predictor", None), "cls_score", None)
        if isinstance(cls_score, nn.Linear) and cls_score.out_features != self.num_classes:
            raise ValueError(f"roi_heads.box_predictor scores {cls_score.out_features} classes but "
                             f"num_classes is {self.num_classes}")
        self.transform = transform
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads

    def _check_images(self, images: Sequence[Tensor]) -> None:
        if isinstance(images, Tensor) or not isinstance(images, Sequence) or not images:
            raise TypeError("images must be a non-empty list of [3, H, W] tensors")
        for i, image in enumerate(images):
            if not isinstance(image, Tensor):
                raise TypeError(f"image {i} must be a Tensor [3, H, W], got {type(image).__name__}")
            if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(f"image {i} must have shape [3, H, W] (RGB, non-empty), got {tuple(image.shape)}")
            if not image.is_floating_point():
                raise TypeError(f"image {i} must be floating point (RGB in [0, 1]), got {image.dtype}")

    def _checked_targets(self, images: Sequence[Tensor],
                         targets: Sequence[Mapping[str, Tensor]] | None) -> list[dict[str, Tensor]]:
        """Validate the targets and return {"boxes", "labels"} per image, clipped to the image."""
        if targets is None:
            raise ValueError("targets are required in training mode (one dict with 'boxes' and 'labels' "
                             "per image)")
        if isinstance(targets, Mapping) or not isinstance(targets, Sequence) or len(targets) != len(images):
            raise ValueError(f"targets must be a list with one dict per image ({len(images)} images)")
        checked = []
        for i, (image, target) in enumerate(zip(images, targets)):
            if not isinstance(target, Mapping):
                raise TypeError(f"target of image {i} must be a dict, got {type(target).__name__}")
            for key in ("boxes", "labels"):
                if key not in target:
                    raise ValueError(f"target of image {i} has no {key!r} (keys: {list(target)})")
            boxes, labels = target["boxes"], target["labels"]
            if not isinstance(boxes, Tensor) or not isinstance(labels, Tensor):
                raise TypeError(f"target of image {i}: 'boxes' and 'labels' must be Tensors")
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes of image {i} must have shape [N, 4] (x1, y1, x2, y2), "
                                 f"got {tuple(boxes.shape)}")
            if not boxes.is_floating_point():
                raise TypeError(f"boxes of image {i} must be floating point, got {boxes.dtype}")
            if labels.dtype != torch.int64:
                raise TypeError(f"labels of image {i} must be int64, got {labels.dtype}")
            if labels.shape != boxes.shape[:1]:
                raise ValueError(f"labels of image {i} must have shape [{boxes.shape[0]}] (one per box), "
                                 f"got {tuple(labels.shape)}")
            if boxes.device != image.device or labels.device != image.device:
                raise ValueError(f"target of image {i} is on {boxes.device}/{labels.device} but the image "
                                 f"is on {image.device}")
            bad = ~torch.isfinite(boxes).all(dim=1)
            if bool(bad.any()):
                j = int(torch.where(bad)[0][0])
                raise ValueError(f"image {i}: box {j} {boxes[j].tolist()} is not finite")
            bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if bool(bad.any()):
                j = int(torch.where(bad)[0][0])
                raise ValueError(f"image {i}: box {j} {boxes[j].tolist()} is degenerate "
                                 "(needs x2 > x1 and y2 > y1)")
            bad = (labels < 1) | (labels >= self.num_classes)
            if bool(bad.any()):
                j = int(torch.where(bad)[0][0])
                raise ValueError(f"image {i}: label {int(labels[j])} of box {j} is outside "
                                 f"[1, {self.num_classes - 1}] (0 is the background)")
            boxes, labels = clip_targets_to_image(boxes, labels, (image.shape[1], image.shape[2]))
            checked.append({"boxes": boxes, "labels": labels})
        return checked

    def features(self, tensors: Tensor) -> dict[str, Tensor]:
        """The feature maps of a batched, normalised input [B, 3, H, W]: the backbone's, through
        the neck when there is one ({"res2".., } or {"p2"..})."""
        features = self.backbone(tensors)
        if self.neck is not None:
            features = self.neck(features)
        return features

    def detect(self, batch: ImageList, targets: list[dict[str, Tensor]] | None = None
               ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """The network on a transformed batch: backbone -> neck -> RPN -> RoI heads ->
        (detections in the batch's network-input pixels, {loss name: scalar} in training, else
        empty). `forward` runs it between the transform and `postprocess`; the ONNX export's
        per-image forward runs the same between `detkit.modeling.transform.transform_images`
        and `postprocess`."""
        features = self.features(batch.tensors)
        missing = [n for n in self.rpn_in_features if n not in features]
        if missing:
            raise ValueError(f"rpn_in_features {missing} are not among the features {list(features)}")
        rpn_features = OrderedDict((n, features[n]) for n in self.rpn_in_features)
        proposals, rpn_losses = self.rpn(batch, rpn_features, targets)
        detections, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return detections, {**rpn_losses, **head_losses}

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        self._check_images(images)
        input_sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        model_targets = self._checked_targets(images, targets) if self.training else None
        batch, model_targets = self.transform(list(images), model_targets)
        detections, losses = self.detect(batch, model_targets)
        if self.training:
            return losses
        return self.postprocess(detections, batch.image_sizes, input_sizes)

    def postprocess(self, detections: list[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                    input_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Eval detections in the pixels of the transformed images (of `image_sizes`) -> in those
        of the input images (of `input_sizes`), clamped to them: the transform's postprocess,
        then the clamp (mapping back can overshoot the border by a rounding error). `forward`
        runs it after `detect`; the ONNX export's per-image forward runs the same with sizes
        read from tensor shapes (`clip_boxes_to_image` keeps them dynamic in a trace)."""
        detections = self.transform.postprocess(detections, list(image_sizes), list(input_sizes))
        for det, size in zip(detections, input_sizes):
            det["boxes"] = clip_boxes_to_image(det["boxes"], size)
        return detections
