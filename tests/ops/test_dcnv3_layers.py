"""DCNv3 / DCNv4 / OffsetSampling layers: each equals a float64 composition of its parts (the
official modules' forward written out with the reference ops), loads a state dict in the
official layout, starts as the function its zero-initialised offsets imply, and exposes its
offset branch to `offset_branch_parameters`."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.ops import DCNv3, DCNv4, OffsetSampling, offset_branch_parameters
from detkit.ops.reference import dcnv3_core_reference, dcnv4_core_reference


def _randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def internimage_dcnv3_state(channels: int, group: int, kernel: int, dw_kernel: int,
                            center_feature_scale: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with InternImage's DCNv3 keys and shapes (norm "LN"), random values; the
    offset head scaled so the learned offsets reach a few pixels."""
    g = torch.Generator().manual_seed(seed)
    points = group * kernel * kernel
    state = {
        "dw_conv.0.weight": _randn(g, channels, 1, dw_kernel, dw_kernel, scale=0.3),
        "dw_conv.0.bias": _randn(g, channels, scale=0.1),
        "dw_conv.1.1.weight": 1 + _randn(g, channels, scale=0.1),
        "dw_conv.1.1.bias": _randn(g, channels, scale=0.1),
        "offset.weight": _randn(g, points * 2, channels, scale=0.8),
        "offset.bias": _randn(g, points * 2, scale=0.5),
        "mask.weight": _randn(g, points, channels, scale=0.5),
        "mask.bias": _randn(g, points, scale=0.2),
        "input_proj.weight": _randn(g, channels, channels, scale=channels ** -0.5),
        "input_proj.bias": _randn(g, channels, scale=0.1),
        "output_proj.weight": _randn(g, channels, channels, scale=channels ** -0.5),
        "output_proj.bias": _randn(g, channels, scale=0.1),
    }
    if center_feature_scale:
        state["center_feature_scale_proj_weight"] = _randn(g, group, channels, scale=0.3)
        state["center_feature_scale_proj_bias"] = _randn(g, group, scale=0.3)
    return state


