"""detkit.ops.deform_conv2d against torchvision and the plain-PyTorch reference.

Every random tensor comes from a seeded generator; forward and all gradients
(input, offset, weight, mask, bias) are compared.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
import torchvision

import detkit.ops
from detkit.ops import deform_conv2d
from detkit.ops.reference import deform_conv2d_reference
from tests.helpers import (
    assert_close_scaled,
    assert_results_match,
    forward_backward,
    generator,
    normal,
    uniform,
)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class ConvCase:
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True
    seed: int = 0
    offset_range: float = 3.5

    @property
    def id(self) -> str:
        def fmt(v):
            return str(v) if isinstance(v, int) else f"{v[0]}x{v[1]}"
        return (f"b{self.batch}_c{self.in_channels}to{self.out_channels}_{self.height}x{self.width}"
                f"_k{self.kernel[0]}x{self.kernel[1]}_s{fmt(self.stride)}_p{fmt(self.padding)}"
                f"_d{fmt(self.dilation)}_g{self.groups}_og{self.offset_groups}"
                f"{'_mask' if self.mask else ''}{'_bias' if self.bias else ''}")

    def output_size(self) -> tuple[int, int]:
        (sh, sw), (ph, pw), (dh, dw) = _pair(self.stride), _pair(self.padding), _pair(self.dilation)
        kh, kw = self.kernel
        return ((self.height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
                (self.width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)

    def tensors(self, dtype=torch.float64) -> dict:
        """input, offset, weight, mask, bias (None where absent), seeded by the case."""
        gen = generator(self.seed)
        kh, kw = self.kernel
        ho, wo = self.output_size()
        taps = self.offset_groups * kh * kw
        fan_in = self.in_channels // self.groups * kh * kw
        return {
            "input": normal((self.batch, self.in_channels, self.height, self.width), gen, dtype=dtype),
            "offset": uniform((self.batch, 2 * taps, ho, wo), gen, -self.offset_range,
                              self.offset_range, dtype=dtype),
            "weight": normal((self.out_channels, self.in_channels // self.groups, kh, kw), gen,
                             std=1 / math.sqrt(fan_in), dtype=dtype),
            "mask": uniform((self.batch, taps, ho, wo), gen, 0.0, 1.0, dtype=dtype) if self.mask else None,
            "bias": normal((self.out_channels,), gen, dtype=dtype) if self.bias else None,
        }

    def conv_args(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


HAND_PICKED = [
    # Offset groups and conv groups that do not nest.
    ConvCase(2, 6, 4, 5, 7, (3, 3), 1, 1, 1, groups=2, offset_groups=3, seed=1),
    ConvCase(1, 12, 8, 6, 6, (2, 3), (1, 2), (0, 1), (2, 1), groups=4, offset_groups=3, bias=False, seed=2),
    # 1xN and Nx1 inputs.
    ConvCase(3, 4, 2, 1, 9, (5, 5), 1, 2, 1, groups=1, offset_groups=4, mask=False, seed=3),
    ConvCase(2, 3, 3, 7, 1, (3, 3), 1, 1, 1, seed=4),
    ConvCase(1, 2, 3, 1, 6, (1, 1), seed=5, mask=False, bias=False),
    # Nested groups, both ways round.
    ConvCase(2, 8, 4, 6, 5, (1, 1), 2, 0, 1, groups=4, offset_groups=2, seed=6),
    ConvCase(1, 4, 6, 4, 8, (3, 3), (2, 1), (2, 0), (1, 2), groups=2, offset_groups=4, seed=7),
    # 5x5 with dilation, more output channels than input channels.
    ConvCase(2, 4, 8, 9, 8, (5, 5), (1, 2), (3, 1), (2, 1), groups=2, offset_groups=2, mask=False, seed=8),
]


def _random_cases(count: int, seed: int) -> list[ConvCase]:
    rng = random.Random(seed)
    kernels = [(1, 1), (3, 3), (2, 3), (5, 5), (3, 2)]
    cases = []
    while len(cases) < count:
        kernel = rng.choice(kernels)
        groups = rng.choice([1, 2, 4])
        offset_groups = rng.choice([1, 2, 3, 4])
        in_channels = math.lcm(groups, offset_groups) * rng.choice([1, 2])
        out_channels = groups * rng.choice([1, 2, 3])

        def int_or_pair(values):
            if rng.random() < 0.5:
                return rng.choice(values)
            a, b = rng.choice(values), rng.choice(values)
            return (a, b) if a != b else (a, (b % max(values)) + min(values))

        stride = int_or_pair([1, 2, 3])
        padding = int_or_pair([0, 1, 2])
        dilation = int_or_pair([1, 2])
        (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
        min_h = max(1, dh * (kernel[0] - 1) + 1 - 2 * ph)
        min_w = max(1, dw * (kernel[1] - 1) + 1 - 2 * pw)
        height = min_h + rng.randint(0, 5)
        width = min_w + rng.randint(0, 5)
        if rng.random() < 0.15 and min_h == 1:
            height = 1  # 1xN
        cases.append(ConvCase(
            batch=rng.randint(1, 3), in_channels=in_channels, out_channels=out_channels,
            height=height, width=width, kernel=kernel, stride=stride, padding=padding,
            dilation=dilation, groups=groups, offset_groups=offset_groups,
            mask=rng.random() < 0.6, bias=rng.random() < 0.6, seed=1000 + len(cases),
            offset_range=rng.choice([2.0, 3.0, 3.5])))
    return cases


CASES = HAND_PICKED + _random_cases(34, seed=20240611)


def _detkit(input, offset, weight, bias=None, mask=None, **conv):
    return deform_conv2d(input, offset, weight, bias, mask=mask, **conv)


def _torchvision(input, offset, weight, bias=None, mask=None, **conv):
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, mask=mask, **conv)


def _reference(input, offset, weight, bias=None, mask=None, **conv):
    return deform_conv2d_reference(input, offset, weight, bias, mask=mask, **conv)


def test_cases_cover_the_brief():
    """The generated configurations really contain what the comparisons claim to cover."""
    kernels = {c.kernel for c in CASES}
    assert {(1, 1), (3, 3), (2, 3), (5, 5)} <= kernels
    assert {c.groups for c in CASES} >= {1, 2, 4}
    assert {c.offset_groups for c in CASES} >= {1, 2, 4}
    assert any(c.groups % c.offset_groups and c.offset_groups % c.groups for c in CASES)
    assert any(c.height == 1 or c.width == 1 for c in CASES)
    for attr in ("stride", "padding", "dilation"):
        values = [getattr(c, attr) for c in CASES]
        assert any(isinstance(v, int) for v in values)
        assert any(not isinstance(v, int) and v[0] != v[1] for v in values)
    assert {(c.mask, c.bias) for c in CASES} == {(True, True), (True, False), (False, True), (False, False)}
    assert {c.batch for c in CASES} == {1, 2, 3}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torchvision_float64(case: ConvCase):
    tensors = case.tensors(torch.float64)
    ours = forward_backward(_detkit, tensors, grad_seed=case.seed + 7, **case.conv_args())
    theirs = forward_backward(_torchvision, tensors, grad_seed=case.seed + 7, **case.conv_args())
    assert_results_match(ours, theirs, rel=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torchvision_float32(case: ConvCase):
    tensors = case.tensors(torch.float32)
    ours = forward_backward(_detkit, tensors, grad_seed=case.seed + 7, **case.conv_args())
    theirs = forward_backward(_torchvision, tensors, grad_seed=case.seed + 7, **case.conv_args())
    assert ours[0].dtype == torch.float32
    assert_results_match(ours, theirs, rel=1e-4)


@pytest.mark.parametrize("case", HAND_PICKED[:6], ids=lambda c: c.id)
def test_matches_reference_float64(case: ConvCase):
    tensors = case.tensors(torch.float64)
    ours = forward_backward(_detkit, tensors, grad_seed=case.seed + 11, **case.conv_args())
    ref = forward_backward(_reference, tensors, grad_seed=case.seed + 11, **case.conv_args())
    assert_results_match(ours, ref, rel=1e-10)


# ---------------------------------------------------------------- memory layouts

def _padded_view(t: torch.Tensor, gen: torch.Generator, dim: int) -> torch.Tensor:
    """A strided view of `t`'s values: every other slice along `dim` of a bigger tensor
    whose other slices hold large random junk (read by mistake, it would show)."""
    shape = list(t.shape)
    shape[dim] *= 2
    big = normal(shape, gen, std=100.0, dtype=t.dtype)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, 2)
    big[tuple(index)] = t
    view = big[tuple(index)]
    assert not view.is_contiguous() or t.shape[dim] == 1
    return view


def _non_contiguous(name: str, t: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "channels_last" and t.dim() == 4:
        out = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and t.dim() == 4:
        out = t.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "transposed":
        out = _padded_view(t, gen, 0)
    else:  # "sliced"
        out = _padded_view(t, gen, 0 if name == "bias" else 1)
    torch.testing.assert_close(out, t, rtol=0, atol=0)
    return out


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("which", ["input", "offset", "weight", "mask", "bias", "all"])
def test_non_contiguous_inputs(which: str, layout: str):
    case = ConvCase(2, 6, 4, 5, 6, (3, 3), (1, 2), 1, (2, 1), groups=2, offset_groups=3, seed=31)
    tensors = case.tensors()
    gen = generator(32)
    strided = {
        name: (_non_contiguous(name, t, layout, gen) if which in (name, "all") else t)
        for name, t in tensors.items()
    }
    changed = [name for name in strided if which in (name, "all")]
    assert any(not strided[name].is_contiguous() for name in changed)
    got = forward_backward(_detkit, strided, grad_seed=33, **case.conv_args())
    want = forward_backward(_detkit, {k: v.contiguous() for k, v in tensors.items()}, grad_seed=33,
                            **case.conv_args())
    assert_results_match(got, want, rel=1e-13)


# ---------------------------------------------------------------- empty batch

@pytest.mark.parametrize("with_mask", [False, True], ids=["dcnv1", "dcnv2"])
def test_batch_size_zero(with_mask: bool):
    case = ConvCase(0, 4, 6, 5, 7, (3, 3), (2, 1), 1, 1, groups=2, offset_groups=2, mask=with_mask, seed=41)
    tensors = {k: (v.requires_grad_(True) if v is not None else None) for k, v in case.tensors().items()}
    out = deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                        case.stride, case.padding, case.dilation, tensors["mask"])
    assert out.shape == (0, case.out_channels, *case.output_size())
    out.sum().backward()
    for name, t in tensors.items():
        if t is None:
            continue
        assert t.grad is not None, name
        assert t.grad.shape == t.shape, name
    assert torch.equal(tensors["weight"].grad, torch.zeros_like(tensors["weight"]))
    assert torch.equal(tensors["bias"].grad, torch.zeros_like(tensors["bias"]))


# ---------------------------------------------------------------- gradcheck

def _gradcheck_offsets(shape, gen: torch.Generator) -> torch.Tensor:
    """Offsets whose sample positions sit 0.1..0.9 px inside a pixel cell.

    The undeformed tap positions are integers, so an offset of n + 0.5 + u with
    integer n and |u| < 0.4 never lands within 0.1 px of a grid line, where
    bilinear interpolation has a kink and finite differences would straddle it.
    n in [-3, 3] sends many samples across and beyond the border.
    """
    whole = torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
    return whole + 0.5 + uniform(shape, gen, -0.4, 0.4)


GRADCHECK_CASES = [
    ConvCase(1, 2, 3, 4, 4, (3, 3), 1, 1, 1, mask=False, bias=False, seed=51),
    ConvCase(2, 2, 2, 4, 5, (3, 3), 1, 1, 1, mask=True, bias=True, seed=52),
    ConvCase(1, 4, 4, 4, 4, (3, 3), (2, 1), 1, (1, 2), groups=2, offset_groups=2, mask=True, bias=True, seed=53),
    ConvCase(1, 4, 2, 3, 4, (2, 3), 1, (1, 0), 1, groups=2, offset_groups=4, mask=False, bias=True, seed=54),
    ConvCase(1, 6, 2, 3, 3, (3, 3), 1, 1, 1, groups=2, offset_groups=3, mask=True, bias=False, seed=55),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck(case: ConvCase):
    tensors = case.tensors()
    gen = generator(case.seed + 100)
    tensors["offset"] = _gradcheck_offsets(tensors["offset"].shape, gen)
    names = [n for n, t in tensors.items() if t is not None]
    leaves = [tensors[n].clone().requires_grad_(True) for n in names]

    def fn(*args):
        kw = dict(zip(names, args))
        return deform_conv2d(kw["input"], kw["offset"], kw["weight"], kw.get("bias"), case.stride,
                             case.padding, case.dilation, kw.get("mask"))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- opcheck and fake kernels

OPCHECK_CASES = [
    ConvCase(2, 4, 4, 5, 5, (3, 3), 1, 1, 1, groups=2, offset_groups=2, mask=True, bias=True, seed=61),
    ConvCase(1, 3, 2, 4, 6, (2, 3), (2, 1), (1, 0), 1, mask=False, bias=False, seed=62),
    ConvCase(1, 6, 4, 4, 4, (3, 3), 1, 1, (1, 2), groups=2, offset_groups=3, mask=True, bias=False, seed=63),
]


def _op_args(case: ConvCase, dtype=torch.float64, requires_grad=True) -> tuple:
    t = case.tensors(dtype)
    if requires_grad:
        t = {k: (v.requires_grad_(True) if v is not None else None) for k, v in t.items()}
    return (t["input"], t["offset"], t["weight"], t["mask"], t["bias"],
            list(_pair(case.stride)), list(_pair(case.padding)), list(_pair(case.dilation)))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck(case: ConvCase):
    torch.library.opcheck(torch.ops.detkit.deform_conv2d.default, _op_args(case))


BACKWARD_OPCHECK_CASES = OPCHECK_CASES + [
    ConvCase(2, 4, 6, 5, 5, (3, 3), 1, 1, 1, groups=1, offset_groups=1, mask=False, bias=True, seed=64),
    ConvCase(1, 4, 4, 5, 5, (3, 3), 1, 1, 1, groups=4, offset_groups=1, mask=False, bias=True, seed=65),
    ConvCase(1, 4, 4, 5, 5, (1, 1), 1, 0, 1, groups=1, offset_groups=2, mask=True, bias=True, seed=66),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", BACKWARD_OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_backward_op(case: ConvCase, dtype):
    """The backward op's fake kernel predicts the real one's shapes and strides: inductor
    asserts those strides at run time in compiled training."""
    args = _op_args(case, dtype, requires_grad=False)
    ho, wo = case.output_size()
    grad_output = normal((case.batch, case.out_channels, ho, wo), generator(case.seed + 1), dtype=dtype)
    torch.library.opcheck(torch.ops.detkit.deform_conv2d_backward.default, (grad_output, *args),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- non-finite and huge offsets

BAD_OFFSET_CASES = [
    ConvCase(2, 6, 4, 5, 6, (3, 3), 1, 1, 1, groups=2, offset_groups=3, mask=True, bias=True, seed=71),
    ConvCase(1, 4, 3, 4, 7, (2, 3), (1, 2), (1, 0), (2, 1), groups=1, offset_groups=2, mask=False,
             bias=True, seed=72),
]


def _spoil_offsets(offset: torch.Tensor, gen: torch.Generator, values: list[float]):
    """Replace about a third of the (dy, dx) pairs: dy, dx or both get a value from `values`.

    Returns the spoiled offsets and a boolean [B, G*K, Ho, Wo] map of the spoiled samples.
    """
    b, c2, ho, wo = offset.shape
    pairs = offset.reshape(b, c2 // 2, 2, ho, wo).clone()
    spoiled = torch.rand((b, c2 // 2, ho, wo), generator=gen) < 0.35
    which = torch.randint(0, 3, (b, c2 // 2, ho, wo), generator=gen)  # 0: dy, 1: dx, 2: both
    choice = torch.randint(0, len(values), (b, c2 // 2, 2, ho, wo), generator=gen)
    replacement = torch.tensor(values, dtype=offset.dtype)[choice]
    hit_y = spoiled & (which != 1)
    hit_x = spoiled & (which != 0)
    pairs[:, :, 0] = torch.where(hit_y, replacement[:, :, 0], pairs[:, :, 0])
    pairs[:, :, 1] = torch.where(hit_x, replacement[:, :, 1], pairs[:, :, 1])
    assert spoiled.any() and (~spoiled).any()
    return pairs.reshape_as(offset), spoiled


def _as_zero_mask(case: ConvCase, tensors: dict, spoiled: torch.Tensor) -> dict:
    """The same call with the spoiled samples switched off through the mask and harmless offsets."""
    mask = tensors["mask"] if tensors["mask"] is not None else torch.ones(spoiled.shape, dtype=torch.float64)
    offset = tensors["offset"]
    harmless = torch.where(torch.isfinite(offset) & (offset.abs() < 1e5), offset, torch.zeros_like(offset))
    return {**tensors, "offset": harmless, "mask": mask * (~spoiled)}


@pytest.mark.parametrize("values", [[float("nan")], [float("inf"), float("-inf")], [1e6, -1e6],
                                    [float("nan"), float("inf"), -1e6]],
                         ids=["nan", "inf", "huge", "mixed"])
@pytest.mark.parametrize("case", BAD_OFFSET_CASES, ids=lambda c: c.id)
def test_non_finite_and_huge_offsets_read_zero(case: ConvCase, values):
    tensors = case.tensors()
    offset, spoiled = _spoil_offsets(tensors["offset"], generator(case.seed + 5), values)
    tensors["offset"] = offset
    out, grads = forward_backward(_detkit, tensors, grad_seed=case.seed + 6, **case.conv_args())
    assert torch.isfinite(out).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"grad of {name} is not finite"

    # Same result as switching those samples off through the mask.
    masked = _as_zero_mask(case, tensors, spoiled)
    out_m, grads_m = forward_backward(_detkit, masked, grad_seed=case.seed + 6, **case.conv_args())
    assert_close_scaled(out, out_m, 1e-12, "output")
    for name in ("input", "weight", "bias"):
        if name in grads:
            assert_close_scaled(grads[name], grads_m[name], 1e-12, f"grad of {name}")
    # Spoiled samples get no offset gradient; the others get the same one.
    spoiled_pairs = spoiled.unsqueeze(2).expand(-1, -1, 2, -1, -1).reshape_as(offset)
    assert torch.equal(grads["offset"][spoiled_pairs], torch.zeros_like(grads["offset"][spoiled_pairs]))
    assert_close_scaled(grads["offset"][~spoiled_pairs], grads_m["offset"][~spoiled_pairs], 1e-12,
                        "grad of offset")
    if case.mask:
        assert_close_scaled(grads["mask"][~spoiled], grads_m["mask"][~spoiled], 1e-12, "grad of mask")
        assert torch.equal(grads["mask"][spoiled], torch.zeros_like(grads["mask"][spoiled]))

    # Same result as pushing those samples far outside the image with finite offsets.
    far = {**tensors, "offset": torch.where(torch.isfinite(offset), offset, torch.full_like(offset, 1e7))}
    out_f, grads_f = forward_backward(_detkit, far, grad_seed=case.seed + 6, **case.conv_args())
    torch.testing.assert_close(out, out_f, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_f[name], rtol=0, atol=0)


def test_huge_offsets_match_torchvision():
    case = BAD_OFFSET_CASES[0]
    tensors = case.tensors()
    tensors["offset"], _ = _spoil_offsets(tensors["offset"], generator(81), [1e6, -1e6, 3e5])
    ours = forward_backward(_detkit, tensors, grad_seed=82, **case.conv_args())
    theirs = forward_backward(_torchvision, tensors, grad_seed=82, **case.conv_args())
    assert_results_match(ours, theirs, rel=1e-10)


# ---------------------------------------------------------------- argument checks

def _good_args():
    gen = generator(91)
    return {
        "input": normal((2, 4, 6, 6), gen),
        "offset": normal((2, 2 * 2 * 9, 4, 4), gen),  # 2 offset groups, 3x3 kernel, no padding
        "weight": normal((6, 2, 3, 3), gen),  # groups = 2
        "bias": normal((6,), gen),
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "mask": uniform((2, 2 * 9, 4, 4), gen, 0, 1),
    }


def _call(**changes):
    args = {**_good_args(), **changes}
    return deform_conv2d(**args)


def test_good_args_are_good():
    """The baseline the argument-check tests spoil one thing of is itself valid."""
    args = _good_args()
    out = deform_conv2d(**args)
    ref = torchvision.ops.deform_conv2d(**args)
    assert_close_scaled(out, ref, 1e-10)


_G = generator(92)
BAD_ARGS = [
    ("input_3d", {"input": normal((4, 6, 6), _G)}, ValueError, r"input must be a 4-d"),
    ("weight_3d", {"weight": normal((6, 2, 9), _G)}, ValueError, r"weight must be a 4-d"),
    ("offset_channels", {"offset": normal((2, 2 * 2 * 9 + 3, 4, 4), _G)}, ValueError, r"offset\.shape\[1\]"),
    ("offset_spatial", {"offset": normal((2, 36, 4, 5), _G)}, ValueError, r"offset must have shape"),
    ("offset_batch", {"offset": normal((3, 36, 4, 4), _G)}, ValueError, r"offset must have shape"),
    ("mask_channels", {"mask": uniform((2, 9, 4, 4), _G)}, ValueError, r"mask must have shape"),
    ("mask_batch", {"mask": uniform((1, 18, 4, 4), _G)}, ValueError, r"mask must have shape"),
    ("mask_3d", {"mask": uniform((2, 18, 16), _G)}, ValueError, r"mask must be a 4-d"),
    ("bias_length", {"bias": normal((5,), _G)}, ValueError, r"bias must have shape"),
    ("weight_dtype", {"weight": normal((6, 2, 3, 3), _G, dtype=torch.float32)}, TypeError, r"weight has dtype"),
    ("offset_dtype", {"offset": normal((2, 36, 4, 4), _G, dtype=torch.float32)}, TypeError, r"offset has dtype"),
    ("mask_dtype", {"mask": uniform((2, 18, 4, 4), _G, dtype=torch.float32)}, TypeError, r"mask has dtype"),
    ("integer_input", {"input": torch.ones(2, 4, 6, 6, dtype=torch.int64)}, TypeError, r"input must be a floating"),
    ("stride_zero", {"stride": 0}, ValueError, r"stride"),
    ("stride_pair_zero", {"stride": (1, 0)}, ValueError, r"stride"),
    ("padding_negative", {"padding": (0, -1)}, ValueError, r"padding"),
    ("dilation_zero", {"dilation": 0}, ValueError, r"dilation"),
    ("stride_bad_type", {"stride": 1.5}, TypeError, r"stride"),
    ("padding_triple", {"padding": (1, 1, 1)}, TypeError, r"padding"),
    ("weight_channels", {"weight": normal((6, 3, 3, 3), _G)}, ValueError, r"weight\.shape\[1\]"),
    ("weight_out_channels", {"weight": normal((5, 2, 3, 3), _G), "bias": normal((5,), _G)}, ValueError,
     r"weight\.shape\[0\]"),
    ("offset_not_tensor", {"offset": [[0.0] * 4]}, TypeError, r"offset must be a Tensor"),
    ("input_too_small", {"input": normal((2, 4, 2, 2), _G)}, ValueError, r"too small"),
]


@pytest.mark.parametrize("changes,error,match", [a[1:] for a in BAD_ARGS], ids=[a[0] for a in BAD_ARGS])
def test_bad_arguments_raise(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_offset_groups_must_divide_channels():
    args = _good_args()
    args["offset"] = normal((2, 2 * 3 * 9, 4, 4), generator(93))  # 3 offset groups, 4 channels
    args["mask"] = None
    with pytest.raises(ValueError, match=r"offset groups"):
        deform_conv2d(**args)


RAW_BAD_ARGS = [
    ("mask_shape", {"mask": uniform((2, 9, 4, 4), _G)}, r"mask"),
    ("bias_shape", {"bias": normal((5,), _G)}, r"bias"),
    ("offset_shape", {"offset": normal((2, 36, 5, 4), _G)}, r"offset"),
    ("weight_dtype", {"weight": normal((6, 2, 3, 3), _G, dtype=torch.float32)}, r"weight"),
    ("weight_channels", {"weight": normal((6, 3, 3, 3), _G)}, r"weight"),
    ("stride_zero", {"stride": [0, 1]}, r"stride"),
]


@pytest.mark.parametrize("changes,match", [a[1:] for a in RAW_BAD_ARGS], ids=[a[0] for a in RAW_BAD_ARGS])
def test_kernel_checks_its_arguments(changes, match):
    """Called directly (as compiled graphs do), the C++ op checks the shapes itself."""
    a = {**_good_args(), "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], **changes}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.detkit.deform_conv2d(a["input"], a["offset"], a["weight"], a["mask"], a["bias"],
                                       a["stride"], a["padding"], a["dilation"])


def test_ops_are_loaded():
    assert detkit.ops._extension.LOADED
    assert hasattr(torch.ops.detkit, "deform_conv2d")
