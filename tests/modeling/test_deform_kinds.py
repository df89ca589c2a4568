"""Every generation of deformable conv in the ResNet backbone by configuration (deform_kind):
placement, strides, the offset branches the optimizer finds, fresh layers' functions, and
torchvision weights loading into each kind."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from detkit.modeling.backbone import ResNet, deformable_layers, load_torchvision_weights
from detkit.modeling.backbone.resnet import DEFORM_KINDS, DeformSpec
from detkit.ops import DCNv3, DCNv4, DeformConv2d, OffsetSampling, offset_branch_parameters

C3_C5 = {"res3": "all", "res4": "all", "res5": "all"}
LAYER_TYPE = {"dcnv1": DeformConv2d, "dcnv2": DeformConv2d, "dcnv3": DCNv3, "dcnv4": DCNv4,
              "offset_sampling": OffsetSampling}


def _resnet(depth: int, kind: str, **kwargs) -> ResNet:
    torch.manual_seed(0)
    groups = 1 if kind == "offset_sampling" else 2
    return ResNet(depth, width=8, norm="bn", freeze_at=0, deform_blocks=C3_C5, deform_kind=kind,
                  deform_groups=groups, **kwargs)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("kind", DEFORM_KINDS)
def test_every_kind_replaces_the_chosen_3x3_convs_and_keeps_the_feature_shapes(depth, kind):
    plain = ResNet(depth, width=8, norm="bn", freeze_at=0)
    model = _resnet(depth, kind)
    layers = deformable_layers(model)
    # res3..res5 blocks: 2+2+2 (R18) or 4+6+3 (R50), every one with its layer.
    assert len(layers) == (6 if depth == 18 else 13)
    assert all(isinstance(layer, LAYER_TYPE[kind]) for _, layer in layers)
    assert all(model.stage_of(name) in ("res3", "res4", "res5") for name, _ in layers)
    if kind == "dcnv2":
        assert all(layer.modulated for _, layer in layers)
    x = torch.randn(2, 3, 64, 48)
    out, expected = model(x), plain(x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in expected.items()}
    out["res5"].sum().backward()
    branch = list(offset_branch_parameters(model))
    assert branch and all(kind_ == "deform_conv" for kind_, _, _ in branch)
    # Every branch parameter receives a gradient (the branch is wired into the forward).
    assert all(p.grad is not None for _, _, p in branch)


@pytest.mark.parametrize("kind", DEFORM_KINDS)
def test_fresh_offset_heads_are_zero_and_survive_the_backbone_init(kind):
    model = _resnet(50, kind)
    heads = {"dcnv1": ("offset_branch.",), "dcnv2": ("offset_branch.",), "offset_sampling": ("offset_branch.",),
             "dcnv3": ("offset.", "mask."), "dcnv4": ("offset_mask.",)}[kind]
    for name, layer in deformable_layers(model):
        zero = [n for n, p in layer.named_parameters() if n.startswith(heads)]
        assert zero, name
        for n, p in layer.named_parameters():
            if n.startswith(heads):
                assert torch.count_nonzero(p) == 0, f"{name}.{n}"


def test_fresh_offset_sampling_backbone_equals_the_plain_backbone_with_its_weights():
    plain = ResNet(18, width=8, norm="bn", freeze_at=0).eval()
    model = _resnet(18, "offset_sampling").eval()
    state = plain.state_dict()
    for name, _ in deformable_layers(model):  # conv2.0 -> the plain conv2's weight is conv2.1's
        conv = name[:-2]
        state[f"{conv}.1.weight"] = state.pop(f"{conv}.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(".offset_branch." in k for k in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, expected = model(x), plain(x)
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dcnv3", "dcnv4", "offset_sampling", "dcnv2"])
def test_torchvision_weights_load_into_every_kind(kind, tmp_path):
    source = ResNet(50, width=8)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    model = _resnet(50, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_torchvision_weights(model, path)
    after = model.state_dict()
    assert torch.equal(after["layer1.0.conv2.weight"], state["layer1.0.conv2.weight"])  # res2 stays plain
    conv2 = "layer3.1.conv2"
    if kind == "offset_sampling":
        assert torch.equal(after[f"{conv2}.1.weight"], state[f"{conv2}.weight"])
    elif kind == "dcnv2":
        assert torch.equal(after[f"{conv2}.weight"], state[f"{conv2}.weight"])
    else:  # no 3x3 weight: the layer keeps its own init
        own = [k for k in after if k.startswith(conv2 + ".")]
        assert own and all(torch.equal(after[k], before[k]) for k in own)
    assert all(torch.equal(after[k], before[k]) for k in after if ".offset_branch." in k)


def test_layer_options_reach_the_layers():
    model = ResNet(18, width=16, deform_blocks={"res4": [-1]}, deform_kind="dcnv4", deform_groups=4,
                   deform_options={"offset_scale": 0.5, "remove_center": True, "dw_kernel_size": 3})
    (_, layer), = deformable_layers(model)
    assert (layer.group, layer.offset_scale, layer.remove_center, layer.points) == (4, 0.5, True, 8)
    assert isinstance(layer.offset_mask_dw, nn.Conv2d)
    model = ResNet(18, width=16, deform_blocks={"res5": [0]}, deform_kind="dcnv3", deform_groups=8,
                   deform_options={"center_feature_scale": True, "norm_layer": "BN"})
    (_, layer), = deformable_layers(model)
    assert layer.group == 8 and layer.center_feature_scale and isinstance(layer.dw_conv[1][0], nn.BatchNorm2d)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "dcnv5"}, r"deform_kind must be one of \['dcnv1', 'dcnv2', 'dcnv3', 'dcnv4', 'offset_sampling'\]"),
    ({"kind": "dcnv3", "groups": 0}, r"deform_groups must be an int >= 1, got 0"),
    ({"kind": "offset_sampling", "groups": 2}, r"deform_groups must be 1 for deform_kind 'offset_sampling'"),
    ({"kind": "dcnv2", "options": {"offset_scale": 2.0}}, r"deform_options \['offset_scale'\] do not apply "
                                                          r"to deform_kind 'dcnv2' \(its options: none\)"),
    ({"kind": "dcnv3", "options": {"remove_center": True}}, r"deform_options \['remove_center'\] do not apply"),
])
def test_bad_deform_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeformSpec(**kwargs)


def test_dcnv3_on_a_conv_that_changes_channels_is_refused():
    with pytest.raises(ValueError, match=r"deform_kind 'dcnv3' keeps the channel count, but this conv maps 8 to 16"):
        DeformSpec("dcnv3", 2)(8, 16, 1, 1)


def test_groups_per_stage_keep_internimage_t_channels_per_group():
    # Half-width R34: res3/res4/res5 have 64/128/256 channels; 4/8/16 groups = 16 channels each.
    model = ResNet(34, width=32, deform_blocks=C3_C5, deform_kind="dcnv3",
                   deform_groups={"res3": 4, "res4": 8, "res5": 16})
    assert {layer.group_channels for _, layer in deformable_layers(model)} == {16}
    assert {model.stage_of(n): layer.group for n, layer in deformable_layers(model)} == \
        {"res3": 4, "res4": 8, "res5": 16}
    with pytest.raises(ValueError, match=r"unknown \['res6'\], missing \['res5'\]"):
        ResNet(34, width=32, deform_blocks=C3_C5, deform_kind="dcnv3",
               deform_groups={"res3": 4, "res4": 8, "res6": 16})
