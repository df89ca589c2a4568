"""ResNet backbone: torchvision equivalence and checkpoint loading, shapes and strides,
dilated res5, deformable placement (fresh DCNv1 = plain, fresh DCNv2 = plain with conv2 x 0.5),
freezing, GroupNorm training, and gradients into the offset branches."""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detkit.modeling.backbone import (
    FEATURE_NAMES,
    STAGE_NAMES,
    ResNet,
    block_counts,
    deformable_layers,
    last_blocks,
    load_torchvision_weights,
)
from detkit.ops import DeformConv2d
from tests.helpers import assert_close_scaled, generator, normal, uniform

SIGMOID_OF_ZERO = float(torch.sigmoid(torch.zeros(())))
REL = 1e-5          # float32, same arithmetic up to summation order
SIZE = 64           # input side: res5 is 2x2 (4x4 dilated)
SMALL = 32          # input side where only shapes/flags/gradients matter
DCN_V1_6_LAYERS = {"res5": "all", "res4": [-3, -2, -1]}
LAYER_OF = {stage: f"layer{i + 1}" for i, stage in enumerate(STAGE_NAMES)}


@functools.lru_cache(maxsize=None)
def _torchvision_resnet(depth: int) -> nn.Module:
    """A seeded torchvision ResNet in eval mode with random (not identity) BN statistics and affine.
    Shared between tests: copy it before changing it."""
    torch.manual_seed(depth)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    _randomise_batchnorms(model, generator(depth))
    return model.eval()


def _randomise_batchnorms(model: nn.Module, gen: torch.Generator) -> None:
    """Random statistics and affine for every (frozen) BN, so that loading them is visible."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.running_mean.shape
                m.running_mean.copy_(normal(c, gen, 0.1))
                m.running_var.copy_(uniform(c, gen, 0.5, 1.5))
                m.weight.copy_(uniform(c, gen, 0.5, 1.5))
                m.bias.copy_(normal(c, gen, 0.1))


@functools.lru_cache(maxsize=None)
def _meta_torchvision_resnet(depth: int) -> nn.Module:
    """torchvision's ResNet on the meta device: names, shapes and output sizes, no compute."""
    with torch.device("meta"):
        return getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()


def _meta_resnet(**kwargs) -> ResNet:
    with torch.device("meta"):
        return ResNet(**kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """depth -> path of the saved state dict of _torchvision_resnet(depth) (fc included)."""
    folder = tmp_path_factory.mktemp("checkpoints")

    @functools.lru_cache(maxsize=None)
    def path_for(depth: int):
        path = folder / f"resnet{depth}.pth"
        torch.save(_torchvision_resnet(depth).state_dict(), path)
        return path

    return path_for


def _torchvision_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run torchvision's ResNet stage by stage: conv1 -> bn1 -> relu -> maxpool -> layer1..4."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats = {"stem": x}
    for stage in STAGE_NAMES:
        x = feats[stage] = getattr(model, LAYER_OF[stage])(x)
    return feats


def _image(seed: int, size: int = SIZE, batch: int = 1) -> torch.Tensor:
    return normal((batch, 3, size, size), generator(seed), dtype=torch.float32)


def _loaded(path, **kwargs) -> ResNet:
    model = ResNet(**kwargs)
    load_torchvision_weights(model, path)
    return model.eval()


def _assert_features_close(actual: dict, expected: dict, names=FEATURE_NAMES) -> None:
    assert list(actual) == list(names)
    for name in names:
        assert_close_scaled(actual[name], expected[name], REL, name)


@pytest.mark.parametrize("depth,norm", [(18, "frozen_bn"), (18, "bn"), (50, "frozen_bn")])
def test_matches_torchvision_stage_by_stage(depth, norm, checkpoint):
    model = _loaded(checkpoint(depth), depth=depth, norm=norm, out_features=FEATURE_NAMES)
    x = _image(1)
    with torch.no_grad():
        _assert_features_close(model(x), _torchvision_features(_torchvision_resnet(depth), x))


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_state_dict_names_and_shapes_match_torchvision(depth):
    tv = _meta_torchvision_resnet(depth)
    expected = {k: v.shape for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in _meta_resnet(depth=depth, norm="bn").state_dict().items()} == expected
    # FrozenBatchNorm2d has every BN entry but the num_batches_tracked counter.
    frozen = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in _meta_resnet(depth=depth).state_dict().items()} == frozen
    assert block_counts(depth) == {s: len(getattr(tv, LAYER_OF[s])) for s in STAGE_NAMES}


