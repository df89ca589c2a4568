"""detkit.ops.dcnv3_core / dcnv4_core against the float64 references and the grid_sample formulation.

The references (detkit.ops.reference) are written from the official definitions, point by
point; the grid_sample formulation (detkit.ops.pure.dcnv3) is an independent
formulation of the same thing. Every random tensor comes from a seeded generator; outputs
and all gradients are compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import detkit.ops
from detkit.ops import dcnv3_core, dcnv4_core, deform_conv2d
from detkit.ops.dcnv3 import dcnv4_packed_width
from detkit.ops.pure.dcnv3 import dcnv3_core_grid_sample, dcnv4_core_grid_sample
from detkit.ops.reference import (
    dcnv3_core_reference,
    dcnv3_points,
    dcnv4_core_reference,
    dcnv4_unpack,
)
from tests.helpers import (
    assert_close_scaled,
    assert_results_match,
    forward_backward,
    generator,
    normal,
    uniform,
)


@dataclass(frozen=True)
class DcnCase:
    batch: int
    height: int
    width: int
    group: int
    group_channels: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    remove_center: bool = False
    seed: int = 0
    offset_range: float = 3.0  # offsets in (-r, r): many samples land outside the image

    @property
    def id(self) -> str:
        def fmt(v):
            return f"{v[0]}x{v[1]}"
        return (f"b{self.batch}_{self.height}x{self.width}_g{self.group}d{self.group_channels}"
                f"_k{fmt(self.kernel)}_s{fmt(self.stride)}_p{fmt(self.pad)}_d{fmt(self.dilation)}"
                f"_os{self.offset_scale}{'_rc' if self.remove_center else ''}")

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    def output_size(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        return ((self.height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
                (self.width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)

    def args(self) -> tuple:
        """The official geometry arguments, kernel_h ... remove_center."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        return (kh, kw, sh, sw, ph, pw, dh, dw, self.group, self.group_channels, self.offset_scale,
                self.remove_center)

    def tensors(self, dtype=torch.float64) -> dict:
        """input, offset, mask (DCNv3 layout), seeded by the case. Weights include negative
        values: DCNv4 uses them raw."""
        gen = generator(self.seed)
        ho, wo = self.output_size()
        gk = self.group * self.points
        return {
            "input": normal((self.batch, self.height, self.width, self.group * self.group_channels), gen,
                            dtype=dtype),
            "offset": uniform((self.batch, ho, wo, 2 * gk), gen, -self.offset_range, self.offset_range,
                              dtype=dtype),
            "mask": uniform((self.batch, ho, wo, gk), gen, -0.5, 1.0, dtype=dtype),
        }

    def packed(self, dtype=torch.float64) -> dict:
        """input and DCNv4's offset_mask (random values in the padding too: they must be ignored)."""
        t = self.tensors(dtype)
        ho, wo = self.output_size()
        k = self.points
        used = torch.cat([t["offset"].unflatten(-1, (self.group, 2 * k)),
                          t["mask"].unflatten(-1, (self.group, k))], dim=-1).flatten(-2)
        width = dcnv4_packed_width(self.group, k)
        tail = normal((self.batch, ho, wo, width - used.shape[-1]), generator(self.seed + 1), std=50.0,
                      dtype=dtype)
        return {"input": t["input"], "offset_mask": torch.cat([used, tail], dim=-1)}


