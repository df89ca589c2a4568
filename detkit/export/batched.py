"""A dynamic-batch eval forward of a detkit FasterRCNN, for files whose batch size is free.

torchvision's RPN proposal filter, RoI post-processing and transform loop over the images
in Python, which a trace unrolls (fixing the batch). `BatchedDetector` computes the same
thing for a batch of images of one size with every image in the same tensors:

- the transform, anchors and box decoding once for the batch (one image size, so one set of
  anchors and one clamp);
- per-image selections as index arithmetic: NMS of all images at once with the group of a
  box being (image, level) in the RPN and (image, class) in the RoI heads (torchvision's
  coordinate trick keeps groups apart, as its per-image NMS keeps levels or classes apart),
  then the first k per image in score order from a running count per image (CumSum), the
  kept boxes ordered by (image, score) as torchvision concatenates them.

Outputs: boxes [D, 4] in input pixels, scores [D], labels [D], image_index [D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from detkit.export.detector import resize_like_eager
from detkit.modeling.detector import FasterRCNN


def first_per_image(order: Tensor, image: Tensor, k: int, num_images: Tensor) -> Tensor:
    """Of `order` (indices sorted by decreasing score), the first k of each image, returned
    ordered by (image, rank): what a per-image `keep[:k]`, concatenated, gives."""
    img = image[order]
    onehot = (img[:, None] == torch.arange(num_images)[None, :]).to(torch.int64)   # [N, B]
    rank = (torch.cumsum(onehot, dim=0) * onehot).sum(dim=1) - 1
    selected = torch.where(rank < k)[0]
    key = img[selected] * k + rank[selected]                                          # unique
    return order[selected][torch.argsort(key)]


class BatchedDetector(nn.Module):
    """images [B, 3, H, W] (B free when traced) -> (boxes, scores, labels, image_index)."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        transform, rpn, heads = model.transform, model.rpn, model.roi_heads
        num_images = torch._shape_as_tensor(images)[0]                                # 0-dim int64
        original = torch._shape_as_tensor(images)[2:]
        mean = torch.as_tensor(transform.image_mean, dtype=images.dtype)[None, :, None, None]
        std = torch.as_tensor(transform.image_std, dtype=images.dtype)[None, :, None, None]
        x = resize_like_eager((images - mean) / std, int(transform.min_size[-1]), int(transform.max_size))
        resized = torch._shape_as_tensor(x)[2:]
        stride = transform.size_divisible
        padded = (torch.ceil(resized.to(torch.float32) / stride) * stride).to(torch.int64)
        pad = padded - resized
        x = F.pad(x, (0, pad[1], 0, pad[0]))
        size = (resized[0], resized[1])                             # the resized size, as tensors

        features = model.features(x)
        rpn_maps = [features[n] for n in model.rpn_in_features]

        # ---- RPN (RegionProposalNetwork.forward + filter_proposals, all images at once)
        objectness, deltas = rpn.head(rpn_maps)
        anchors = rpn.anchor_generator(ImageList(x[:1], [size]), rpn_maps)[0]          # [N, 4], one image's
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        batch = images.shape[0]
        all_anchors = anchors.unsqueeze(0).expand(batch, -1, -1).reshape(-1, 4)
        proposals = rpn.box_coder.decode_single(deltas.detach(), all_anchors).view(batch, -1, 4)
        objectness = objectness.reshape(batch, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_level)])
        levels = levels.reshape(1, -1).expand_as(objectness)
        top = rpn._get_top_n_idx(objectness, per_level)
        rows = torch.arange(batch)[:, None]
        scores = torch.sigmoid(objectness[rows, top]).reshape(-1)
        lvl = levels[rows, top].reshape(-1)
        boxes = clip_boxes_to_image(proposals[rows, top].reshape(-1, 4), size)
        img = rows.expand_as(top).reshape(-1)
        keep = remove_small_boxes(boxes, rpn.min_size)
        boxes, scores, lvl, img = boxes[keep], scores[keep], lvl[keep], img[keep]
        keep = torch.where(scores >= rpn.score_thresh)[0]
        boxes, scores, lvl, img = boxes[keep], scores[keep], lvl[keep], img[keep]
        keep = batched_nms(boxes, scores, img * len(per_level) + lvl, rpn.nms_thresh)
        keep = first_per_image(keep, img, rpn.post_nms_top_n(), num_images)
        rois = torch.cat([img[keep, None].to(boxes.dtype), boxes[keep]], dim=1)     # (image, score) order

        # ---- RoI heads (box head + postprocess_detections, all images at once)
        pooled = heads.box_roi_pool.pool_rois(features, rois)   # RoIPooler, or its GatherRoIPooler at opset 22
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        num_classes = class_logits.shape[-1]
        pred = heads.box_coder.decode_single(box_regression, rois[:, 1:]).reshape(rois.shape[0], -1, 4)
        pred = clip_boxes_to_image(pred, size)
        probs = F.softmax(class_logits, -1)
        labels = torch.arange(num_classes).view(1, -1).expand_as(probs)
        roi_img = rois[:, 0].to(torch.int64)[:, None].expand_as(probs)
        boxes = pred[:, 1:].reshape(-1, 4)
        scores, labels, img = probs[:, 1:].reshape(-1), labels[:, 1:].reshape(-1), roi_img[:, 1:].reshape(-1)
        keep = torch.where(scores > heads.score_thresh)[0]
        boxes, scores, labels, img = boxes[keep], scores[keep], labels[keep], img[keep]
        keep = remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, img = boxes[keep], scores[keep], labels[keep], img[keep]
        keep = batched_nms(boxes, scores, img * num_classes + labels, heads.nms_thresh)
        keep = first_per_image(keep, img, heads.detections_per_img, num_images)
        boxes, scores, labels, img = boxes[keep], scores[keep], labels[keep], img[keep]

        # ---- back to input pixels (transform.postprocess), clamped to the image
        ratio = original.to(torch.float32) / resized.to(torch.float32)                 # (h, w)
        boxes = boxes * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
        boxes = clip_boxes_to_image(boxes, (original[0], original[1]))
        return boxes, scores, labels, img
