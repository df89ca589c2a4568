"""The batched (traceable) forms of the transform, the RPN and the RoI heads compute what the eager
modules compute, and read their settings from those modules: change a setting on the module
and the batched form follows it (one source; the ONNX export runs these forms)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from detkit.modeling.build import build_faster_rcnn, build_resnet
from detkit.modeling.heads.per_image import first_per_image
from detkit.modeling.heads.poolers import boxes_to_rois
from detkit.modeling.heads.roi_heads import batched_detections
from detkit.modeling.heads.rpn import batched_proposals
from detkit.modeling.transform import boxes_to_input, transform_batch, transform_images
from tests.helpers import generator

SMALL = dict(fpn_channels=16, representation_size=32,
             rpn_options=dict(pre_nms_top_n_test=200, post_nms_top_n_test=100),
             roi_heads_options=dict(score_thresh=0.05, detections_per_img=50),
             transform_options=dict(min_size=96, max_size=160))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    backbone = build_resnet(depth=18, width=8, norm="bn", freeze_at=0)
    return build_faster_rcnn(backbone, 5, "fpn", "align", **SMALL).eval()


@pytest.fixture(scope="module")
def images():
    """Two images of one size (a batch of the batched forms), not at the transform's scale."""
    image = torch.rand((3, 113, 141), generator=generator(0))
    return torch.stack([image, image.flip(-1).roll(17, dims=-2)])


def eager(model, images):
    """(eager transformed batch, features, per-image proposals, per-image detections in
    network-input pixels) of model's own modules in eval."""
    batch, _ = model.transform(list(images))
    features = model.features(batch.tensors)
    proposals, _ = model.rpn(batch, OrderedDict((n, features[n]) for n in model.rpn_in_features))
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return batch, features, proposals, detections


def batched(model, images):
    """The same through the batched forms: (batch, resized size, rois, (boxes, scores, labels, image))."""
    x, resized = transform_batch(model.transform, images)
    size = (resized[0], resized[1])
    features = model.features(x)
    rois = batched_proposals(model.rpn, x, size, [features[n] for n in model.rpn_in_features])
    return x, resized, rois, batched_detections(model.roi_heads, features, rois, size)