CASES = [
    DcnCase(2, 7, 9, 3, 5, seed=1),                                                  # G*D = 15, D odd
    DcnCase(1, 8, 6, 2, 4, stride=(2, 2), seed=2),                                    # stride 2
    DcnCase(2, 9, 8, 2, 3, dilation=(2, 2), pad=(2, 2), seed=3),                      # dilation 2
    DcnCase(1, 9, 10, 2, 6, kernel=(5, 5), pad=(2, 2), seed=4),                       # 5x5
    DcnCase(2, 6, 7, 4, 3, remove_center=True, seed=5),                               # remove_center
    DcnCase(1, 9, 9, 1, 7, kernel=(5, 5), pad=(2, 2), remove_center=True, offset_scale=0.5, seed=6),
    DcnCase(2, 1, 9, 2, 5, seed=7),                                                   # H = 1
    DcnCase(1, 8, 1, 3, 3, seed=8),                                                   # W = 1
    DcnCase(1, 7, 8, 2, 12, kernel=(2, 3), stride=(1, 2), pad=(0, 1), dilation=(2, 1), seed=9),
    DcnCase(1, 8, 8, 2, 5, kernel=(4, 4), offset_scale=2.0, seed=10),                 # even kernel
    DcnCase(2, 6, 9, 3, 9, kernel=(3, 1), stride=(2, 1), pad=(1, 0), offset_scale=1.5, seed=11),
    DcnCase(1, 10, 11, 2, 4, kernel=(3, 5), stride=(2, 3), pad=(1, 2), dilation=(1, 2), seed=12),
    DcnCase(1, 6, 6, 2, 4, pad=(0, 0), offset_range=8.0, seed=13),                    # far outside
    DcnCase(1, 5, 6, 1, 2, kernel=(1, 1), pad=(0, 0), seed=14),                       # 1x1 kernel
    DcnCase(1, 6, 7, 2, 3, kernel=(2, 2), remove_center=True, pad=(1, 0), seed=15),   # even, no centre
]


def test_cases_cover_the_brief():
    assert any(c.stride[0] == 2 for c in CASES) and any(c.dilation[0] == 2 for c in CASES)
    assert (5, 5) in {c.kernel for c in CASES}
    assert any(c.remove_center for c in CASES)
    assert any(c.height == 1 for c in CASES) and any(c.width == 1 for c in CASES)
    assert any(c.group_channels & (c.group_channels - 1) for c in CASES)  # not a power of two
    assert any(c.pad[0] != c.pad[1] for c in CASES)
    assert any(c.offset_scale != 1.0 for c in CASES)


def _v3(fn):
    def call(input, offset, mask, *, args):
        return fn(input, offset, mask, *args)
    return call


def _v4(fn):
    def call(input, offset_mask, *, args):
        return fn(input, offset_mask, *args)
    return call