@pytest.mark.parametrize("dilate", [False, True], ids=["plain", "dilated"])
@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_feature_shapes_channels_and_strides(depth, dilate):
    """On the meta device: output shapes against torchvision's, without the arithmetic."""
    model = _meta_resnet(depth=depth, norm="bn", out_features=FEATURE_NAMES, dilate_res5=dilate).eval()
    x = torch.empty(1, 3, SMALL, SMALL, device="meta")
    feats = model(x)
    reference = _torchvision_features(_meta_torchvision_resnet(depth), x)
    assert model.out_channels == {name: f.shape[1] for name, f in feats.items()}
    for name, f in feats.items():
        assert model.strides[name] == SMALL // f.shape[-1] and f.shape[-1] * model.strides[name] == SMALL
        expected = reference["res4"].shape[2:] if (dilate and name == "res5") else reference[name].shape[2:]
        assert f.shape == (1, reference[name].shape[1], *expected), name


def test_out_channels_cover_only_out_features():
    model = ResNet(18, out_features=("res3", "stem"), width=16)
    assert list(model.out_channels) == ["res3", "stem"]
    with torch.no_grad():
        feats = model.eval()(_image(3, SMALL))
    assert list(feats) == ["res3", "stem"]
    assert {k: v.shape[1] for k, v in feats.items()} == model.out_channels
    assert set(model.strides) == set(FEATURE_NAMES)


def test_dilated_res5_equals_torchvision_with_every_res5_3x3_dilated(checkpoint):
    """torchvision's replace_stride_with_dilation keeps dilation 1 in res5's first block; ours
    dilates every 3x3 conv of res5, so the reference gets that block's conv2 dilated too."""
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    reference.load_state_dict(_torchvision_resnet(50).state_dict())
    reference.layer4[0].conv2.dilation = reference.layer4[0].conv2.padding = (2, 2)
    model = _loaded(checkpoint(50), depth=50, dilate_res5=True, out_features=("res4", "res5"))
    x = _image(4)
    with torch.no_grad():
        expected = _torchvision_features(reference.eval(), x)
        _assert_features_close(model(x), expected, ("res4", "res5"))
        assert expected["res5"].shape[2:] == expected["res4"].shape[2:]


@pytest.mark.parametrize("depth", [18, 50])
def test_dilate_res5_sets_stride_dilation_padding_of_every_res5_conv(depth):
    model = _meta_resnet(depth=depth, dilate_res5=True, deform_blocks={"res5": [0]})
    convs3x3 = [(n, m) for n, m in model.layer4.named_modules()
                if isinstance(m, (nn.Conv2d, DeformConv2d)) and m.kernel_size == (3, 3) and "offset" not in n]
    assert {n.split(".")[0] for n, _ in convs3x3} == {str(i) for i in range(len(model.layer4))}
    for name, conv in convs3x3:
        assert (conv.stride, conv.dilation, conv.padding) == ((1, 1), (2, 2), (2, 2)), name
    assert model.layer4[0].downsample[0].stride == (1, 1)
    branch = model.layer4[0].conv2.offset_branch
    assert (branch.stride, branch.dilation, branch.padding) == ((1, 1), (2, 2), (2, 2))