def assert_same(model, images):
    """The batched forms give the eager modules' results, to the bit; returns the batched ones."""
    with torch.no_grad():
        batch, _, proposals, detections = eager(model, images)
        x, resized, rois, (boxes, scores, labels, image) = batched(model, images)
    torch.testing.assert_close(x, batch.tensors, rtol=0, atol=0)
    assert [tuple(resized.tolist())] * len(images) == batch.image_sizes
    torch.testing.assert_close(rois, boxes_to_rois(proposals), rtol=0, atol=0)
    for i, det in enumerate(detections):
        mine = image == i
        torch.testing.assert_close(boxes[mine], det["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(scores[mine], det["scores"], rtol=0, atol=0)
        torch.testing.assert_close(labels[mine], det["labels"], rtol=0, atol=0)
    assert torch.equal(image, torch.sort(image, stable=True)[0])          # image order, as concatenated
    return rois, boxes, scores, labels, image


def per_image_counts(image: torch.Tensor, num_images: int) -> list[int]:
    return torch.bincount(image.to(torch.int64), minlength=num_images).tolist()


def test_transform_forms_match_the_eager_transform(model, images):
    with torch.no_grad():
        batch, _ = model.transform(list(images))
        x, resized = transform_batch(model.transform, images)
        listed = transform_images(model.transform, list(images))
    assert tuple(resized.tolist()) == (96, 119) and batch.image_sizes == [(96, 119)] * 2
    torch.testing.assert_close(x, batch.tensors, rtol=0, atol=0)
    torch.testing.assert_close(listed.tensors, batch.tensors, rtol=0, atol=0)
    assert [tuple(int(v) for v in s) for s in listed.image_sizes] == batch.image_sizes
    # Back to input pixels as FasterRCNN.postprocess maps them, and clamped to the image.
    boxes = torch.tensor([[10.0, 20.0, 50.0, 90.0], [-3.0, 0.5, 118.9, 95.9], [90.0, 5.0, 130.0, 40.0]])
    detections = [{"boxes": boxes.clone(), "scores": torch.ones(3), "labels": torch.ones(3, dtype=torch.int64)}]
    expected = model.postprocess(detections, batch.image_sizes[:1], [(113, 141)])[0]["boxes"]
    torch.testing.assert_close(boxes_to_input(boxes, resized, torch.tensor([113, 141])), expected, rtol=0, atol=0)
    # A setting of the transform reaches its forms.
    model.transform.min_size = (80,)
    try:
        with torch.no_grad():
            x, resized = transform_batch(model.transform, images)
            batch, _ = model.transform(list(images))
        assert tuple(resized.tolist()) == batch.image_sizes[0] == (80, 99)
        torch.testing.assert_close(x, batch.tensors, rtol=0, atol=0)
    finally:
        model.transform.min_size = (96,)


def test_batched_forms_match_the_eager_modules(model, images):
    rois, boxes, scores, labels, image = assert_same(model, images)
    assert per_image_counts(rois[:, 0], 2) == [100, 100]          # post_nms_top_n_test of each image
    assert per_image_counts(image, 2) == [50, 50]                 # detections_per_img of each image
    assert float(scores.min()) > 0.05
    # Each image's detections are its own: alone, image 1 gets the same (the backbone's convs
    # round a batch of one differently, by about 1e-5 px here).
    alone = assert_same(model, images[1:])
    assert alone[4].tolist() == [0] * 50
    torch.testing.assert_close(alone[1], boxes[image == 1], rtol=0, atol=1e-3)
    torch.testing.assert_close(alone[3], labels[image == 1], rtol=0, atol=0)


def _set_post_nms_top_n(model, value):
    model.rpn._post_nms_top_n["testing"] = value


def _set_pre_nms_top_n(model, value):
    model.rpn._pre_nms_top_n["testing"] = value


# (what changes, how it is set on the model's module, its value there, the value to restore)
SETTINGS = [
    ("rpn post_nms_top_n", _set_post_nms_top_n, 7, 100),
    ("rpn pre_nms_top_n", _set_pre_nms_top_n, 20, 200),
    ("rpn nms_thresh", lambda m, v: setattr(m.rpn, "nms_thresh", v), 0.3, 0.7),
    ("rpn min_size", lambda m, v: setattr(m.rpn, "min_size", v), 24.0, 1e-3),
    ("rpn score_thresh", lambda m, v: setattr(m.rpn, "score_thresh", v), 0.505, 0.0),   # fresh head: ~sigmoid(0)
    ("rpn box coder", lambda m, v: setattr(m.rpn, "box_coder", BoxCoder(v)),
     (2.0, 2.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)),
    ("roi_heads score_thresh", lambda m, v: setattr(m.roi_heads, "score_thresh", v), 0.21, 0.05),
    ("roi_heads nms_thresh", lambda m, v: setattr(m.roi_heads, "nms_thresh", v), 0.1, 0.5),
    ("roi_heads detections_per_img", lambda m, v: setattr(m.roi_heads, "detections_per_img", v), 3, 50),
    ("roi_heads box coder", lambda m, v: setattr(m.roi_heads, "box_coder", BoxCoder(v)),
     (1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)),
]


@pytest.mark.parametrize("name,change,value,default", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_batched_forms_follow_the_modules_settings(model, images, name, change, value, default):
    """Each setting, changed on the model's module (nothing else), changes the batched forms'
    results, and they still equal the eager modules'."""
    change(model, default)
    before = assert_same(model, images)
    change(model, value)
    try:
        after = assert_same(model, images)
    finally:
        change(model, default)
    rois, boxes, scores, labels, image = after
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after)), name
    if name == "rpn post_nms_top_n":
        assert per_image_counts(rois[:, 0], 2) == [7, 7]
    if name in ("rpn score_thresh", "rpn min_size"):
        assert len(rois) < len(before[0])
    if name == "rpn min_size":
        assert float((rois[:, 3:] - rois[:, 1:3]).min()) >= 24
    if name == "roi_heads score_thresh":
        assert len(scores) and float(scores.min()) > 0.21 and len(scores) < len(before[2])
    if name == "roi_heads detections_per_img":
        assert per_image_counts(image, 2) == [3, 3]


def test_first_per_image():
    """The first k of each image in score order, grouped by image as a per-image keep[:k]."""
    order = torch.tensor([4, 0, 5, 2, 1, 3, 6])           # indices by decreasing score
    image = torch.tensor([0, 1, 1, 0, 2, 0, 1])            # image of each index: 4 -> 2, 0 -> 0, 5 -> 0, ...
    assert first_per_image(order, image, 2, torch.tensor(3)).tolist() == [0, 5, 2, 1, 4]
    assert first_per_image(order, image, 5, torch.tensor(3)).tolist() == [0, 5, 3, 2, 1, 6, 4]
    assert first_per_image(order[:0], image, 2, torch.tensor(3)).tolist() == []