# ---------------------------------------------------------------- against the references

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dcnv3_matches_reference_float64(case: DcnCase):
    tensors = case.tensors()
    ours = forward_backward(_v3(dcnv3_core), tensors, grad_seed=case.seed + 7, args=case.args())
    ref = forward_backward(_v3(dcnv3_core_reference), tensors, grad_seed=case.seed + 7, args=case.args())
    assert_results_match(ours, ref, rel=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dcnv4_matches_reference_float64(case: DcnCase):
    tensors = case.packed()
    ours = forward_backward(_v4(dcnv4_core), tensors, grad_seed=case.seed + 7, args=case.args())
    ref = forward_backward(_v4(dcnv4_core_reference), tensors, grad_seed=case.seed + 7, args=case.args())
    assert_results_match(ours, ref, rel=1e-10)
    # The padding entries get no gradient.
    used = case.group * case.points * 3
    assert torch.equal(ours[1]["offset_mask"][..., used:], torch.zeros_like(ours[1]["offset_mask"][..., used:]))


@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: c.id)
def test_float32_matches_reference(case: DcnCase):
    tensors = case.tensors(torch.float32)
    ours = forward_backward(_v3(dcnv3_core), tensors, grad_seed=case.seed + 7, args=case.args())
    assert ours[0].dtype == torch.float32
    ref = forward_backward(_v3(dcnv3_core_reference), {k: v.double() for k, v in tensors.items()},
                           grad_seed=case.seed + 7, args=case.args())
    assert_results_match(ours, ref, rel=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grid_sample_formulation_matches_reference_and_kernel(case: DcnCase):
    """The grid_sample formulation agrees with the point-by-point reference (float64), and with
    the kernels in float32 (both ops)."""
    tensors = case.tensors()
    pure = forward_backward(_v3(dcnv3_core_grid_sample), tensors, grad_seed=case.seed + 3, args=case.args())
    ref = forward_backward(_v3(dcnv3_core_reference), tensors, grad_seed=case.seed + 3, args=case.args())
    assert_results_match(pure, ref, rel=1e-10)

    t32 = case.tensors(torch.float32)
    assert_results_match(
        forward_backward(_v3(dcnv3_core_grid_sample), t32, grad_seed=case.seed + 3, args=case.args()),
        forward_backward(_v3(dcnv3_core), t32, grad_seed=case.seed + 3, args=case.args()), rel=1e-4)
    p32 = case.packed(torch.float32)
    assert_results_match(
        forward_backward(_v4(dcnv4_core_grid_sample), p32, grad_seed=case.seed + 3, args=case.args()),
        forward_backward(_v4(dcnv4_core), p32, grad_seed=case.seed + 3, args=case.args()), rel=1e-4)


def test_reference_point_order_is_x_major():
    """Point k = i*kernel_h + j has x index i and y index j (the official loops: i over the
    width outside, j over the height inside); remove_center drops (kernel_w//2, kernel_h//2)."""
    assert dcnv3_points(2, 3) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert dcnv3_points(3, 3, remove_center=True) == [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]


def test_offsets_are_x_then_y_in_pixels():
    """Offset (x, y) = (1, 0) moves a sample one pixel right; integer positions are pixel
    centres; offset_scale scales the grid and the offset around the kernel centre."""
    image = torch.arange(20, dtype=torch.float64).view(1, 4, 5, 1)   # value = 5*y + x

    def sample(dx, dy, scale=1.0, kernel=(1, 1), pad=(0, 0)):
        """Output pixel (1, 1) with only the first point, (i, j) = (0, 0), weighted."""
        k = kernel[0] * kernel[1]
        ho = 4 + 2 * pad[0] - kernel[0] + 1
        wo = 5 + 2 * pad[1] - kernel[1] + 1
        offset = torch.tensor([dx, dy] * k, dtype=torch.float64).expand(1, ho, wo, 2 * k).contiguous()
        mask = torch.zeros(1, ho, wo, k, dtype=torch.float64)
        mask[..., 0] = 1.0
        return dcnv3_core(image, offset, mask, *kernel, 1, 1, *pad, 1, 1, 1, 1, scale)[0, 1, 1, 0].item()

    assert sample(0.0, 0.0) == 6.0         # pixel (y, x) = (1, 1)
    assert sample(1.0, 0.0) == 7.0         # x first
    assert sample(0.0, 1.0) == 11.0        # then y
    assert sample(0.5, 0.25) == 7.75       # bilinear between pixel centres
    # 3x3, padding 1: output (1, 1) is centred on input (1, 1) and its first point sits at
    # (-1, -1) from the centre, both scaled by offset_scale with the offset.
    assert sample(0.0, 0.0, 1.0, (3, 3), (1, 1)) == 0.0           # (y, x) = (0, 0)
    assert sample(0.0, 0.0, 0.5, (3, 3), (1, 1)) == 3.0           # (0.5, 0.5)
    assert sample(2.0, 0.0, 0.5, (3, 3), (1, 1)) == 4.0           # (0.5, 1.5)
    # Half a pixel outside the image reads half the border pixel; a whole pixel reads zero.
    assert sample(-1.5, 0.0) == 5.0 * 0.5 + 0
    assert sample(0.0, -2.0) == 0.0


# ---------------------------------------------------------------- DCNv4 is DCNv3 repacked

@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: c.id)
def test_dcnv4_equals_dcnv3_on_unpacked_tensors(case: DcnCase):
    t = case.packed()
    offset, mask = dcnv4_unpack(t["offset_mask"], case.group, case.points)
    v4 = dcnv4_core(t["input"], t["offset_mask"], *case.args())
    v3 = dcnv3_core(t["input"], offset.contiguous(), mask.contiguous(), *case.args())
    torch.testing.assert_close(v4, v3, rtol=0, atol=0)