def _halve_conv2(model: ResNet, deform_names: set[str]) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in deform_names:
                module.weight.mul_(SIGMOID_OF_ZERO)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_fresh_deformable_blocks_equal_plain_model(modulated, tmp_path):
    """Zero offsets: DCNv1 blocks equal the plain conv; DCNv2's mask sigmoid(0) scales conv2 by it.
    (ResNet-50 at width 16 with random frozen-BN statistics, to keep it fast.)"""
    plain = ResNet(50, width=16, out_features=FEATURE_NAMES)
    _randomise_batchnorms(plain, generator(11))
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    deform = _loaded(tmp_path / "plain.pth", depth=50, width=16, out_features=FEATURE_NAMES,
                     deform_blocks=DCN_V1_6_LAYERS, deform_kind="dcnv2" if modulated else "dcnv1")
    plain.eval()
    names = {n for n, _ in deformable_layers(deform)}
    assert len(names) == len(plain.layer4) + len(DCN_V1_6_LAYERS["res4"])
    x = _image(5)
    with torch.no_grad():
        unscaled = plain(x)
        if modulated:
            _halve_conv2(plain, names)
        expected = plain(x)
        actual = deform(x)
        _assert_features_close(actual, expected)
        if modulated:  # the factor matters: without it res4/res5 differ
            assert not torch.allclose(actual["res5"], unscaled["res5"], rtol=REL, atol=0)
        # Moving the offsets changes the deformable stages and nothing before them.
        deform.layer4[0].conv2.offset_branch.bias.data.fill_(0.5)
        moved = deform(x)
    assert torch.equal(moved["res4"], actual["res4"])
    assert not torch.allclose(moved["res5"], actual["res5"], rtol=REL, atol=0)


PLACEMENTS = [
    (50, DCN_V1_6_LAYERS),
    (50, {"res3": "all", "res4": "all", "res5": "all"}),
    (18, {"res2": [0], "res5": [-1]}),
    (34, {"res4": [-1, 0, 2]}),
    (101, {"res4": [-3, -2, -1]}),
]


@pytest.mark.parametrize("depth,spec", PLACEMENTS, ids=[f"r{d}-{'-'.join(s)}" for d, s in PLACEMENTS])
def test_deformable_placement(depth, spec):
    model = _meta_resnet(depth=depth, deform_blocks=spec, deform_kind="dcnv2", deform_groups=2)
    expected = set()
    for stage, which in spec.items():
        indices = list(range(len(getattr(model, LAYER_OF[stage]))))  # Python's own negative indexing
        chosen = indices if which == "all" else [indices[i] for i in which]
        expected |= {f"{LAYER_OF[stage]}.{i}.conv2" for i in chosen}
    for stage in STAGE_NAMES:
        for i, block in enumerate(getattr(model, LAYER_OF[stage])):
            name = f"{LAYER_OF[stage]}.{i}.conv2"
            assert isinstance(block.conv2, DeformConv2d) == (name in expected), name
            assert isinstance(block.conv1, nn.Conv2d) and not isinstance(block.conv1, DeformConv2d)
    found = deformable_layers(model)
    assert {n for n, _ in found} == expected
    assert all(m.modulated and m.offset_groups == 2 and m.bias is None for _, m in found)
    # deformable_layers lists them in the order forward() runs them.
    order: list[str] = []
    for name, m in found:
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
    model.eval()(torch.empty(1, 3, SMALL, SMALL, device="meta"))
    assert order == [n for n, _ in found]


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_stage_of_every_deformable_layer_of_a_conv3_5_model(depth):
    spec = {"res3": "all", "res4": "all", "res5": "all"}    # DCNv2's conv3-conv5
    model = _meta_resnet(depth=depth, deform_blocks=spec)
    found = deformable_layers(model)
    # The stage whose module tree holds each layer (by identity, not by its name).
    holder = {id(m): stage for stage in STAGE_NAMES for m in getattr(model, LAYER_OF[stage]).modules()}
    stages = [model.stage_of(name) for name, _ in found]
    assert stages == [holder[id(m)] for _, m in found]
    counts = block_counts(depth)
    assert stages == [s for s in ("res3", "res4", "res5") for _ in range(counts[s])]
    # Names outside the stages (the stem, unknown ones) have none; a stage module is its own.
    assert [model.stage_of(n) for n in ("conv1", "bn1", "layer1", "layer2.0", "layer10.0.conv2", "")] == \
        [None, None, "res2", "res3", None, None]


def test_last_blocks_matches_negative_indices():
    counts = block_counts(50)
    wanted = {"res5": counts["res5"], "res4": len(DCN_V1_6_LAYERS["res4"])}
    assert last_blocks(50, wanted) == {s: list(range(counts[s]))[-n:] for s, n in wanted.items()}
    by_helper = _meta_resnet(depth=50, deform_blocks=last_blocks(50, wanted))
    by_negative = _meta_resnet(depth=50, deform_blocks=DCN_V1_6_LAYERS)
    assert [n for n, _ in deformable_layers(by_helper)] == [n for n, _ in deformable_layers(by_negative)]
    with pytest.raises(ValueError, match=f"res4 of ResNet-50 has {counts['res4']} blocks"):
        last_blocks(50, {"res4": counts["res4"] + 1})
    with pytest.raises(ValueError, match="res1"):
        last_blocks(50, {"res1": 1})


