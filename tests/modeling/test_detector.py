"""Faster R-CNN assembly: both layouts x every pooler kind, input checks, target clipping, FPN neck."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detkit.modeling.build import build_faster_rcnn, build_transform
from detkit.modeling.heads.rpn import build_rpn
from detkit.modeling.detector import FasterRCNN, clip_targets_to_image
from detkit.modeling.heads.poolers import POOLER_KINDS, RoIPooler
from detkit.modeling.neck.fpn import FPN
from detkit.ops import offset_branch_parameters
from tests.helpers import generator

NUM_CLASSES = 3
LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
IMAGE_SIZES = [(72, 96), (96, 80)]      # (H, W): different sizes, neither at the transform's scale
MIN_SIZE, MAX_SIZE = 64, 128
DETECTIONS_PER_IMG = 10


class TinyBackbone(nn.Module):
    """Stand-in for the ResNet: res2..res5 at strides 4, 8, 16, 32 (16 with a dilated res5)."""

    def __init__(self, dilated_res5: bool = False):
        super().__init__()
        widths = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.stages = nn.ModuleDict()
        in_c = 8
        self.strides, stride = {}, 4
        for name, width in widths.items():
            step = 1 if name == "res2" or (name == "res5" and dilated_res5) else 2
            dilation = 2 if name == "res5" and dilated_res5 else 1
            self.stages[name] = nn.Sequential(
                nn.Conv2d(in_c, width, 3, step, padding=dilation, dilation=dilation), nn.ReLU())
            stride *= step
            self.strides[name] = stride
            in_c = width
        self.out_channels = dict(widths)

    def forward(self, x):
        x = self.stem(x)
        out = OrderedDict()
        for name, stage in self.stages.items():
            x = out[name] = stage(x)
        return out


SMALL = dict(
    fpn_channels=16, representation_size=32, deform_hidden_dim=16,
    rpn_options=dict(pre_nms_top_n_train=64, post_nms_top_n_train=32, pre_nms_top_n_test=64,
                     post_nms_top_n_test=32, batch_size_per_image=64),
    roi_heads_options=dict(batch_size_per_image=32, score_thresh=0.0, detections_per_img=DETECTIONS_PER_IMG),
    transform_options=dict(min_size=MIN_SIZE, max_size=MAX_SIZE),
)


def tiny_model(layout="fpn", kind="align", seed=0, **overrides):
    torch.manual_seed(seed)
    backbone = TinyBackbone(dilated_res5=layout == "single_scale")
    return build_faster_rcnn(backbone, NUM_CLASSES, layout, kind, **{**SMALL, **overrides})


def images_and_targets(seed=0):
    gen = generator(seed)
    images = [torch.rand((3, h, w), generator=gen) for h, w in IMAGE_SIZES]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 90.0, 70.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 44.0], [2.0, 50.0, 30.0, 94.0], [40.0, 40.0, 78.0, 90.0]]),
         "labels": torch.tensor([2, 1, 1])},
    ]
    return images, targets


def offset_last_layers(model):
    """The zero-initialised last fc of every deformable RoI pooling offset branch."""
    return [m.deform_pool.offset_branch[-1] for m in model.modules()
            if isinstance(m, RoIPooler) and m.deform_pool is not None]


def train_steps(model, images, targets, steps=3, lr=0.01):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        history.append(losses)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return history


def assert_detections(detections, images):
    assert len(detections) == len(images)
    for det, image in zip(detections, images):
        height, width = image.shape[1:]
        assert set(det) == {"boxes", "scores", "labels"}
        n = det["boxes"].shape[0]
        assert 0 < n <= DETECTIONS_PER_IMG
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (n,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 1) & (det["labels"] < NUM_CLASSES)).all()
        boxes = det["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


@pytest.mark.parametrize("layout", ["fpn", "single_scale"])
@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_detector_trains_and_predicts(layout, kind):
    model = tiny_model(layout, kind)
    images, targets = images_and_targets()
    deformable = kind in ("deform", "mdeform")
    found = list(offset_branch_parameters(model))
    if deformable:
        assert found and {k for k, _, _ in found} == {"deform_roi_pool"}
        assert all(name.startswith("roi_heads.box_roi_pool.deform_pool.offset_branch.") for _, name, _ in found)
    else:
        assert found == []

    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for last in offset_last_layers(model):
        # Zero-initialised last layer: its weight gets gradient at once (earlier layers only later).
        assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0

    model.zero_grad()
    history = train_steps(model, images, targets)
    assert all(torch.isfinite(v) for step in history for v in step.values())
    for last in offset_last_layers(model):
        assert last.weight.abs().sum() > 0          # the offsets have started to move

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert_detections(detections, images)


def test_detections_are_mapped_back_to_input_pixels():
    model = tiny_model("fpn", "align").eval()
    images, _ = images_and_targets(seed=7)
    captured = []
    model.roi_heads.register_forward_hook(
        lambda module, args, output: captured.append([{k: v.clone() for k, v in d.items()} for d in output[0]]))
    with torch.no_grad():
        detections = model(images)
        resized = model.transform(images)[0].image_sizes
    for det, before, image, (height, width) in zip(detections, captured[0], images, resized):
        assert (height, width) != tuple(image.shape[1:])          # the transform did resize
        ratio = torch.tensor([image.shape[2] / width, image.shape[1] / height] * 2)
        torch.testing.assert_close(det["boxes"], before["boxes"] * ratio)
        assert torch.equal(det["scores"], before["scores"]) and torch.equal(det["labels"], before["labels"])


@pytest.mark.parametrize("layout", ["fpn", "single_scale"])
def test_layout_wiring(layout):
    model = tiny_model(layout, "mdeform")
    pooler = model.roi_heads.box_roi_pool
    if layout == "fpn":
        assert isinstance(model.neck, FPN)
        assert model.rpn_in_features == ("p2", "p3", "p4", "p5", "p6")
        assert pooler.feature_names == ("p2", "p3", "p4", "p5") and pooler.strides == (4, 8, 16, 32)
        assert pooler.sampling_ratio == 2
        assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
        assert model.roi_heads.box_head.fc6.in_features == SMALL["fpn_channels"] * 7 * 7
    else:
        assert model.neck is None
        assert model.rpn_in_features == ("res4",)
        assert pooler.feature_names == ("res5",) and pooler.strides == (16,)     # dilated res5
        assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
        assert model.roi_heads.box_head.fc6.in_features == model.backbone.out_channels["res5"] * 7 * 7
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * NUM_CLASSES


def test_detector_trains_on_images_without_boxes():
    model = tiny_model("fpn", "deform")
    images, targets = images_and_targets(seed=1)
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    for batch_targets in ([empty, targets[1]], [empty, empty]):
        history = train_steps(model, images, batch_targets, steps=2)
        assert all(torch.isfinite(v) for step in history for v in step.values())
    # Nothing to regress: the box losses of an all-empty batch are exactly zero.
    assert history[-1]["loss_rpn_box_reg"] == 0 and history[-1]["loss_box_reg"] == 0


def test_clip_targets_to_image():
    boxes = torch.tensor([
        [10.0, 10.0, 20.0, 20.0],        # inside: unchanged
        [-30.0, 5.0, 15.0, 200.0],       # partly outside: clipped
        [500.0, 500.0, 600.0, 700.0],    # far outside (beyond the corner): dropped
        [-80.0, -80.0, -10.0, -5.0],     # far outside (before the corner): dropped
        [40.0, 10.0, 90.0, 30.0],        # touches the image along its right edge only: dropped
    ])
    labels = torch.tensor([1, 2, 1, 2, 1])
    kept_boxes, kept_labels = clip_targets_to_image(boxes, labels, (50, 40))       # (H, W)
    torch.testing.assert_close(kept_boxes, torch.tensor([[10.0, 10.0, 20.0, 20.0], [0.0, 5.0, 15.0, 50.0]]))
    assert kept_labels.tolist() == [1, 2]
    assert clip_targets_to_image(boxes[2:4], labels[2:4], (50, 40))[0].shape == (0, 4)


def test_boxes_far_outside_are_clipped_and_dropped_in_training():
    model = tiny_model("single_scale", "align")
    images, targets = images_and_targets(seed=2)
    targets[0] = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [-1e4, -1e4, -5e3, -5e3], [-50.0, 30.0, 1e5, 60.0]]),
                  "labels": torch.tensor([1, 2, 1])}
    targets[1] = {"boxes": torch.tensor([[1e4, 1e4, 2e4, 2e4]]), "labels": torch.tensor([2])}   # nothing left
    checked = model._checked_targets(images, targets)
    torch.testing.assert_close(checked[0]["boxes"], torch.tensor([[4.0, 6.0, 40.0, 50.0], [0.0, 30.0, 96.0, 60.0]]))
    assert checked[0]["labels"].tolist() == [1, 1]
    assert checked[1]["boxes"].shape == (0, 4) and checked[1]["labels"].shape == (0,)
    history = train_steps(model, images, targets, steps=2)
    assert all(torch.isfinite(v) for step in history for v in step.values())


@pytest.fixture(scope="module")
def error_model():
    return tiny_model("fpn", "align").train()


def bad_target(targets, image, **changes):
    targets = [dict(t) for t in targets]
    targets[image].update(changes)
    return targets


@pytest.mark.parametrize("image", [0, 1])
def test_bad_targets_name_the_image(error_model, image):
    images, targets = images_and_targets()
    n = len(targets[image]["boxes"])
    degenerate = targets[image]["boxes"].clone()
    degenerate[-1] = torch.tensor([30.0, 20.0, 30.0, 45.0])
    with pytest.raises(ValueError, match=rf"image {image}: box {n - 1} \[30.0, 20.0, 30.0, 45.0\] is degenerate"):
        error_model(images, bad_target(targets, image, boxes=degenerate))
    flipped = targets[image]["boxes"].clone()
    flipped[0] = flipped[0][[0, 3, 2, 1]]                   # y2 < y1
    with pytest.raises(ValueError, match=rf"image {image}: box 0 .* degenerate"):
        error_model(images, bad_target(targets, image, boxes=flipped))
    not_finite = targets[image]["boxes"].clone()
    not_finite[1, 2] = float("nan")
    with pytest.raises(ValueError, match=rf"image {image}: box 1 .*nan.* not finite"):
        error_model(images, bad_target(targets, image, boxes=not_finite))
    for label in (0, NUM_CLASSES, -1):
        labels = targets[image]["labels"].clone()
        labels[-1] = label
        with pytest.raises(ValueError, match=rf"image {image}: label {label} of box {n - 1}"):
            error_model(images, bad_target(targets, image, labels=labels))
    for key in ("boxes", "labels"):
        without = [dict(t) for t in targets]
        del without[image][key]
        with pytest.raises(ValueError, match=rf"target of image {image} has no '{key}'"):
            error_model(images, without)
    with pytest.raises(ValueError, match=rf"boxes of image {image} must have shape \[N, 4\]"):
        error_model(images, bad_target(targets, image, boxes=targets[image]["boxes"][:, :3]))
    with pytest.raises(TypeError, match=rf"boxes of image {image} must be floating point"):
        error_model(images, bad_target(targets, image, boxes=targets[image]["boxes"].long()))
    with pytest.raises(TypeError, match=rf"labels of image {image} must be int64"):
        error_model(images, bad_target(targets, image, labels=targets[image]["labels"].int()))


def test_bad_inputs(error_model):
    images, targets = images_and_targets()
    with pytest.raises(ValueError, match="targets are required in training"):
        error_model(images)
    with pytest.raises(ValueError, match="one dict per image"):
        error_model(images, targets[:1])
    with pytest.raises(ValueError, match=r"image 1 must have shape \[3, H, W\]"):
        error_model([images[0], images[1][:1]], targets)
    with pytest.raises(TypeError, match="image 0 must be floating point"):
        error_model([(images[0] * 255).to(torch.uint8), images[1]], targets)


def test_valid_targets_are_not_changed(error_model):
    images, targets = images_and_targets()
    checked = error_model._checked_targets(images, targets)
    for got, given in zip(checked, targets):
        assert torch.equal(got["boxes"], given["boxes"]) and torch.equal(got["labels"], given["labels"])


def test_fpn_neck_is_torchvision_fpn_with_level_names():
    backbone = TinyBackbone()
    torch.manual_seed(3)
    neck = FPN(backbone.out_channels, backbone.strides, out_channels=16)
    assert neck.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert neck.out_channels == dict.fromkeys(neck.strides, 16)
    names = {name for name, _ in neck.named_parameters()}
    assert {"fpn.inner_blocks.0.0.weight", "fpn.inner_blocks.3.0.bias", "fpn.layer_blocks.3.0.weight"} <= names
    reference = FeaturePyramidNetwork(list(backbone.out_channels.values()), 16, extra_blocks=LastLevelMaxPool())
    reference.load_state_dict(neck.fpn.state_dict())
    features = backbone(torch.rand((1, 3, 64, 96), generator=generator(4)))
    ours, theirs = neck(features), reference(features)
    assert list(ours) == list(neck.strides)
    for got, expected in zip(ours.values(), theirs.values()):
        assert torch.equal(got, expected)
    for name, stride in neck.strides.items():
        assert ours[name].shape[-2:] == (-(-64 // stride), -(-96 // stride))

    dilated = TinyBackbone(dilated_res5=True)
    with pytest.raises(ValueError, match="strictly increasing strides"):
        FPN(dilated.out_channels, dilated.strides)
    without_res2 = TinyBackbone()
    del without_res2.out_channels["res2"]
    with pytest.raises(ValueError, match=r"fpn layout needs backbone features .* lacks \['res2'\]"):
        build_faster_rcnn(without_res2, NUM_CLASSES, "fpn", **SMALL)


def test_builders_reject_inconsistent_arguments():
    with pytest.raises(ValueError, match="same number of anchor sizes"):
        build_rpn(16, ((32,), (64, 128)), (0.5, 1.0, 2.0))
    with pytest.raises(ValueError, match="one group per RPN feature map"):
        build_faster_rcnn(TinyBackbone(), NUM_CLASSES, "fpn", anchor_sizes=((32,), (64,)), **SMALL)
    with pytest.raises(ValueError, match="layout"):
        build_faster_rcnn(TinyBackbone(), NUM_CLASSES, "c4")
    model = tiny_model("single_scale", "align")
    with pytest.raises(ValueError, match="scores 3 classes but num_classes is 4"):
        FasterRCNN(model.backbone, model.rpn, model.roi_heads, model.transform, rpn_in_features=["res4"],
                   num_classes=4)
    transform = build_transform(min_size=(64, 80), max_size=128)
    assert transform.min_size == (64, 80) and transform.max_size == 128 and transform.size_divisible == 32



def test_detector_with_resnet18_deformable_res5_fpn():
    from detkit.modeling.backbone.resnet import ResNet, deformable_layers

    torch.manual_seed(5)
    backbone = ResNet(depth=18, norm="frozen_bn", freeze_at=2, deform_blocks={"res5": "all"},
                      deform_kind="dcnv2")
    assert deformable_layers(backbone)
    model = build_faster_rcnn(backbone, NUM_CLASSES, "fpn", "mdeform", **SMALL)
    kinds = {kind for kind, _, _ in offset_branch_parameters(model)}
    assert kinds == {"deform_conv", "deform_roi_pool"}
    images, targets = images_and_targets(seed=6)
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for _, name, param in offset_branch_parameters(model):
        if name.endswith("offset_branch.weight") or name.endswith("offset_branch.4.weight"):
            # Zero-initialised last layers (conv offsets, RoI pooling offsets) get gradient at once.
            assert param.grad is not None and param.grad.abs().sum() > 0, name
