"""RoIPooler against torchvision's poolers, level assignment, order, gradients, empty inputs."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from detkit.modeling.heads.poolers import POOLER_KINDS, RoIPooler, boxes_to_rois, fpn_levels
from detkit.ops import deform_roi_pool, offset_branch_parameters
from tests.helpers import generator, normal, uniform

FPN_NAMES = ["p2", "p3", "p4", "p5"]
FPN_STRIDES = [4, 8, 16, 32]
IMAGE_H, IMAGE_W = 576, 640          # multiples of the largest stride
CHANNELS, OUTPUT, SAMPLING = 3, 7, 2
HIDDEN = 16                           # small offset branch for speed


def pyramid(seed: int, batch: int = 2, dtype=torch.float32) -> OrderedDict:
    gen = generator(seed)
    return OrderedDict((name, uniform((batch, CHANNELS, IMAGE_H // s, IMAGE_W // s), gen, dtype=dtype))
                       for name, s in zip(FPN_NAMES, FPN_STRIDES))


def boxes_of_sides(sides, gen, dtype=torch.float32):
    """Boxes with the given side lengths (squares up to a random 0.8-1.25 aspect) inside the image."""
    sides = torch.as_tensor(sides, dtype=torch.float64)
    aspect = uniform(sides.shape, gen, 0.8, 1.25)
    w, h = sides * aspect.sqrt(), sides / aspect.sqrt()
    x1 = uniform(sides.shape, gen, 0, 1) * (IMAGE_W - w).clamp(min=0)
    y1 = uniform(sides.shape, gen, 0, 1) * (IMAGE_H - h).clamp(min=0)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).to(dtype)


def proposals_all_levels(seed: int, dtype=torch.float32):
    """Two images' proposals whose sizes cover levels 2..5 (sqrt(area) from 12 to 480 px)."""
    gen = generator(seed)
    first = boxes_of_sides([20, 60, 130, 250, 30, 100, 470, 12], gen, dtype)
    second = boxes_of_sides([480, 90, 45, 180, 16, 300], gen, dtype)
    return [first, second]


def expected_levels(boxes: torch.Tensor) -> torch.Tensor:
    """The FPN paper's eq. 1 written out per box, clamped to p2..p5."""
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        level = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6)
        out.append(min(max(level, 2), 5))
    return torch.tensor(out)


def test_fpn_levels_follow_the_paper_rule():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 111, 111],
                          [0, 0, 8, 8], [0, 0, 2000, 2000]], dtype=torch.float32)
    assert fpn_levels(boxes, 2, 5).tolist() == [4, 3, 5, 2, 2, 5]
    random_boxes = torch.cat(proposals_all_levels(seed=1))
    assert torch.equal(fpn_levels(random_boxes, 2, 5), expected_levels(random_boxes))


def test_proposals_cover_every_level():
    # The multi-level tests below are only meaningful if every level gets RoIs.
    levels = expected_levels(torch.cat(proposals_all_levels(seed=2)))
    assert set(levels.tolist()) == {2, 3, 4, 5}


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_level_indices_name_the_map_forward_pools_from(kind):
    # Every map a constant (its stride), so the pooled value tells which map a RoI came from.
    features = OrderedDict((name, torch.full((2, CHANNELS, IMAGE_H // s, IMAGE_W // s), float(s)))
                           for name, s in zip(FPN_NAMES, FPN_STRIDES))
    edges = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111.5, 111.5], [0, 0, 448, 448],
                          [10, 10, 14, 14]], dtype=torch.float32)
    proposals = [torch.cat([proposals_all_levels(seed=17)[0], edges]), proposals_all_levels(seed=18)[1]]
    pooler = RoIPooler(kind, FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN)
    pooled = pooler(features, proposals, [(IMAGE_H, IMAGE_W)] * 2)
    boxes = torch.cat(proposals)
    indices = pooler.level_indices(boxes)
    assert indices.dtype == torch.int64 and set(indices.tolist()) == {0, 1, 2, 3}
    assert torch.equal(indices, expected_levels(boxes) - 2)
    scale = 0.5 if kind == "mdeform" else 1.0          # a fresh mask is sigmoid(0)
    strides = torch.tensor(FPN_STRIDES, dtype=torch.float32)[indices]
    torch.testing.assert_close(pooled.amax(dim=(1, 2, 3)), scale * strides, rtol=1e-5, atol=1e-5)
    single = RoIPooler(kind, ["res5"], [32], CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN)
    assert torch.equal(single.level_indices(boxes), torch.zeros(len(boxes), dtype=torch.int64))


