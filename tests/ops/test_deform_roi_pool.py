"""detkit.ops.deform_roi_pool against the plain-PyTorch reference and torchvision's roi_align."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torchvision

from detkit.ops import deform_roi_pool
from detkit.ops.reference import deform_roi_pool_reference
from tests.helpers import (
    assert_close_scaled,
    assert_results_match,
    forward_backward,
    generator,
    normal,
    random_rois,
    uniform,
)


@dataclass(frozen=True)
class PoolCase:
    batch: int
    channels: int
    height: int
    width: int
    output_size: int | tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    num_rois: int
    roi_size: tuple[float, float]  # min, max side in image pixels
    gamma: float = 0.1
    offset_range: float = 1.0
    offset: bool = True
    mask: bool = True
    seed: int = 0

    @property
    def pooled(self) -> tuple[int, int]:
        o = self.output_size
        return (o, o) if isinstance(o, int) else tuple(o)

    @property
    def id(self) -> str:
        ph, pw = self.pooled
        return (f"b{self.batch}_c{self.channels}_{self.height}x{self.width}_out{ph}x{pw}"
                f"_scale{self.spatial_scale}_sr{self.sampling_ratio}_k{self.num_rois}"
                f"_roi{self.roi_size[0]}-{self.roi_size[1]}_gamma{self.gamma}_off{self.offset_range}"
                f"{'_offset' if self.offset else ''}{'_mask' if self.mask else ''}")

    def tensors(self, dtype=torch.float64) -> dict:
        gen = generator(self.seed)
        ph, pw = self.pooled
        image_h, image_w = self.height / self.spatial_scale, self.width / self.spatial_scale
        k = self.num_rois
        return {
            "input": normal((self.batch, self.channels, self.height, self.width), gen, dtype=dtype),
            "rois": random_rois(gen, k, self.batch, image_h, image_w, *self.roi_size, dtype=dtype),
            "offset": (uniform((k, 2, ph, pw), gen, -self.offset_range, self.offset_range, dtype=dtype)
                       if self.offset else None),
            "mask": uniform((k, 1, ph, pw), gen, 0.0, 1.0, dtype=dtype) if self.mask else None,
        }

    def pool_args(self) -> dict:
        return {"output_size": self.output_size, "spatial_scale": self.spatial_scale,
                "sampling_ratio": self.sampling_ratio, "gamma": self.gamma}


def _detkit(input, rois, offset=None, mask=None, **kw):
    return deform_roi_pool(input, rois, offset, mask, **kw)


def _reference(input, rois, offset=None, mask=None, **kw):
    return deform_roi_pool_reference(input, rois, offset, mask, **kw)


def _without_rois_grad(tensors: dict) -> tuple[dict, torch.Tensor]:
    """forward_backward differentiates every tensor it is given; rois get no gradient here."""
    rois = tensors["rois"]
    return {k: v for k, v in tensors.items() if k != "rois"}, rois


REFERENCE_CASES = [
    PoolCase(2, 3, 7, 9, (2, 3), 1.0, 0, 4, (1.0, 8.0), seed=1),
    PoolCase(2, 2, 6, 8, 3, 0.5, 1, 5, (2.0, 14.0), seed=2),
    PoolCase(1, 2, 6, 7, 7, 0.25, 2, 3, (4.0, 28.0), seed=3),
    # RoIs smaller than a pixel.
    PoolCase(2, 3, 5, 6, 3, 1.0, 0, 6, (0.1, 0.9), seed=4),
    # Offsets that push bins by up to 0.9 of the RoI, far past the border.
    PoolCase(3, 2, 6, 6, (3, 2), 0.5, 2, 6, (2.0, 10.0), gamma=0.3, offset_range=3.0, seed=5),
    PoolCase(2, 2, 5, 6, 7, 1.0, 0, 2, (3.0, 10.0), offset_range=2.0, seed=6),
    PoolCase(2, 2, 6, 6, 3, 0.25, 0, 4, (3.0, 30.0), offset=False, mask=True, seed=7),
    PoolCase(2, 2, 6, 6, (2, 3), 0.5, 1, 4, (1.0, 12.0), offset_range=2.0, mask=False, seed=8),
]


def test_reference_cases_cover_the_brief():
    """RoIs partly outside, in several images, and bins pushed past the border exist."""
    for case in REFERENCE_CASES[:3]:
        t = case.tensors()
        rois, h, w = t["rois"] * case.spatial_scale, case.height, case.width
        assert len(set(t["rois"][:, 0].tolist())) > 1 or case.batch == 1
        partly_outside = (rois[:, 1] < 0) | (rois[:, 2] < 0) | (rois[:, 3] > w) | (rois[:, 4] > h)
        assert partly_outside.any()
    assert {c.pooled for c in REFERENCE_CASES} >= {(2, 3), (3, 3), (7, 7)}
    assert {c.spatial_scale for c in REFERENCE_CASES} >= {1.0, 0.5, 0.25}
    assert {c.sampling_ratio for c in REFERENCE_CASES} >= {0, 1, 2}


# The reference reads sample positions with float() while they carry autograd history.
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
def test_matches_reference_float64(case: PoolCase):
    tensors, rois = _without_rois_grad(case.tensors())
    ours = forward_backward(_detkit, tensors, grad_seed=case.seed + 3, rois=rois, **case.pool_args())
    ref = forward_backward(_reference, tensors, grad_seed=case.seed + 3, rois=rois, **case.pool_args())
    assert_results_match(ours, ref, rel=1e-10)
    # Not a vacuous comparison: a good part of the output is non-zero.
    assert (ours[0] != 0).float().mean() > 0.3


# ---------------------------------------------------------------- equals roi_align

ROI_ALIGN_CASES = [  # output_size, spatial_scale, sampling_ratio, seed
    ((2, 3), 1.0, 0, 11),
    (7, 0.25, 2, 12),
    (5, 0.5, 0, 13),
    (3, 0.125, 1, 14),
    ((4, 1), 0.5, 3, 15),
]


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("output_size,spatial_scale,sampling_ratio,seed", ROI_ALIGN_CASES,
                         ids=[f"out{o}_scale{s}_sr{r}" for o, s, r, _ in ROI_ALIGN_CASES])
def test_without_offset_and_mask_equals_roi_align(output_size, spatial_scale, sampling_ratio, seed,
                                                  dtype, rel):
    gen = generator(seed)
    height, width = 9, 11
    input = normal((3, 4, height, width), gen, dtype=dtype)
    rois = random_rois(gen, 40, 3, height / spatial_scale, width / spatial_scale,
                       0.3 / spatial_scale, 12 / spatial_scale, dtype=dtype)
    kw = {"output_size": output_size, "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio}
    ours = forward_backward(lambda input: deform_roi_pool(input, rois, **kw), {"input": input}, grad_seed=5)
    theirs = forward_backward(lambda input: torchvision.ops.roi_align(input, rois, aligned=True, **kw),
                              {"input": input}, grad_seed=5)
    assert_results_match(ours, theirs, rel=rel)


# ---------------------------------------------------------------- gradcheck and opcheck

GRADCHECK_CASES = [
    PoolCase(2, 2, 5, 6, 2, 0.5, 2, 3, (3.0, 10.0), gamma=0.2, seed=21),
    PoolCase(1, 2, 4, 5, (2, 3), 1.0, 0, 2, (2.0, 5.0), gamma=0.1, offset_range=2.0, seed=22),
    PoolCase(2, 1, 4, 4, 2, 1.0, 1, 3, (1.0, 4.0), gamma=0.5, offset_range=1.0, mask=False, seed=23),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck(case: PoolCase):
    t = case.tensors()
    names = [n for n in ("input", "offset", "mask") if t[n] is not None]
    leaves = [t[n].clone().requires_grad_(True) for n in names]

    def fn(*args):
        kw = dict(zip(names, args))
        return deform_roi_pool(kw["input"], t["rois"], kw.get("offset"), kw.get("mask"), **case.pool_args())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


OPCHECK_CASES = [
    PoolCase(2, 3, 5, 6, (2, 3), 0.5, 2, 4, (2.0, 10.0), seed=31),
    PoolCase(2, 3, 5, 6, 3, 1.0, 0, 3, (1.0, 6.0), offset=False, mask=False, seed=32),
    PoolCase(1, 2, 5, 6, 2, 1.0, 1, 3, (1.0, 6.0), offset=True, mask=False, seed=33),
    PoolCase(1, 2, 5, 6, 2, 1.0, 1, 3, (1.0, 6.0), offset=False, mask=True, seed=34),
]


def _op_args(case: PoolCase, dtype=torch.float64, requires_grad=True) -> tuple:
    t = case.tensors(dtype)
    if requires_grad:
        for name in ("input", "offset", "mask"):
            if t[name] is not None:
                t[name].requires_grad_(True)
    ph, pw = case.pooled
    return (t["input"], t["rois"], t["offset"], t["mask"], ph, pw, case.spatial_scale,
            case.sampling_ratio, case.gamma)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck(case: PoolCase):
    torch.library.opcheck(torch.ops.detkit.deform_roi_pool.default, _op_args(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_backward_op(case: PoolCase, dtype):
    args = _op_args(case, dtype, requires_grad=False)
    ph, pw = case.pooled
    grad_output = normal((case.num_rois, case.channels, ph, pw), generator(case.seed + 1), dtype=dtype)
    torch.library.opcheck(torch.ops.detkit.deform_roi_pool_backward.default, (grad_output, *args),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("with_offset", [False, True], ids=["plain", "deformable"])
def test_zero_rois(with_offset: bool):
    gen = generator(41)
    input = normal((2, 3, 5, 6), gen).requires_grad_(True)
    rois = torch.empty(0, 5, dtype=torch.float64)
    offset = normal((0, 2, 2, 3), gen).requires_grad_(True) if with_offset else None
    mask = uniform((0, 1, 2, 3), gen, 0, 1).requires_grad_(True) if with_offset else None
    out = deform_roi_pool(input, rois, offset, mask, output_size=(2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert input.grad is not None and torch.equal(input.grad, torch.zeros_like(input))
    if with_offset:
        assert offset.grad.shape == offset.shape and mask.grad.shape == mask.shape


@pytest.mark.parametrize("values", [[float("nan")], [float("inf"), float("-inf")], [1e6, -1e6],
                                    [float("nan"), 1e7, float("-inf")]],
                         ids=["nan", "inf", "huge", "mixed"])
def test_non_finite_and_huge_offsets(values):
    """A bin whose shift is not finite or enormous reads only zeros; the other bins are
    unaffected (bins are independent), and every gradient stays finite."""
    case = PoolCase(2, 3, 6, 7, 3, 0.5, 2, 5, (2.0, 12.0), gamma=0.2, offset_range=1.5, seed=51)
    t = case.tensors()
    gen = generator(52)
    bad_bin = torch.rand((case.num_rois, 1, 3, 3), generator=gen) < 0.35
    which = torch.randint(0, 3, bad_bin.shape, generator=gen)  # 0: x, 1: y, 2: both
    pick = torch.randint(0, len(values), (case.num_rois, 2, 3, 3), generator=gen)
    replacement = torch.tensor(values, dtype=torch.float64)[pick]
    hit = torch.cat([bad_bin & (which != 1), bad_bin & (which != 0)], dim=1)
    assert bad_bin.any() and (~bad_bin).any()
    spoiled = torch.where(hit, replacement, t["offset"])

    tensors, rois = _without_rois_grad({**t, "offset": spoiled})
    out, grads = forward_backward(_detkit, tensors, grad_seed=53, rois=rois, **case.pool_args())
    assert torch.isfinite(out).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"grad of {name} is not finite"

    bad = bad_bin.expand_as(out)
    assert torch.equal(out[bad], torch.zeros_like(out[bad]))
    assert torch.equal(grads["mask"][bad_bin], torch.zeros_like(grads["mask"][bad_bin]))
    bad_pairs = bad_bin.expand(-1, 2, -1, -1)
    assert torch.equal(grads["offset"][bad_pairs], torch.zeros_like(grads["offset"][bad_pairs]))

    # The good bins equal those of a call where the bad bins are switched off by the mask.
    clean = {**tensors, "offset": torch.where(hit, torch.zeros(()), t["offset"]),
             "mask": t["mask"] * (~bad_bin)}
    out_c, grads_c = forward_backward(_detkit, clean, grad_seed=53, rois=rois, **case.pool_args())
    assert_close_scaled(out, out_c, 1e-12, "output")
    assert_close_scaled(grads["input"], grads_c["input"], 1e-12, "grad of input")
    assert_close_scaled(grads["offset"][~bad_pairs], grads_c["offset"][~bad_pairs], 1e-12, "grad of offset")
    assert_close_scaled(grads["mask"][~bad_bin], grads_c["mask"][~bad_bin], 1e-12, "grad of mask")


# ---------------------------------------------------------------- argument checks

def _good_args():
    gen = generator(61)
    return {
        "input": normal((2, 3, 6, 7), gen),
        "rois": random_rois(gen, 4, 2, 12.0, 14.0, 2.0, 8.0),
        "offset": uniform((4, 2, 2, 3), gen),
        "mask": uniform((4, 1, 2, 3), gen, 0, 1),
        "output_size": (2, 3),
        "spatial_scale": 0.5,
        "sampling_ratio": 2,
    }


def test_good_args_are_good():
    args = _good_args()
    out = deform_roi_pool(**args)
    ref = deform_roi_pool_reference(**args)
    assert_close_scaled(out, ref, 1e-10)


def _rois_with(column: int, value: float) -> torch.Tensor:
    rois = _good_args()["rois"].clone()
    rois[1, column] = value
    return rois


_G = generator(62)
BAD_ARGS = [
    ("rois_k4", {"rois": _good_args()["rois"][:, 1:]}, ValueError, r"rois must have shape \[K, 5\]"),
    ("rois_1d", {"rois": _good_args()["rois"].flatten()}, ValueError, r"rois must be a 2-d"),
    # rois may have their own dtype: tests/ops/test_empty_and_roi_dtypes.py
    ("rois_int", {"rois": _good_args()["rois"].long()}, TypeError, r"rois must be a floating-point Tensor"),
    ("input_3d", {"input": normal((3, 6, 7), _G)}, ValueError, r"input must be a 4-d"),
    ("offset_wrong_k", {"offset": uniform((3, 2, 2, 3), _G)}, ValueError, r"offset must have shape"),
    ("offset_wrong_bins", {"offset": uniform((4, 2, 3, 2), _G)}, ValueError, r"offset must have shape"),
    ("offset_one_channel", {"offset": uniform((4, 1, 2, 3), _G)}, ValueError, r"offset must have shape"),
    ("offset_dtype", {"offset": uniform((4, 2, 2, 3), _G, dtype=torch.float32)}, TypeError, r"offset has dtype"),
    ("mask_two_channels", {"mask": uniform((4, 2, 2, 3), _G)}, ValueError, r"mask must have shape"),
    ("mask_wrong_k", {"mask": uniform((5, 1, 2, 3), _G)}, ValueError, r"mask must have shape"),
    ("mask_3d", {"mask": uniform((4, 2, 3), _G)}, ValueError, r"mask must be a 4-d"),
    ("mask_dtype", {"mask": uniform((4, 1, 2, 3), _G, dtype=torch.float32)}, TypeError, r"mask has dtype"),
    ("output_size_zero", {"output_size": (0, 3)}, ValueError, r"output_size"),
    ("output_size_type", {"output_size": 2.5}, TypeError, r"output_size"),
    ("offset_not_tensor", {"offset": 0.5}, TypeError, r"offset must be a Tensor"),
    ("batch_index_too_big", {"rois": _rois_with(0, 5.0)}, RuntimeError, r"batch index"),
    ("batch_index_negative", {"rois": _rois_with(0, -1.0)}, RuntimeError, r"batch index"),
    # Truncation would read it as image 0; every backend requires >= 0.
    ("batch_index_minus_half", {"rois": _rois_with(0, -0.5)}, RuntimeError, r"rois\[1, 0\] \(batch index\) is -0.5"),
    ("batch_index_nan", {"rois": _rois_with(0, float("nan"))}, RuntimeError, r"rois\[1, 0\]"),
    ("roi_x1_nan", {"rois": _rois_with(1, float("nan"))}, RuntimeError, r"rois\[1, 1\] is not finite"),
    ("roi_y2_inf", {"rois": _rois_with(4, float("inf"))}, RuntimeError, r"rois\[1, 4\] is not finite"),
    ("roi_x2_neg_inf", {"rois": _rois_with(3, float("-inf"))}, RuntimeError, r"rois\[1, 3\] is not finite"),
]


@pytest.mark.parametrize("changes,error,match", [a[1:] for a in BAD_ARGS], ids=[a[0] for a in BAD_ARGS])
def test_bad_arguments_raise(changes, error, match):
    with pytest.raises(error, match=match):
        deform_roi_pool(**{**_good_args(), **changes})


def test_batch_index_checked_without_offsets():
    args = {**_good_args(), "offset": None, "mask": None, "rois": _rois_with(0, 2.0)}
    with pytest.raises(RuntimeError, match=r"batch index"):
        deform_roi_pool(**args)


def test_direct_op_call_checks_rois_in_the_kernel():
    """The checks sit in the C++ kernel, so calls that skip the Python wrapper (torch.ops,
    compiled graphs) refuse the same RoIs."""
    args = _good_args()
    for column, value, match in [(2, float("nan"), r"rois\[1, 2\] is not finite"),
                                 (0, -0.5, r"batch index"), (0, 2.0, r"batch index")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.detkit.deform_roi_pool(args["input"], _rois_with(column, value), args["offset"],
                                             args["mask"], 2, 3, 0.5, 2, 0.1)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.detkit.deform_roi_pool_backward(
                torch.ones(4, 3, 2, 3, dtype=torch.float64), args["input"], _rois_with(column, value),
                args["offset"], args["mask"], 2, 3, 0.5, 2, 0.1)


def test_adaptive_sampling_grid_is_capped():
    """sampling_ratio=0 takes ceil(bin size) samples per side, at most MAX_ADAPTIVE_GRID (the
    kernels and the reference share the rule): a bin 1500 px wide samples as
    sampling_ratio=1024 does, not as 1500."""
    from detkit.ops.reference import MAX_ADAPTIVE_GRID, _adaptive_grid

    assert MAX_ADAPTIVE_GRID == 1024
    assert [_adaptive_grid(0, v) for v in (40.0, 1000.5, 1e30, -3.0, float("nan"))] == [40, 1001, 1024, 0, 0]
    assert _adaptive_grid(3, 1e30) == 3
    gen = generator(63)
    x = normal((1, 2, 40, 50), gen)
    offset = uniform((1, 2, 1, 1), gen, -0.5, 0.5)
    rois = torch.tensor([[0, -700.0, -10.0, 800.0, 1490.0]], dtype=torch.float64)  # one 1500 x 1500 bin
    auto = deform_roi_pool(x, rois, offset, output_size=1, sampling_ratio=0)
    capped = deform_roi_pool(x, rois, offset, output_size=1, sampling_ratio=1024)
    uncapped = deform_roi_pool(x, rois, offset, output_size=1, sampling_ratio=1500)
    assert torch.equal(auto, capped)
    assert not torch.allclose(auto, uncapped, rtol=0, atol=1e-12)


def test_huge_finite_rois_finish_and_read_zeros():
    """A finite RoI of 1e30 px used to overflow the sample count; it now samples a capped grid
    that lies outside the map: zero output, zero and finite gradients, next to normal RoIs."""
    args = _good_args()
    rois = args["rois"].clone()
    rois[1, 1:] = torch.tensor([-1e30, -1e30, 1e30, 1e30], dtype=torch.float64)
    tensors, rois = _without_rois_grad({k: args[k] for k in ("input", "offset", "mask")} | {"rois": rois})
    kw = {"output_size": (2, 3), "spatial_scale": 0.5, "sampling_ratio": 0}
    out, grads = forward_backward(_detkit, tensors, grad_seed=65, rois=rois, **kw)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"grad of {name} is not finite"
    assert torch.equal(grads["offset"][1], torch.zeros_like(grads["offset"][1]))
    others = [0, 2, 3]
    ref = deform_roi_pool_reference(tensors["input"], rois[others], tensors["offset"][others],
                                    tensors["mask"][others], **kw)
    assert_close_scaled(out[others], ref, 1e-10)