_N5 = block_counts(50)["res5"]


@pytest.mark.parametrize("spec,pattern", [
    ({"res6": "all"}, r"unknown stage 'res6'.*'res2', 'res3', 'res4', 'res5'"),
    ({"res5": [_N5]}, rf"'res5'.*index {_N5} is out of range; res5 has {_N5} blocks"),
    ({"res5": [-_N5 - 1]}, rf"'res5'.*index {-_N5 - 1} is out of range; res5 has {_N5} blocks"),
    ({"res5": [0, -_N5]}, rf"'res5'.*block 0 is listed twice \(res5 has {_N5} blocks"),
    ({"res5": "last"}, rf"'res5'.*'all' or a list of block indices \(res5 has {_N5} blocks\), got 'last'"),
    ({"res5": [1.5]}, r"'res5'.*integers, got 1.5"),
], ids=["stage", "index-high", "index-low", "duplicate", "string", "float"])
def test_bad_deform_blocks_raise(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        ResNet(50, deform_blocks=spec)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"out_features": ("res2", "res6")}, r"'stem', 'res2', 'res3', 'res4', 'res5'.*'res6'"),
    ({"out_features": ()}, r"out_features"),
    ({"out_features": ("res3", "res3")}, r"distinct"),
    ({"depth": 152}, r"\[18, 34, 50, 101\], got 152"),
    ({"norm": "syncbn"}, r"'frozen_bn', 'bn', 'gn'.*'syncbn'"),
    ({"freeze_at": len(FEATURE_NAMES) + 1}, rf"0..{len(FEATURE_NAMES)}"),
    ({"freeze_at": -1}, rf"0..{len(FEATURE_NAMES)}"),
], ids=["unknown-feature", "no-feature", "duplicate-feature", "depth", "norm", "freeze-high", "freeze-low"])
def test_bad_arguments_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ResNet(**kwargs)


def _parts(model: ResNet, name: str) -> list[nn.Module]:
    return [model.conv1, model.bn1] if name == "stem" else [getattr(model, LAYER_OF[name])]


def _stage_of(qualified_name: str) -> str:
    """"layer3.1.conv2" -> "res4"; "conv1"/"bn1" -> "stem"."""
    layer = qualified_name.split(".")[0]
    return next((s for s, l in LAYER_OF.items() if l == layer), "stem")


@pytest.mark.parametrize("freeze_at", range(len(FEATURE_NAMES) + 1))
def test_freeze_at_sets_requires_grad_and_eval_mode_per_stage(freeze_at):
    model = ResNet(18, norm="bn", freeze_at=freeze_at, deform_blocks={"res2": "all", "res5": [-1]}, width=16)

    def check() -> None:
        assert model.training
        for index, name in enumerate(FEATURE_NAMES):
            frozen = index < freeze_at
            params = [p for part in _parts(model, name) for p in part.parameters()]
            assert params and all(p.requires_grad != frozen for p in params), name
            modules = [m for part in _parts(model, name) for m in part.modules()]
            assert all(m.training != frozen for m in modules), name

    check()                      # freshly built
    model.eval().train()
    check()                      # after eval() then train()
    offsets = {n: m.offset_branch.weight.requires_grad for n, m in deformable_layers(model)}
    assert {_stage_of(n) for n in offsets} == {"res2", "res5"}
    assert offsets == {n: FEATURE_NAMES.index(_stage_of(n)) >= freeze_at for n in offsets}
    assert not model.eval().training and not any(m.training for m in model.modules())


def test_frozen_bn_statistics_stay_fixed_in_train_mode():
    freeze_at = FEATURE_NAMES.index("res3") + 1  # stem, res2, res3 frozen
    model = ResNet(18, norm="bn", freeze_at=freeze_at, width=16).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        model(_image(7, SMALL, batch=2))
    after = model.state_dict()
    for index, name in enumerate(FEATURE_NAMES):
        bns = [m for part in _parts(model, name) for m in part.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.training == (index >= freeze_at) for m in bns), name
        prefixes = ("bn1.",) if name == "stem" else (LAYER_OF[name] + ".",)
        keys = [k for k in before if k.startswith(prefixes)]
        assert keys
        for k in keys:
            assert torch.equal(before[k], after[k]) == (index < freeze_at), k


