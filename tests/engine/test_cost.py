"""detkit.study.cost: parameter counts, the FLOP formulas of detkit's deformable ops (against
counts worked out by hand), FLOPs of whole tiny detectors, and a short timing of a tiny run
composed like tools/train.py's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detkit.config.build import build_model
from detkit.config.schemas import check_train_config
from detkit.study.cost import (compose_train_config, count_flops, dcn_core_flop_count, deform_conv2d_flop_count,
                                deform_roi_pool_flop_count, fixed_proposals, inference_flops, measure_experiment,
                                parameter_counts)
from detkit.ops import DeformConv2d, deform_conv2d, deform_roi_pool
from tests.vis.builders import MIN_SIZE, build_tiny, tiny_config

PLAIN = {"backbone": {"deform_blocks": {}}, "pooler_kind": "alignv2"}   # tiny_config without deformable layers


def test_parameter_counts_are_sums_of_numel():
    model = build_tiny()                          # mdconv res3-res5 + mdpool
    for p in model.backbone.conv1.parameters():
        p.requires_grad_(False)
    counts = parameter_counts(model)
    assert counts["parameters"] == sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.backbone.conv1.parameters())
    assert frozen > 0 and counts["trainable"] == counts["parameters"] - frozen
    by_name = {"deform_conv": 0, "deform_roi_pool": 0}
    for name, p in model.named_parameters():
        if ".offset_branch." in name:
            by_name["deform_conv" if name.startswith("backbone.") else "deform_roi_pool"] += p.numel()
    assert min(by_name.values()) > 0 and counts["offset_parameters"] == by_name
    assert parameter_counts(build_tiny(**PLAIN))["offset_parameters"] == {}


# Hand-worked cases: input [B=2, C_in=4, 5, 7], weight [C_out=6, C_in/groups=2, 3, 3] (groups 2).
# Conv: 2 FLOPs x B x C_out x C_in/groups x kh x kw x H_out x W_out.
# Sampling: B x C_in x kh x kw x H_out x W_out column entries x 7 FLOPs (+1 with a mask).
CONV_CASES = [
    # stride 1, padding 1, dilation 1, 1 offset group: 5x7 out
    dict(stride=1, padding=1, dilation=1, offset_groups=1, out=(5, 7),
         conv=2 * 2 * 6 * 2 * 9 * 35, columns=2 * 4 * 9 * 35),
    # stride 2, padding 2, dilation 2, 2 offset groups: (5 + 4 - 5) // 2 + 1 = 3, (7 + 4 - 5) // 2 + 1 = 4
    dict(stride=2, padding=2, dilation=2, offset_groups=2, out=(3, 4),
         conv=2 * 2 * 6 * 2 * 9 * 12, columns=2 * 4 * 9 * 12),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=["s1", "s2_d2_g2"])
def test_deform_conv_formula_is_the_plain_conv_plus_its_sampling(case):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 5, 7, generator=gen)
    weight = torch.rand(6, 2, 3, 3, generator=gen)
    taps = case["offset_groups"] * 9
    out_h, out_w = case["out"]
    offset = torch.rand(2, 2 * taps, out_h, out_w, generator=gen) - 0.5
    mask = torch.rand(2, taps, out_h, out_w, generator=gen)
    conv_args = (case["stride"], case["padding"], case["dilation"])
    assert count_flops(F.conv2d, x, weight, None, *conv_args, 2).total == case["conv"]   # groups=2
    dcn = count_flops(deform_conv2d, x, offset, weight, None, *conv_args)
    mdcn = count_flops(deform_conv2d, x, offset, weight, None, *conv_args, mask=mask)
    assert dcn.total == case["conv"] + 7 * case["columns"]
    assert mdcn.total == case["conv"] + 8 * case["columns"]
    assert dcn.by_op == {"detkit.deform_conv2d": dcn.total}
    assert deform_conv2d_flop_count(x.shape, weight.shape, (2, 6, out_h, out_w), modulated=True) == mdcn.total


def test_deform_roi_pool_counts_its_bilinear_samples():
    feature = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 4.0],     # 8 x 4 px -> 2x2 bins of 4 x 2 px
                         [0, 1.0, 1.0, 4.0, 4.0]])    # 3 x 3 px -> bins of 1.5 x 1.5 px
    offset, mask = torch.zeros(2, 2, 2, 2), torch.full((2, 1, 2, 2), 0.5)

    def flops(*args, **kwargs):
        return count_flops(deform_roi_pool, feature, rois, *args, output_size=2, **kwargs).total

    # sampling_ratio 0: ceil(bin size) samples per side, 4 x 2 = 8 and 2 x 2 = 4 per bin; per
    # channel and bin 8 FLOPs a sample (bilinear 7 + sum 1) and 1 for the mean: C x bins x (65 + 33).
    assert flops(sampling_ratio=0) == 3 * 4 * (8 * 8 + 1 + 8 * 4 + 1)
    assert flops(offset, sampling_ratio=0) == 3 * 4 * (8 * 8 + 1 + 8 * 4 + 1)    # offsets: no extra FLOPs
    assert flops(offset, mask, sampling_ratio=0) == 3 * 4 * (8 * 8 + 2 + 8 * 4 + 2)  # + the mask multiply
    assert flops(sampling_ratio=2) == 3 * 4 * 2 * (8 * 4 + 1)
    # At half scale the bins are 2 x 1 and 0.75 x 0.75 feature px: 2 samples and 1.
    assert flops(sampling_ratio=0, spatial_scale=0.5) == 3 * 4 * (8 * 2 + 1 + 8 * 1 + 1)
    assert deform_roi_pool_flop_count(feature.shape, rois, 2, 2, 1.0, 0, modulated=False) == flops(sampling_ratio=0)


def _deform_layer_extras(model: torch.nn.Module, height: int, width: int) -> int:
    """What the deformable layers of `model`'s backbone add to a plain backbone's FLOPs at
    height x width, from their shapes: their offset branch (a conv with groups 1) and the
    sampling of their im2col columns."""
    extras = []

    def record(layer, args, output):
        batch, in_channels = args[0].shape[:2]
        out_h, out_w = output.shape[-2:]
        kh, kw = layer.kernel_size
        branch = layer.offset_branch.out_channels
        columns = batch * in_channels * kh * kw * out_h * out_w
        extras.append(2 * batch * branch * in_channels * kh * kw * out_h * out_w
                      + columns * (8 if layer.modulated else 7))

    hooks = [m.register_forward_hook(record) for m in model.backbone.modules() if isinstance(m, DeformConv2d)]
    with torch.no_grad():
        model.backbone(torch.rand(1, 3, height, width))
    for hook in hooks:
        hook.remove()
    assert len(extras) > 0
    return sum(extras)


def test_deformable_layers_count_more_flops_than_the_same_model_without():
    deformable, plain = build_tiny(), build_tiny(**PLAIN)
    with_dcn, without = inference_flops(deformable, 128, 160), inference_flops(plain, 128, 160)
    assert with_dcn.total > without.total
    assert with_dcn.parts["backbone"] - without.parts["backbone"] == _deform_layer_extras(deformable, 128, 160)
    assert with_dcn.parts["neck"] == without.parts["neck"] and with_dcn.parts["rpn"] == without.parts["rpn"]
    # The deformable pooler pools twice (plain pass for its offset fc, then with offsets) and runs its fc.
    assert with_dcn.proposals == without.proposals
    assert with_dcn.parts["roi_heads"] > without.parts["roi_heads"]
    assert sum(with_dcn.parts.values()) == with_dcn.total
    assert "detkit.deform_conv2d" in with_dcn.by_op and "detkit.deform_conv2d" not in without.by_op
    assert without.by_op["detkit.deform_roi_pool"] > 0                 # alignv2: the same op, counted too


def test_backbone_flops_are_proportional_to_pixels_at_multiples_of_its_stride():
    # With both sides multiples of the total stride (32) every layer's output is exactly
    # H/s x W/s (stem, pooling and stride-2 convs all halve exactly), so every conv, and every
    # deformable layer's sampling term, scales with H x W: the count is exactly linear in pixels.
    backbone = build_tiny().backbone

    def flops(height, width):
        with torch.no_grad():
            return count_flops(backbone, torch.rand(1, 3, height, width)).total

    base = flops(64, 96)
    assert flops(128, 96) == 2 * base and flops(128, 192) == 4 * base and flops(96, 96) * 2 == 3 * base


def test_fixed_proposals_lie_inside_the_image_and_repeat():
    boxes = fixed_proposals(500, 96, 160, seed=3)
    assert boxes.shape == (500, 4) and torch.equal(boxes, fixed_proposals(500, 96, 160, seed=3))
    assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 160 and boxes[:, 1::2].max() <= 96


def test_inference_flops_are_at_the_requested_size_and_independent_of_the_weights():
    model = build_tiny()                              # its transform resizes to a shorter side of 64
    counted = inference_flops(model, 128, 192)
    assert counted.image_size == (128, 192) and counted.network_input == (128, 192)
    with torch.no_grad():
        backbone_alone = count_flops(model.backbone, torch.rand(1, 3, 128, 192)).total
    assert counted.parts["backbone"] == backbone_alone
    assert model.transform.min_size == (MIN_SIZE,) and not model.training    # restored (build_tiny: eval)
    assert counted.proposals == model.rpn.post_nms_top_n() == 300            # the box head at its full budget
    with torch.no_grad():                     # wild RPN box deltas: many of its boxes leave the image
        for p in model.rpn.head.bbox_pred.parameters():
            p.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
    kept = []
    hook = model.rpn.register_forward_hook(lambda module, args, out: kept.append(len(out[0][0])))
    assert inference_flops(model, 128, 192) == counted
    hook.remove()
    assert kept[0] < counted.proposals        # the RPN passed on fewer boxes; the count did not change
    with pytest.raises(ValueError, match="height and width"):
        inference_flops(model, 0, 64)


TINY_OVERRIDES = [f"model.backbone.width={tiny_config()['backbone']['width']}", "model.fpn_channels=16",
                  "model.representation_size=32", "model.deform_hidden_dim=32", "num_workers=0",
                  # frozen BN and stem+res2 without weights, as the ablation models are timed
                  "model.backbone.norm=frozen_bn", "model.backbone.freeze_at=2"]


def test_two_timed_iterations_of_a_tiny_composed_run(tmp_path):
    cfg = compose_train_config("smoke", overrides=[f"data.root={tmp_path / 'data'}", *TINY_OVERRIDES])
    with pytest.raises(ValueError, match="weights"):          # training itself refuses these random frozen layers
        check_train_config(cfg, world_size=1)
    cost = measure_experiment(cfg, height=64, width=96, iters=2, warmup=1)
    assert len(cost.step_seconds) == 2 and all(s > 0 for s in cost.step_seconds)
    assert cost.sec_per_iter > 0 and cost.flops.total > 0 and cost.flops.network_input == (64, 96)
    model = build_model(cfg.model)
    assert cost.parameters == sum(p.numel() for p in model.parameters())
    assert 0 < cost.trainable < cost.parameters
    assert cost.offset_total == sum(p.numel() for n, p in model.named_parameters() if ".offset_branch." in n) > 0
    assert cost.to_dict()["sec_per_iter_median"] == cost.sec_per_iter


@pytest.mark.parametrize("remove_center", [False, True])
def test_dcn_core_formulas_count_each_points_bilinear_sample_and_weight(remove_center):
    # 2 images, 5x6 output at stride 1 of a 5x6 input, 3 groups of 4 channels, 3x3 kernel:
    # every output element sums K points of 7 FLOPs (bilinear) + 2 (weight, sum) each.
    from detkit.ops import dcnv3_core, dcnv4_core
    from detkit.ops.dcnv3 import dcnv4_packed_width

    gen = torch.Generator().manual_seed(0)
    points = 9 - int(remove_center)
    x = torch.rand(2, 5, 6, 12, generator=gen)
    offset = torch.rand(2, 5, 6, 3 * points * 2, generator=gen) - 0.5
    mask = torch.rand(2, 5, 6, 3 * points, generator=gen)
    packed = torch.rand(2, 5, 6, dcnv4_packed_width(3, points), generator=gen)
    expected = 2 * 5 * 6 * 12 * points * 9
    v3 = count_flops(dcnv3_core, x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 3, 4, 1.0, remove_center)
    v4 = count_flops(dcnv4_core, x, packed, 3, 3, 1, 1, 1, 1, 1, 1, 3, 4, 1.0, remove_center)
    assert v3.total == expected and v3.by_op == {"detkit.dcnv3_core": expected}
    assert v4.total == expected and v4.by_op == {"detkit.dcnv4_core": expected}
    assert dcn_core_flop_count((2, 5, 6, 12), points) == expected