@pytest.mark.parametrize("kind", ["deform", "mdeform"])
def test_predict_offsets_are_what_forward_pools_with(kind):
    features = pyramid(seed=19, dtype=torch.float64)
    proposals = proposals_all_levels(seed=2, dtype=torch.float64)
    pooler = RoIPooler(kind, FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN).double()
    gen = generator(20)
    with torch.no_grad():
        for p in pooler.deform_pool.offset_branch.parameters():
            p.copy_(normal(p.shape, gen, std=0.3))
    rois = boxes_to_rois(proposals)
    offset, mask = pooler.predict_offsets(features, rois)
    assert offset.shape == (len(rois), 2, OUTPUT, OUTPUT) and offset.abs().amin() > 0
    assert (mask is None) == (kind == "deform")
    if mask is not None:
        assert mask.shape == (len(rois), 1, OUTPUT, OUTPUT)
    # Pooling each RoI by hand from its level with these offsets gives the forward's output.
    expected = []
    for k, level in enumerate(expected_levels(rois[:, 1:]).tolist()):
        roi = torch.cat([rois[k, :1], rois[k, 1:] / 2 ** level])[None]
        expected.append(deform_roi_pool(features[f"p{level}"], roi, offset[k:k + 1],
                                        None if mask is None else mask[k:k + 1], OUTPUT, 1.0, SAMPLING,
                                        pooler.gamma))
    torch.testing.assert_close(pooler(features, proposals, [(IMAGE_H, IMAGE_W)] * 2), torch.cat(expected),
                               rtol=1e-12, atol=1e-12)
    # RoI order: one RoI alone gets the row it got in the batch.
    for k in (0, len(rois) // 2, len(rois) - 1):
        alone, alone_mask = pooler.predict_offsets(features, rois[k:k + 1])
        torch.testing.assert_close(alone, offset[k:k + 1], rtol=1e-12, atol=1e-12)
        if mask is not None:
            torch.testing.assert_close(alone_mask, mask[k:k + 1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no offsets"):
        RoIPooler("alignv2", FPN_NAMES, FPN_STRIDES, CHANNELS).predict_offsets(features, rois)


def test_align_one_level_equals_multiscale_roi_align():
    gen = generator(3)
    stride = 16
    features = {"res5": uniform((2, CHANNELS, IMAGE_H // stride, IMAGE_W // stride), gen, dtype=torch.float32)}
    proposals = proposals_all_levels(seed=4)
    image_shapes = [(IMAGE_H, IMAGE_W)] * 2
    ours = RoIPooler("align", ["res5"], [stride], CHANNELS, OUTPUT, SAMPLING)(features, proposals, image_shapes)
    theirs = MultiScaleRoIAlign(["res5"], OUTPUT, SAMPLING)(features, proposals, image_shapes)
    assert ours.shape == (sum(len(p) for p in proposals), CHANNELS, OUTPUT, OUTPUT)
    assert torch.equal(ours, theirs)


def test_align_four_levels_equals_multiscale_roi_align():
    features = pyramid(seed=5)
    proposals = proposals_all_levels(seed=2)
    image_shapes = [(IMAGE_H, IMAGE_W), (IMAGE_H - 40, IMAGE_W - 24)]
    ours = RoIPooler("align", FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, SAMPLING)(features, proposals, image_shapes)
    theirs = MultiScaleRoIAlign(FPN_NAMES, OUTPUT, SAMPLING)(features, proposals, image_shapes)
    assert torch.equal(ours, theirs)


def test_pool_one_level_equals_roi_pool():
    gen = generator(6)
    stride = 16
    feature = uniform((2, CHANNELS, IMAGE_H // stride, IMAGE_W // stride), gen, dtype=torch.float32)
    proposals = proposals_all_levels(seed=7)
    pooler = RoIPooler("pool", ["res4"], [stride], CHANNELS, OUTPUT)
    ours = pooler({"res4": feature}, proposals, [(IMAGE_H, IMAGE_W)] * 2)
    theirs = roi_pool(feature, boxes_to_rois(proposals), OUTPUT, 1.0 / stride)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["alignv2", "deform", "mdeform"])
@pytest.mark.parametrize("sampling_ratio", [0, SAMPLING])
def test_fresh_deformable_pooler_is_aligned_roi_align_per_level(kind, sampling_ratio):
    features = pyramid(seed=8, dtype=torch.float64)
    proposals = proposals_all_levels(seed=2, dtype=torch.float64)
    pooler = RoIPooler(kind, FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, sampling_ratio, hidden_dim=HIDDEN).double()
    ours = pooler(features, proposals, [(IMAGE_H, IMAGE_W)] * 2)
    rois = boxes_to_rois(proposals)
    levels = expected_levels(rois[:, 1:])
    expected = torch.cat([
        roi_align(features[f"p{level}"], roi[None], OUTPUT, 1.0 / 2 ** level, sampling_ratio, aligned=True)
        for roi, level in zip(rois, levels.tolist())])
    scale = 0.5 if kind == "mdeform" else 1.0          # the mask starts at sigmoid(0)
    torch.testing.assert_close(ours, scale * expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["alignv2", "deform", "mdeform"])
def test_fresh_deformable_pooler_one_level(kind):
    gen = generator(9)
    stride = 16
    feature = uniform((2, CHANNELS, IMAGE_H // stride, IMAGE_W // stride), gen)
    proposals = proposals_all_levels(seed=10, dtype=torch.float64)
    pooler = RoIPooler(kind, ["res5"], [stride], CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN).double()
    ours = pooler({"res5": feature}, proposals, [(IMAGE_H, IMAGE_W)] * 2)
    expected = roi_align(feature, boxes_to_rois(proposals), OUTPUT, 1.0 / stride, SAMPLING, aligned=True)
    torch.testing.assert_close(ours, (0.5 if kind == "mdeform" else 1.0) * expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["deform", "mdeform"])
def test_shared_offset_branch_gets_gradients(kind):
    features = pyramid(seed=11)
    proposals = proposals_all_levels(seed=2)
    pooler = RoIPooler(kind, FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN)
    found = list(offset_branch_parameters(pooler))
    names = [name for _, name, _ in found]
    assert names and all(name.startswith("deform_pool.offset_branch.") for name in names)
    assert {kind for kind, _, _ in found} == {"deform_roi_pool"}
    assert len(names) == len(list(pooler.deform_pool.offset_branch.parameters()))   # one branch, not one per level
    out = pooler(features, proposals, [(IMAGE_H, IMAGE_W)] * 2)
    (out * uniform(out.shape, generator(12), dtype=out.dtype)).sum().backward()
    last = pooler.deform_pool.offset_branch[-1]
    # The last layer starts at zero: its weight gets gradient, the layers before do not yet.
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert last.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_output_follows_proposal_order_across_levels(kind):
    features = pyramid(seed=13)
    proposals = proposals_all_levels(seed=2)
    pooler = RoIPooler(kind, FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN)
    shapes = [(IMAGE_H, IMAGE_W)] * 2
    base = pooler(features, proposals, shapes)
    perms = [torch.randperm(len(p), generator=generator(14 + i)) for i, p in enumerate(proposals)]
    permuted = pooler(features, [p[perm] for p, perm in zip(proposals, perms)], shapes)
    split = base.split([len(p) for p in proposals])
    torch.testing.assert_close(permuted, torch.cat([s[perm] for s, perm in zip(split, perms)]),
                               rtol=1e-6, atol=1e-6)
    # Each RoI is pooled from its own image: pooling image 1 alone gives the same rows.
    alone = pooler({k: v[1:] for k, v in features.items()}, proposals[1:], shapes[1:])
    torch.testing.assert_close(split[1], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_empty_proposals(kind):
    features = pyramid(seed=15)
    proposals = proposals_all_levels(seed=2)
    pooler = RoIPooler(kind, FPN_NAMES, FPN_STRIDES, CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN)
    shapes = [(IMAGE_H, IMAGE_W)] * 2
    empty = proposals[0][:0]
    one_empty = pooler(features, [empty, proposals[1]], shapes)
    torch.testing.assert_close(one_empty, pooler(features, proposals, shapes)[len(proposals[0]):])
    none = pooler(features, [empty, empty], shapes)
    assert none.shape == (0, CHANNELS, OUTPUT, OUTPUT)
    single = RoIPooler(kind, ["p4"], [16], CHANNELS, OUTPUT, SAMPLING, hidden_dim=HIDDEN)
    assert single(features, [empty, empty], shapes).shape == (0, CHANNELS, OUTPUT, OUTPUT)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        RoIPooler("bilinear", ["p2"], [4], CHANNELS)
    with pytest.raises(ValueError, match="same length"):
        RoIPooler("align", FPN_NAMES, FPN_STRIDES[:3], CHANNELS)
    with pytest.raises(ValueError, match="consecutive powers of two"):
        RoIPooler("align", ["p2", "p4"], [4, 16], CHANNELS)
    pooler = RoIPooler("align", FPN_NAMES, FPN_STRIDES, CHANNELS)
    with pytest.raises(ValueError, match="p5"):
        pooler({k: v for k, v in pyramid(seed=16).items() if k != "p5"}, proposals_all_levels(2), [(1, 1)] * 2)