def dcnv3_composition(state: dict[str, torch.Tensor], x: torch.Tensor, *, group: int, kernel: int,
                      dw_kernel: int, pad: int, offset_scale: float) -> torch.Tensor:
    """InternImage's DCNv3 forward (stride 1, LN, GELU), written out: x [N, H, W, C] -> [N, H, W, C]."""
    n, h, w, c = x.shape
    projected = F.linear(x, state["input_proj.weight"], state["input_proj.bias"])
    query = F.conv2d(x.permute(0, 3, 1, 2), state["dw_conv.0.weight"], state["dw_conv.0.bias"],
                     padding=(dw_kernel - 1) // 2, groups=c).permute(0, 2, 3, 1)
    query = F.gelu(F.layer_norm(query, (c,), state["dw_conv.1.1.weight"], state["dw_conv.1.1.bias"], eps=1e-6))
    offset = F.linear(query, state["offset.weight"], state["offset.bias"])
    logits = F.linear(query, state["mask.weight"], state["mask.bias"]).reshape(n, h, w, group, -1)
    mask = logits.softmax(-1).reshape(n, h, w, -1)
    out = dcnv3_core_reference(projected, offset, mask, kernel, kernel, 1, 1, pad, pad, 1, 1, group,
                               c // group, offset_scale)
    if "center_feature_scale_proj_weight" in state:
        gate = torch.sigmoid(F.linear(query, state["center_feature_scale_proj_weight"],
                                      state["center_feature_scale_proj_bias"]))
        gate = gate[..., None].expand(n, h, w, group, c // group).reshape(n, h, w, c)
        out = out * (1 - gate) + projected * gate
    return F.linear(out, state["output_proj.weight"], state["output_proj.bias"])


@pytest.mark.parametrize("center_feature_scale", [False, True])
@pytest.mark.parametrize("channels,group,kernel,dw_kernel", [(24, 3, 3, 3), (20, 4, 5, 3)])
def test_dcnv3_loads_internimage_state_and_matches_its_composition(center_feature_scale, channels, group,
                                                                   kernel, dw_kernel):
    pad = (kernel - 1) // 2
    state = internimage_dcnv3_state(channels, group, kernel, dw_kernel, center_feature_scale)
    layer = DCNv3(channels, kernel, dw_kernel, stride=1, pad=pad, group=group, offset_scale=1.5,
                  center_feature_scale=center_feature_scale).double()
    assert set(layer.state_dict()) == set(state)
    layer.load_state_dict(state, strict=True)
    x = _randn(torch.Generator().manual_seed(1), 2, 9, 11, channels)
    expected = dcnv3_composition(state, x, group=group, kernel=kernel, dw_kernel=dw_kernel, pad=pad,
                                 offset_scale=1.5)
    torch.testing.assert_close(layer.forward_channels_last(x), expected, rtol=1e-10, atol=1e-10)
    # Channels-first face: the same numbers, transposed.
    torch.testing.assert_close(layer(x.permute(0, 3, 1, 2)), expected.permute(0, 3, 1, 2),
                               rtol=1e-10, atol=1e-10)


def internimage_dcnv4_state(channels: int, group: int, kernel: int, remove_center: bool,
                            dw_kernel: int | None, center_feature_scale: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    packed = math.ceil(group * (kernel * kernel - int(remove_center)) * 3 / 8) * 8
    state = {
        "value_proj.weight": _randn(g, channels, channels, scale=channels ** -0.5),
        "value_proj.bias": _randn(g, channels, scale=0.1),
        "output_proj.weight": _randn(g, channels, channels, scale=channels ** -0.5),
        "output_proj.bias": _randn(g, channels, scale=0.1),
        "offset_mask.weight": _randn(g, packed, channels, scale=0.6),
        "offset_mask.bias": _randn(g, packed, scale=0.4),
    }
    if dw_kernel is not None:
        state["offset_mask_dw.weight"] = _randn(g, channels, 1, dw_kernel, dw_kernel, scale=0.3)
        state["offset_mask_dw.bias"] = _randn(g, channels, scale=0.1)
    if center_feature_scale:
        state["center_feature_scale_proj_weight"] = _randn(g, group, channels, scale=0.3)
        state["center_feature_scale_proj_bias"] = _randn(g, group, scale=0.3)
    return state


def dcnv4_composition(state, x, *, group, kernel, pad, offset_scale, remove_center, dw_kernel):
    """FlashInternImage's DCNv4 forward (stride 1), written out: x [N, H, W, C] -> [N, H, W, C]."""
    n, h, w, c = x.shape
    value = F.linear(x, state["value_proj.weight"], state["value_proj.bias"])
    query = x
    if dw_kernel is not None:
        query = F.conv2d(x.permute(0, 3, 1, 2), state["offset_mask_dw.weight"], state["offset_mask_dw.bias"],
                         padding=(dw_kernel - 1) // 2, groups=c).permute(0, 2, 3, 1)
    offset_mask = F.linear(query, state["offset_mask.weight"], state["offset_mask.bias"])
    out = dcnv4_core_reference(value, offset_mask, kernel, kernel, 1, 1, pad, pad, 1, 1, group, c // group,
                               offset_scale, remove_center)
    if "center_feature_scale_proj_weight" in state:
        gate = torch.sigmoid(F.linear(out, state["center_feature_scale_proj_weight"],
                                      state["center_feature_scale_proj_bias"]))
        gate = gate[..., None].expand(n, h, w, group, c // group).reshape(n, h, w, c)
        out = out * (1 - gate) + value * gate
    return F.linear(out, state["output_proj.weight"], state["output_proj.bias"])


@pytest.mark.parametrize("remove_center,dw_kernel,center_feature_scale",
                         [(False, None, False), (True, 3, True), (True, None, False)])
def test_dcnv4_loads_official_state_and_matches_its_composition(remove_center, dw_kernel, center_feature_scale):
    channels, group, kernel = 24, 2, 3  # group_channels 12: not a multiple of 16
    state = internimage_dcnv4_state(channels, group, kernel, remove_center, dw_kernel, center_feature_scale)
    layer = DCNv4(channels, kernel, 1, 1, 1, group, 0.5, dw_kernel, center_feature_scale,
                  remove_center).double()
    assert set(layer.state_dict()) == set(state)
    layer.load_state_dict(state, strict=True)
    x = _randn(torch.Generator().manual_seed(2), 2, 8, 10, channels)
    expected = dcnv4_composition(state, x, group=group, kernel=kernel, pad=1, offset_scale=0.5,
                                 remove_center=remove_center, dw_kernel=dw_kernel)
    torch.testing.assert_close(layer.forward_channels_last(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x.permute(0, 3, 1, 2)), expected.permute(0, 3, 1, 2),
                               rtol=1e-10, atol=1e-10)


def test_fresh_dcnv3_averages_the_regular_grid():
    # Zero offsets and zero mask logits: each group's 9 points weigh 1/9 each, so the op is a
    # 3x3 mean with zero padding of the projected input (count_include_pad).
    layer = DCNv3(16, group=4).double()
    x = _randn(torch.Generator().manual_seed(3), 2, 16, 7, 9)
    projected = F.linear(x.permute(0, 2, 3, 1), layer.input_proj.weight, layer.input_proj.bias)
    pooled = F.avg_pool2d(projected.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=True)
    expected = F.linear(pooled.permute(0, 2, 3, 1), layer.output_proj.weight, layer.output_proj.bias)
    torch.testing.assert_close(layer(x), expected.permute(0, 3, 1, 2), rtol=1e-10, atol=1e-10)


def test_dcnv4_with_zero_offsets_and_unit_weights_is_a_box_sum():
    # Zero offsets with every raw weight 1 (set through the head's bias): a 3x3 sum with zero
    # padding of the value projection. A fresh layer (all weights 0) outputs the output bias.
    layer = DCNv4(16, group=2).double()
    x = _randn(torch.Generator().manual_seed(4), 1, 16, 6, 5)
    torch.testing.assert_close(layer(x), layer.output_proj.bias.view(1, -1, 1, 1).expand(1, 16, 6, 5))
    with torch.no_grad():
        for g in range(2):  # per group: 18 offsets, then 9 weights
            layer.offset_mask.bias[g * 27 + 18:g * 27 + 27] = 1.0
    value = F.linear(x.permute(0, 2, 3, 1), layer.value_proj.weight, layer.value_proj.bias)
    summed = 9 * F.avg_pool2d(value.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=True)
    expected = F.linear(summed.permute(0, 2, 3, 1), layer.output_proj.weight, layer.output_proj.bias)
    torch.testing.assert_close(layer(x), expected.permute(0, 3, 1, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [
    lambda stride: DCNv3(16, group=2, stride=stride, center_feature_scale=True),
    lambda stride: DCNv4(16, group=2, stride=stride, dw_kernel_size=3),
    lambda stride: DCNv4(16, group=2, stride=stride, remove_center=True),
])
def test_stride_two_samples_the_stride_one_output_at_every_other_position(make):
    # The offset branch runs at the output positions, so a stride-2 layer equals its
    # stride-1 twin (same parameters) read at [::2, ::2].
    torch.manual_seed(5)
    one, two = make(1).double(), make(2).double()
    for p in one.parameters():
        torch.nn.init.normal_(p, std=0.3)
    two.load_state_dict(one.state_dict())
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64)
    out = two(x)
    assert out.shape == (2, 16, 5, 4)
    torch.testing.assert_close(out, one(x)[:, :, ::2, ::2], rtol=1e-10, atol=1e-10)


def test_offset_sampling_starts_as_identity_and_shifts_each_channel_by_its_offset():
    layer = OffsetSampling(3).double()
    x = _randn(torch.Generator().manual_seed(6), 2, 3, 6, 7)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    # Channel 1 reads one row down (dy = +1), channel 2 half a pixel right (dx = +0.5);
    # offsets are (dy, dx) per channel: offset channels 2c, 2c + 1.
    with torch.no_grad():
        layer.offset_branch.bias[2] = 1.0
        layer.offset_branch.bias[5] = 0.5
    out = layer(x)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1, :-1], x[:, 1, 1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 1, -1], torch.zeros_like(x[:, 1, -1]), rtol=0, atol=1e-12)
    right = torch.cat([x[:, 2, :, 1:], torch.zeros_like(x[:, 2, :, :1])], dim=-1)
    torch.testing.assert_close(out[:, 2], (x[:, 2] + right) / 2, rtol=1e-12, atol=1e-12)


def test_offset_branch_parameters_names_every_layers_branch():
    model = torch.nn.ModuleDict({
        "v3": DCNv3(8, group=2, center_feature_scale=True),
        "v4": DCNv4(8, group=2, dw_kernel_size=3),
        "sampling": OffsetSampling(8),
    })
    found = {name for kind, name, _ in offset_branch_parameters(model) if kind == "deform_conv"}
    assert found == {
        "v3.dw_conv.0.weight", "v3.dw_conv.0.bias", "v3.dw_conv.1.1.weight", "v3.dw_conv.1.1.bias",
        "v3.offset.weight", "v3.offset.bias", "v3.mask.weight", "v3.mask.bias",
        "v4.offset_mask.weight", "v4.offset_mask.bias", "v4.offset_mask_dw.weight", "v4.offset_mask_dw.bias",
        "sampling.offset_branch.weight", "sampling.offset_branch.bias",
    }


@pytest.mark.parametrize("build,match", [
    (lambda: DCNv3(10, group=4), r"channels \(10\) must be divisible by group \(4\)"),
    (lambda: DCNv3(8, group=2, dw_kernel_size=2), r"dw_kernel_size must be an odd int"),
    (lambda: DCNv3(8, group=2, norm_layer="GN"), r"norm_layer must be 'LN' or 'BN'"),
    (lambda: DCNv3(8, group=2, act_layer="Tanh"), r"act_layer must be one of"),
    (lambda: DCNv4(8, group=2, kernel_size=4, remove_center=True), r"remove_center needs an odd kernel_size"),
    (lambda: DCNv4(8, group=2, stride=0), r"stride must be an int >= 1"),
    (lambda: DCNv4(8, group=2, center_feature_scale=True, without_pointwise=True), r"without_pointwise"),
    (lambda: OffsetSampling(0), r"channels must be an int >= 1"),
])
def test_bad_layer_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("make,kind", [
    (lambda: DCNv3(12, kernel_size=3, group=3, offset_scale=0.7), "dcnv3"),
    (lambda: DCNv3(12, kernel_size=5, pad=4, dilation=2, group=2, stride=2), "dcnv3"),
    (lambda: DCNv4(12, kernel_size=3, group=2, offset_scale=1.3, remove_center=True, without_pointwise=True), "dcnv4"),
    (lambda: DCNv4(12, kernel_size=3, group=3, dw_kernel_size=3, without_pointwise=True), "dcnv4"),
])
def test_sampling_offsets_reproduce_the_layer_as_a_depthwise_deform_conv2d(make, kind):
    # The offsets and weights a layer reports in deform_conv2d's terms, fed to a depthwise
    # deform_conv2d with unit weights over the projected input, give the op's output.
    from detkit.ops import deform_conv2d

    torch.manual_seed(7)
    layer = make().double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    geometry = layer.sampling_geometry
    offset, weight = layer.sampling_offsets(x)
    value = x if kind == "dcnv4" else F.linear(x.permute(0, 2, 3, 1), layer.input_proj.weight,
                                               layer.input_proj.bias).permute(0, 3, 1, 2)
    ones = torch.ones(12, 1, *geometry.kernel_size, dtype=torch.float64)
    sampled = deform_conv2d(value, offset, ones, None, geometry.stride, geometry.padding, geometry.dilation, weight)
    if kind == "dcnv4":
        expected = layer(x)
    else:  # undo the output projection
        out = layer.forward_channels_last(x.permute(0, 2, 3, 1))
        expected = torch.linalg.solve(layer.output_proj.weight, (out - layer.output_proj.bias).unsqueeze(-1))
        expected = expected.squeeze(-1).permute(0, 3, 1, 2)
    torch.testing.assert_close(sampled, expected, rtol=1e-9, atol=1e-9)