def test_group_norm_model_trains_one_step():
    groups = 4
    model = ResNet(18, norm="gn", gn_groups=groups, freeze_at=0, width=16).train()
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == groups for m in norms)
    assert not any("running" in k for k in model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = sum(f.square().mean() for f in model(_image(8, SMALL, batch=2)).values())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), before[name]), name


def test_group_norm_model_rejects_batchnorm_checkpoint(checkpoint):
    with pytest.raises(ValueError, match=r"BatchNorm statistics.*GroupNorm"):
        load_torchvision_weights(ResNet(18, norm="gn"), checkpoint(18))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_accepts_wrapped_state_dicts(wrapper, tmp_path):
    state = _torchvision_resnet(18).state_dict()
    torch.save({wrapper: state, "epoch": 3}, tmp_path / "wrapped.pth")
    model = ResNet(18)
    load_torchvision_weights(model, tmp_path / "wrapped.pth")
    loaded = model.state_dict()
    assert loaded.keys() <= state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


@pytest.mark.parametrize("drop,add", [
    ("layer3.1.conv2.weight", "layer5.0.conv1.weight"),
    ("layer3.1.bn2.running_var", None),
    (None, "layer1.0.conv2.offset_branch.weight"),
], ids=["both", "missing", "unexpected"])
def test_load_reports_missing_and_unexpected_keys(drop, add, tmp_path):
    state = dict(_torchvision_resnet(18).state_dict())
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    model = ResNet(18)
    untouched = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"missing keys \d+.*unexpected keys \d+") as info:
        load_torchvision_weights(model, tmp_path / "bad.pth")
    message = str(info.value)
    assert f"missing keys {int(bool(drop))}" in message and f"unexpected keys {int(bool(add))}" in message
    assert all(key in message for key in (drop, add) if key)
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_load_reports_shape_mismatch(tmp_path):
    state = dict(_torchvision_resnet(18).state_dict())
    key = "layer2.0.conv1.weight"
    wrong = (state[key].shape[0] + 1, *state[key].shape[1:])
    state[key] = torch.zeros(wrong)
    torch.save(state, tmp_path / "bad.pth")
    model = ResNet(18)
    own = tuple(model.state_dict()[key].shape)
    with pytest.raises(ValueError, match=".*".join(re.escape(str(part)) for part in (key, wrong, own))):
        load_torchvision_weights(model, tmp_path / "bad.pth")


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="resnet50.pth"):
        load_torchvision_weights(ResNet(18), path)


def test_deformable_checkpoint_into_plain_model_is_rejected(tmp_path):
    deform = ResNet(18, deform_blocks={"res5": [-1]}, width=16)
    torch.save(deform.state_dict(), tmp_path / "dcn.pth")
    with pytest.raises(ValueError, match=r"unexpected keys 2 \['layer4.1.conv2.offset_branch.weight"):
        load_torchvision_weights(ResNet(18, width=16), tmp_path / "dcn.pth")


def test_gradients_reach_offset_branches_and_skip_frozen_stages():
    freeze_at = FEATURE_NAMES.index("res2") + 1
    model = ResNet(18, norm="frozen_bn", freeze_at=freeze_at, deform_blocks={"res2": "all", "res5": "all"},
                   deform_kind="dcnv2", width=16).train()
    feats = model(_image(9, SMALL, batch=2))
    gen = generator(10)
    sum((f * normal(f.shape, gen, dtype=f.dtype)).sum() for f in feats.values()).backward()
    for name, layer in deformable_layers(model):
        grad = layer.offset_branch.weight.grad
        if name.startswith(LAYER_OF["res5"]):
            assert grad is not None and grad.abs().max() > 0, name
        else:
            assert grad is None, name
    for index, name in enumerate(FEATURE_NAMES):
        grads = [p.grad for part in _parts(model, name) for p in part.parameters()]
        if index < freeze_at:
            assert all(g is None for g in grads), name
        else:
            assert all(g is not None and g.abs().max() > 0 for g in grads), name