# ---------------------------------------------------------------- depthwise deform_conv2d

def _as_deform_conv2d(case: DcnCase, input, offset, mask):
    """dcnv3_core's call as a depthwise detkit.ops.deform_conv2d (groups = channels, one
    offset group per DCNv3 group, unit weights): NCHW tensors, (dy, dx) per tap in row-major
    tap order, the grid position and offset_scale folded into the offsets, a zero weight
    for a removed centre."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = case.kernel, case.stride, case.pad, case.dilation
    g, d, s = case.group, case.group_channels, case.offset_scale
    batch, ho, wo, _ = offset.shape
    half_h, half_w = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    off = offset.view(batch, ho, wo, g, case.points, 2)
    msk = mask.view(batch, ho, wo, g, case.points)
    taps_off = offset.new_zeros(batch, ho, wo, g, kh, kw, 2)
    taps_mask = mask.new_zeros(batch, ho, wo, g, kh, kw)
    for k, (i, j) in enumerate(dcnv3_points(kh, kw, case.remove_center)):
        # DCNv3 samples y = ho*sh - ph + half_h + (j*dh - half_h + oy)*s; deform_conv2d's tap
        # (j, i) samples ho*sh - ph + j*dh + dy.
        taps_off[..., j, i, 0] = half_h + (j * dh - half_h + off[..., k, 1]) * s - j * dh
        taps_off[..., j, i, 1] = half_w + (i * dw - half_w + off[..., k, 0]) * s - i * dw
        taps_mask[..., j, i] = msk[..., k]
    channels = g * d
    out = deform_conv2d(input.permute(0, 3, 1, 2), taps_off.reshape(batch, ho, wo, -1).permute(0, 3, 1, 2),
                        input.new_ones(channels, 1, kh, kw), None, (sh, sw), (ph, pw), (dh, dw),
                        taps_mask.reshape(batch, ho, wo, -1).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_equals_depthwise_deform_conv2d_with_unit_weights(case: DcnCase):
    tensors = case.tensors()
    ours = forward_backward(_v3(dcnv3_core), tensors, grad_seed=case.seed + 5, args=case.args())
    theirs = forward_backward(lambda input, offset, mask: _as_deform_conv2d(case, input, offset, mask),
                              tensors, grad_seed=case.seed + 5)
    assert_results_match(ours, theirs, rel=1e-10)


# ---------------------------------------------------------------- gradcheck

def _gradcheck_offsets(case: DcnCase, shape, gen: torch.Generator) -> torch.Tensor:
    """Offsets whose samples sit 0.05..0.45 px from the nearest pixel centre line.

    Undeformed point positions are integers (offset_scale 1) or halves (0.5), so an offset
    n + 0.5 + u (|u| < 0.4) keeps every sample clear of the grid lines where bilinear
    interpolation has a kink; n in [-3, 3] sends many samples across the border."""
    assert case.offset_scale in (1.0, 0.5)
    whole = torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
    return whole + 0.5 + uniform(shape, gen, -0.4, 0.4)


GRADCHECK_CASES = [
    DcnCase(1, 4, 5, 2, 3, seed=51),
    DcnCase(2, 5, 4, 1, 2, stride=(2, 1), dilation=(1, 2), pad=(1, 2), offset_scale=0.5, seed=52),
    DcnCase(1, 4, 4, 2, 2, kernel=(3, 3), remove_center=True, seed=53),
    DcnCase(1, 1, 5, 1, 3, kernel=(2, 3), pad=(1, 1), seed=54),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck(case: DcnCase):
    t = case.tensors()
    t["offset"] = _gradcheck_offsets(case, t["offset"].shape, generator(case.seed + 100))
    leaves = [t[n].clone().requires_grad_(True) for n in ("input", "offset", "mask")]
    assert torch.autograd.gradcheck(lambda *a: dcnv3_core(*a, *case.args()), leaves, eps=1e-6, atol=1e-7,
                                    rtol=1e-5)
    # DCNv4: the same offsets packed.
    k = case.points
    packed = torch.cat([leaves[1].detach().unflatten(-1, (case.group, 2 * k)),
                        leaves[2].detach().unflatten(-1, (case.group, k))], -1).flatten(-2)
    pad = dcnv4_packed_width(case.group, k) - packed.shape[-1]
    packed = torch.cat([packed, torch.zeros(*packed.shape[:-1], pad, dtype=packed.dtype)], -1)
    v4_leaves = [leaves[0].detach().clone().requires_grad_(True), packed.requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda *a: dcnv4_core(*a, *case.args()), v4_leaves, eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


# ---------------------------------------------------------------- opcheck, torch.compile

OPCHECK_CASES = [CASES[0], CASES[4], CASES[8]]


def _op_geometry(case: DcnCase) -> tuple:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = case.kernel, case.stride, case.pad, case.dilation
    return ([kh, kw], [sh, sw], [ph, pw], [dh, dw], case.group, case.group_channels, case.offset_scale,
            case.remove_center)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck(case: DcnCase):
    t = {k: v.requires_grad_(True) for k, v in case.tensors().items()}
    torch.library.opcheck(torch.ops.detkit.dcnv3_core.default,
                          (t["input"], t["offset"], t["mask"], *_op_geometry(case)))
    p = {k: v.requires_grad_(True) for k, v in case.packed().items()}
    torch.library.opcheck(torch.ops.detkit.dcnv4_core.default,
                          (p["input"], p["offset_mask"], *_op_geometry(case)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_backward_ops(case: DcnCase, dtype):
    t = case.tensors(dtype)
    ho, wo = case.output_size()
    grad = normal((case.batch, ho, wo, case.group * case.group_channels), generator(case.seed + 1), dtype=dtype)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.detkit.dcnv3_core_backward.default,
                          (grad, t["input"], t["offset"], t["mask"], *_op_geometry(case)), test_utils=utils)
    p = case.packed(dtype)
    torch.library.opcheck(torch.ops.detkit.dcnv4_core_backward.default,
                          (grad, p["input"], p["offset_mask"], *_op_geometry(case)), test_utils=utils)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Both ops inside one compiled (fullgraph, inductor) function: forward and gradients equal eager."""
    torch._dynamo.reset()
    case = DcnCase(2, 6, 7, 2, 4, remove_center=False, seed=81)
    t = case.tensors(torch.float32)
    p = case.packed(torch.float32)

    def fn(input, offset, mask, offset_mask):
        a = dcnv3_core(input, offset, mask.softmax(-1), 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
        b = dcnv4_core(input * 2, offset_mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
        return (a * b).tanh()

    tensors = {**t, "offset_mask": p["offset_mask"]}
    compiled = torch.compile(fn, fullgraph=True)
    got = forward_backward(compiled, tensors, grad_seed=82)
    want = forward_backward(fn, tensors, grad_seed=82)
    assert_results_match(got, want, rel=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------- threads and determinism

@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# Sizes past every parallel_for grain: the forward's pixel grain is 32768 / (G*K*max(D, 8))
# pixels, the backward splits over (image, group) pairs when there are enough of them (8 here,
# >= 4 per thread at 2 threads) or else over one pixel range per thread (N*G = 1 and 3).
THREAD_CASES = [
    DcnCase(2, 24, 20, 4, 8, seed=91),          # 8 (image, group) pairs
    DcnCase(1, 30, 26, 1, 16, seed=92),         # 1 pair: pixel ranges with private buffers
    DcnCase(3, 20, 22, 1, 12, stride=(2, 1), seed=93),  # 3 pairs, odd split at 2 threads
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: c.id)
def test_threads_agree_and_are_deterministic(case: DcnCase, threads):
    tensors = case.tensors(torch.float32)
    ho, wo = case.output_size()
    assert case.batch * ho * wo > 32768 // (case.group * case.points * max(case.group_channels, 8))
    results = {}
    for count in (1, 2):
        threads(count)
        first = forward_backward(_v3(dcnv3_core), tensors, grad_seed=case.seed, args=case.args())
        again = forward_backward(_v3(dcnv3_core), tensors, grad_seed=case.seed, args=case.args())
        assert torch.equal(first[0], again[0])
        for name in first[1]:
            assert torch.equal(first[1][name], again[1][name]), f"{name} not deterministic at {count} threads"
        results[count] = first
    assert_results_match(results[2], results[1], rel=1e-5)
    ref = forward_backward(_v3(dcnv3_core_reference), {k: v.double() for k, v in tensors.items()},
                           grad_seed=case.seed, args=case.args())
    assert_results_match(results[2], ref, rel=1e-4)


# ---------------------------------------------------------------- layouts, sizes, values

@pytest.mark.parametrize("which", ["input", "offset", "mask"])
def test_non_contiguous_inputs(which):
    case = CASES[0]
    t = case.tensors()
    big = normal((*t[which].shape[:-1], 2 * t[which].shape[-1]), generator(5), std=100.0)
    big[..., ::2] = t[which]
    strided = {**t, which: big[..., ::2]}
    assert not strided[which].is_contiguous()
    got = forward_backward(_v3(dcnv3_core), strided, grad_seed=6, args=case.args())
    want = forward_backward(_v3(dcnv3_core), t, grad_seed=6, args=case.args())
    assert_results_match(got, want, rel=0)


def test_batch_size_zero():
    case = DcnCase(0, 5, 6, 2, 3, seed=41)
    t = {k: v.requires_grad_(True) for k, v in case.tensors().items()}
    out = dcnv3_core(t["input"], t["offset"], t["mask"], *case.args())
    assert out.shape == (0, *case.output_size(), 6)
    out.sum().backward()
    assert all(v.grad is not None and v.grad.shape == v.shape for v in t.values())
    p = {k: v.requires_grad_(True) for k, v in case.packed().items()}
    dcnv4_core(p["input"], p["offset_mask"], *case.args()).sum().backward()
    assert p["offset_mask"].grad.shape == p["offset_mask"].shape


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e6])
def test_non_finite_and_huge_offsets_read_zero(value):
    """A sample at a non-finite or far-away position reads zero and gets no gradient, exactly as if
    its weight were zero."""
    case = CASES[0]
    t = case.tensors()
    spoiled = torch.rand(t["mask"].shape, generator=generator(3)) < 0.3
    pairs = t["offset"].view(*t["mask"].shape, 2).clone()
    pairs[..., 1] = torch.where(spoiled, torch.full_like(pairs[..., 1], value), pairs[..., 1])
    bad = {**t, "offset": pairs.flatten(-2)}
    out, grads = forward_backward(_v3(dcnv3_core), bad, grad_seed=4, args=case.args())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    switched_off = {**t, "mask": t["mask"] * ~spoiled}
    out_m, grads_m = forward_backward(_v3(dcnv3_core), switched_off, grad_seed=4, args=case.args())
    assert_close_scaled(out, out_m, 1e-12, "output")
    assert_close_scaled(grads["input"], grads_m["input"], 1e-12, "grad of input")
    assert torch.equal(grads["mask"][spoiled], torch.zeros_like(grads["mask"][spoiled]))
    assert torch.equal(grads["offset"].view(*spoiled.shape, 2)[spoiled],
                       torch.zeros_like(grads["offset"].view(*spoiled.shape, 2)[spoiled]))


def test_cpu_autocast_runs_in_float32():
    case = CASES[0]
    t = {k: v.to(torch.bfloat16) for k, v in case.tensors().items()}
    p = {k: v.to(torch.bfloat16) for k, v in case.packed().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = dcnv3_core(t["input"], t["offset"], t["mask"], *case.args())
        b = dcnv4_core(p["input"], p["offset_mask"], *case.args())
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert_close_scaled(a, dcnv3_core(*(v.float() for v in t.values()), *case.args()), 1e-6)
    assert_close_scaled(b, dcnv4_core(*(v.float() for v in p.values()), *case.args()), 1e-6)


def test_cpu_kernel_refuses_half():
    case = CASES[0]
    t = {k: v.half() for k, v in case.tensors().items()}
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.detkit.dcnv3_core(t["input"], t["offset"], t["mask"], *_op_geometry(case))


# ---------------------------------------------------------------- bad arguments

_G = generator(99)
_GOOD = {
    "input": normal((2, 5, 6, 8), _G),
    "offset": uniform((2, 5, 6, 2 * 9 * 2), _G),
    "mask": uniform((2, 5, 6, 2 * 9), _G),
    "offset_mask": uniform((2, 5, 6, 56), _G),  # 2*9*3 = 54 -> 56
}
_GEOMETRY = {"kernel_h": 3, "kernel_w": 3, "stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1,
             "dilation_h": 1, "dilation_w": 1, "group": 2, "group_channels": 4, "offset_scale": 1.0}


def _call_v3(**changes):
    a = {**_GOOD, **_GEOMETRY, **changes}
    a.pop("offset_mask")
    return dcnv3_core(**a)


def _call_v4(**changes):
    a = {**_GOOD, **_GEOMETRY, **changes}
    a.pop("offset")
    a.pop("mask")
    return dcnv4_core(**a)


BAD_ARGS = [
    ("channels", {"group_channels": 3}, ValueError, r"input has 8 channels .* group \* group_channels = 2 \* 3"),
    ("group_zero", {"group": 0}, ValueError, r"group must be positive"),
    ("input_rank", {"input": normal((5, 6, 8), _G)}, ValueError, r"input must be a 4-d Tensor \[N, H, W, group\*group_channels\]"),
    ("input_int", {"input": torch.ones(2, 5, 6, 8, dtype=torch.int64)}, TypeError, r"input must be a floating-point"),
    ("offset_width", {"offset": uniform((2, 5, 6, 18), _G)}, ValueError, r"offset must have shape \(2, 5, 6, 36\) \[N, H_out, W_out, group\*K\*2\]"),
    ("offset_size", {"offset": uniform((2, 4, 6, 36), _G)}, ValueError, r"offset must have shape \(2, 5, 6, 36\)"),
    ("offset_rank", {"offset": uniform((2, 30, 36), _G)}, ValueError, r"offset must be a 4-d Tensor"),
    ("mask_width", {"mask": uniform((2, 5, 6, 9), _G)}, ValueError, r"mask must have shape \(2, 5, 6, 18\) \[N, H_out, W_out, group\*K\]"),
    ("mask_remove_center", {"remove_center": True}, ValueError, r"offset must have shape \(2, 5, 6, 32\)"),
    ("offset_dtype", {"offset": uniform((2, 5, 6, 36), _G, dtype=torch.float32)}, TypeError, r"offset has dtype torch.float32 but input"),
    ("mask_device", {"mask": uniform((2, 5, 6, 18), _G).to("meta")}, ValueError, r"mask is on meta but input is on cpu"),
    ("kernel_zero", {"kernel_h": 0}, ValueError, r"kernel_h must be positive"),
    ("stride_float", {"stride_w": 1.0}, TypeError, r"stride_w must be an int"),
    ("pad_negative", {"pad_w": -1}, ValueError, r"pad_w must be non-negative"),
    ("dilation_zero", {"dilation_h": 0}, ValueError, r"dilation_h must be positive"),
    ("offset_scale_type", {"offset_scale": "1"}, TypeError, r"offset_scale must be a float"),
    ("offset_scale_nan", {"offset_scale": float("nan")}, ValueError, r"offset_scale must be finite"),
    ("too_small", {"pad_h": 0, "input": normal((2, 1, 6, 8), _G)}, ValueError, r"too small for a 3x3 kernel"),
    ("one_point_removed", {"kernel_h": 1, "kernel_w": 1, "remove_center": True}, ValueError, r"remove_center leaves no point"),
]


@pytest.mark.parametrize("changes,error,match", [a[1:] for a in BAD_ARGS], ids=[a[0] for a in BAD_ARGS])
def test_dcnv3_bad_arguments_raise(changes, error, match):
    with pytest.raises(error, match=match):
        _call_v3(**changes)


BAD_ARGS_V4 = [
    ("unpadded", {"offset_mask": uniform((2, 5, 6, 54), _G)}, ValueError,
     r"offset_mask is not padded: its last dimension must be group\*K\*3 = 54 rounded up to a multiple of 8 \(56"),
    ("width", {"offset_mask": uniform((2, 5, 6, 64), _G)}, ValueError,
     r"offset_mask must have shape \(2, 5, 6, 56\) \[N, H_out, W_out, P\] with P = group\*K\*3 = 54"),
    ("remove_center", {"remove_center": True}, ValueError, r"offset_mask must have shape \(2, 5, 6, 48\)"),
    ("rank", {"offset_mask": uniform((2, 30, 56), _G)}, ValueError, r"offset_mask must be a 4-d Tensor"),
    ("dtype", {"offset_mask": uniform((2, 5, 6, 56), _G, dtype=torch.float32)}, TypeError,
     r"offset_mask has dtype torch.float32 but input"),
    ("channels", {"group": 4}, ValueError, r"input has 8 channels"),
]


@pytest.mark.parametrize("changes,error,match", [a[1:] for a in BAD_ARGS_V4], ids=[a[0] for a in BAD_ARGS_V4])
def test_dcnv4_bad_arguments_raise(changes, error, match):
    with pytest.raises(error, match=match):
        _call_v4(**changes)


RAW_BAD_ARGS = [
    ("channels", {"group_channels": 3}, r"input has 8 channels but group \* group_channels = 6"),
    ("offset", {"offset": uniform((2, 5, 6, 18), _G)}, r"offset must be \[2, 5, 6, 36\]"),
    ("mask", {"mask": uniform((2, 5, 6, 9), _G)}, r"mask must be \[2, 5, 6, 18\]"),
    ("dtype", {"mask": uniform((2, 5, 6, 18), _G, dtype=torch.float32)}, r"mask has dtype Float"),
    ("stride", {"stride": [0, 1]}, r"stride"),
]


@pytest.mark.parametrize("changes,match", [a[1:] for a in RAW_BAD_ARGS], ids=[a[0] for a in RAW_BAD_ARGS])
def test_kernel_checks_its_arguments(changes, match):
    """Called directly (as compiled graphs do), the C++ ops check the shapes themselves."""
    a = {"input": _GOOD["input"], "offset": _GOOD["offset"], "mask": _GOOD["mask"], "kernel_size": [3, 3],
         "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "group": 2, "group_channels": 4, **changes}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.detkit.dcnv3_core(a["input"], a["offset"], a["mask"], a["kernel_size"], a["stride"],
                                    a["padding"], a["dilation"], a["group"], a["group_channels"], 1.0, False)


def test_packed_kernel_checks_the_padding():
    with pytest.raises(RuntimeError, match=r"offset_mask must be \[2, 5, 6, 56\] \(group\*K\*3 rounded up"):
        torch.ops.detkit.dcnv4_core(_GOOD["input"], uniform((2, 5, 6, 54), _G), [3, 3], [1, 1], [1, 1], [1, 1],
                                    2, 4, 1.0, False)


def test_ops_are_exported():
    assert detkit.ops.dcnv3_core is dcnv3_core and detkit.ops.dcnv4_core is dcnv4_core
    assert dcnv4_packed_width(4, 9) == 112 and dcnv4_packed_width(2, 8) == 48
    assert math.ceil(2 * 9 * 3 / 8) * 8 == _GOOD["offset_mask"].shape[-1]
