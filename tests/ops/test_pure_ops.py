"""The pure-PyTorch path of every op (detkit/ops/pure/) against the compiled kernels, and the
dispatch that chooses between them (detkit/ops/_dispatch.py).

Every comparison runs the same public function twice on the same seeded tensors: once on the
kernels, once with the fallback forced (`use_pure_ops`), and compares the output and every
gradient. Without the extension at all, see tests/install/test_no_extension.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import detkit.ops
from detkit.ops import (
    PureOpsWarning,
    _dispatch,
    dcnv3_core,
    dcnv4_core,
    deform_conv2d,
    deform_roi_pool,
    use_pure_ops,
)
from detkit.ops.pure import _bags
from detkit.ops.pure.dcnv3 import dcnv3_core_grid_sample, dcnv3_core_op, dcnv4_core_op
from tests.helpers import assert_results_match, forward_backward, generator, normal, uniform
from tests.ops import test_deform_conv2d as conv_tests
from tests.ops import test_dcnv3 as dcn_tests
from tests.ops import test_deform_roi_pool as pool_tests
from tests.ops.test_dcnv3 import DcnCase
from tests.ops.test_deform_conv2d import ConvCase
from tests.ops.test_deform_roi_pool import PoolCase


def _conv(input, offset, weight, bias=None, mask=None, **conv):
    return deform_conv2d(input, offset, weight, bias, mask=mask, **conv)


def _pool(input, rois, offset=None, mask=None, **kw):
    return deform_roi_pool(input, rois, offset, mask, **kw)


def both_paths(fn, tensors, grad_seed, **kwargs):
    """(kernels, pure) results of forward_backward(fn, ...)."""
    with _dispatch.set_mode("kernels"):
        kernels = forward_backward(fn, tensors, grad_seed, **kwargs)
    with use_pure_ops():
        pure = forward_backward(fn, tensors, grad_seed, **kwargs)
    return kernels, pure


# ---------------------------------------------------------------- deform_conv2d

# Every hand-picked case (groups and offset groups that do not nest, 1xN inputs, 5x5 dilated,
# every stride/padding/dilation pair) and a third of the random ones.
CONV_CASES = conv_tests.HAND_PICKED + conv_tests.CASES[len(conv_tests.HAND_PICKED)::3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.id)
def test_deform_conv2d_pure_equals_kernels(case: ConvCase, dtype):
    kernels, pure = both_paths(_conv, case.tensors(dtype), case.seed + 7, **case.conv_args())
    assert pure[0].dtype == dtype and pure[0].is_contiguous()
    assert_results_match(pure, kernels, rel=1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("case", [conv_tests.HAND_PICKED[0], conv_tests.HAND_PICKED[6]], ids=lambda c: c.id)
def test_deform_conv2d_integer_positions(case: ConvCase):
    """Zero and whole-pixel offsets (every DCN at initialisation): bilinear interpolation has a
    kink there, and the offset gradient must come from the same pixel cell as the kernels'."""
    tensors = case.tensors(torch.float32)
    whole = torch.randint(-2, 3, tensors["offset"].shape, generator=generator(case.seed + 1))
    for offset in (torch.zeros_like(tensors["offset"]), whole.to(torch.float32)):
        kernels, pure = both_paths(_conv, {**tensors, "offset": offset}, case.seed + 2, **case.conv_args())
        assert_results_match(pure, kernels, rel=2e-6)


@pytest.mark.parametrize("values", [[float("nan")], [float("inf"), float("-inf")], [1e6, -1e6, 3e5]],
                         ids=["nan", "inf", "huge"])
def test_deform_conv2d_non_finite_offsets(values):
    case = conv_tests.BAD_OFFSET_CASES[0]
    tensors = case.tensors()
    tensors["offset"], _ = conv_tests._spoil_offsets(tensors["offset"], generator(case.seed + 5), values)
    kernels, pure = both_paths(_conv, tensors, case.seed + 6, **case.conv_args())
    assert torch.isfinite(pure[0]).all() and all(torch.isfinite(g).all() for g in pure[1].values())
    assert_results_match(pure, kernels, rel=1e-12)


@pytest.mark.parametrize("with_mask", [False, True], ids=["dcnv1", "dcnv2"])
def test_deform_conv2d_empty_batch(with_mask):
    case = ConvCase(0, 4, 6, 5, 7, (3, 3), (2, 1), 1, 1, groups=2, offset_groups=2, mask=with_mask, seed=41)
    kernels, pure = both_paths(_conv, case.tensors(), 1, **case.conv_args())
    assert pure[0].shape == (0, case.out_channels, *case.output_size())
    assert_results_match(pure, kernels, rel=0)


@pytest.mark.parametrize("case", conv_tests.GRADCHECK_CASES, ids=lambda c: c.id)
def test_deform_conv2d_gradcheck(case: ConvCase):
    tensors = case.tensors()
    tensors["offset"] = conv_tests._gradcheck_offsets(tensors["offset"].shape, generator(case.seed + 100))
    names = [n for n, t in tensors.items() if t is not None]
    leaves = [tensors[n].clone().requires_grad_(True) for n in names]

    def fn(*args):
        kw = dict(zip(names, args))
        return deform_conv2d(kw["input"], kw["offset"], kw["weight"], kw.get("bias"), case.stride,
                             case.padding, case.dilation, kw.get("mask"))

    with use_pure_ops():
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- deform_roi_pool

POOL_CASES = [c for name in ("REFERENCE_CASES", "GRADCHECK_CASES", "OPCHECK_CASES")
              for c in getattr(pool_tests, name, [])]


def test_pool_cases_cover_plain_deformable_modulated_and_both_samplings():
    assert {(c.offset, c.mask) for c in POOL_CASES} >= {(False, False), (True, False), (True, True)}
    assert {c.sampling_ratio > 0 for c in POOL_CASES} == {True, False}


def _pool_tensors(case: PoolCase, dtype):
    tensors = case.tensors(dtype)
    rois = tensors.pop("rois")
    return tensors, rois


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c.id)
def test_deform_roi_pool_pure_equals_kernels(case: PoolCase, dtype):
    tensors, rois = _pool_tensors(case, dtype)
    kernels, pure = both_paths(_pool, tensors, case.seed + 3, rois=rois, **case.pool_args())
    assert pure[0].dtype == dtype and pure[0].is_contiguous()
    assert_results_match(pure, kernels, rel=1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_deform_roi_pool_rois_on_pixel_centres_and_borders(sampling_ratio):
    """RoIs whose samples land exactly on 0, on the last pixel and on pixel centres, where
    RoIAlign's clamping switches the gradient off."""
    gen = generator(71)
    x = normal((2, 3, 6, 7), gen)
    rois = torch.tensor([[0, 0.5, 0.5, 6.5, 5.5], [1, -1.0, -1.0, 8.0, 7.0], [1, 1.5, 2.5, 3.5, 4.5],
                         [0, 0.0, 0.0, 0.0, 0.0], [1, 3.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    tensors = {"input": x, "offset": torch.zeros(5, 2, 2, 3, dtype=torch.float64),
               "mask": uniform((5, 1, 2, 3), gen, 0, 1)}
    kernels, pure = both_paths(_pool, tensors, 72, rois=rois, output_size=(2, 3),
                               sampling_ratio=sampling_ratio)
    assert_results_match(pure, kernels, rel=1e-12)


@pytest.mark.parametrize("with_offset", [False, True], ids=["plain", "deformable"])
def test_deform_roi_pool_zero_rois(with_offset):
    gen = generator(41)
    tensors = {"input": normal((2, 3, 5, 6), gen)}
    if with_offset:
        tensors |= {"offset": normal((0, 2, 2, 3), gen), "mask": uniform((0, 1, 2, 3), gen, 0, 1)}
    rois = torch.empty(0, 5, dtype=torch.float64)
    kernels, pure = both_paths(_pool, tensors, 1, rois=rois, output_size=(2, 3))
    assert pure[0].shape == (0, 3, 2, 3)
    assert_results_match(pure, kernels, rel=0)


def test_deform_roi_pool_huge_rois_and_non_finite_offsets():
    args = pool_tests._good_args()
    rois = args["rois"].clone()
    rois[1, 1:] = torch.tensor([-1e30, -1e30, 1e30, 1e30], dtype=torch.float64)
    offset = args["offset"].clone()
    offset[2, 0, 1, 2], offset[3, 1, 0, 0], offset[0, :, 1, 1] = float("nan"), float("inf"), 1e7
    tensors = {"input": args["input"], "offset": offset, "mask": args["mask"]}
    for ratio in (0, 2):
        kernels, pure = both_paths(_pool, tensors, 3, rois=rois, output_size=(2, 3), spatial_scale=0.5,
                                   sampling_ratio=ratio)
        assert_results_match(pure, kernels, rel=1e-12)


@pytest.mark.parametrize("case", getattr(pool_tests, "GRADCHECK_CASES"), ids=lambda c: c.id)
def test_deform_roi_pool_gradcheck(case: PoolCase):
    tensors, rois = _pool_tensors(case, torch.float64)
    names = [n for n, t in tensors.items() if t is not None]
    leaves = [tensors[n].clone().requires_grad_(True) for n in names]

    def fn(*args):
        kw = dict(zip(names, args))
        return deform_roi_pool(kw["input"], rois, kw.get("offset"), kw.get("mask"), **case.pool_args())

    with use_pure_ops():
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- the same argument checks

# ---------------------------------------------------------------- dcnv3_core / dcnv4_core

def _v3(input, offset, mask, *, args):
    return dcnv3_core(input, offset, mask, *args)


def _v4(input, offset_mask, *, args):
    return dcnv4_core(input, offset_mask, *args)


def _dcn_both(case: DcnCase, tensors: dict, grad_seed: int, rel: float) -> None:
    """DCNv3 on `tensors` (input, offset, mask), and DCNv4 on the same values packed (random
    padding), on both paths: outputs and every gradient."""
    kernels, pure = both_paths(_v3, tensors, grad_seed, args=case.args())
    assert pure[0].dtype == tensors["input"].dtype and pure[0].is_contiguous()
    assert_results_match(pure, kernels, rel=rel)
    k = case.points
    used = torch.cat([tensors["offset"].unflatten(-1, (case.group, 2 * k)),
                      tensors["mask"].unflatten(-1, (case.group, k))], -1).flatten(-2)
    tail = normal((*used.shape[:-1], dcn_tests.dcnv4_packed_width(case.group, k) - used.shape[-1]),
                  generator(case.seed + 11), std=50.0, dtype=used.dtype)
    packed = {"input": tensors["input"], "offset_mask": torch.cat([used, tail], -1)}
    kernels, pure = both_paths(_v4, packed, grad_seed, args=case.args())
    assert pure[0].is_contiguous()
    assert_results_match(pure, kernels, rel=rel)
    assert not pure[1]["offset_mask"][..., used.shape[-1]:].any()  # the padding: no gradient


def test_dcn_cases_cover_the_brief():
    """stride, dilation, 5x5, remove_center, H or W = 1, group_channels not a power of two."""
    dcn_tests.test_cases_cover_the_brief()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", dcn_tests.CASES, ids=lambda c: c.id)
def test_dcnv3_dcnv4_pure_equals_kernels(case: DcnCase, dtype):
    _dcn_both(case, case.tensors(dtype), case.seed + 7, rel=1e-12 if dtype == torch.float64 else 2e-6)


PIXEL_EXACT_CASES = [dcn_tests.CASES[i] for i in (0, 1, 2, 3, 4, 6, 7)] + [
    DcnCase(1, 6, 7, 2, 3, offset_scale=0.5, seed=31)]


@pytest.mark.parametrize("case", PIXEL_EXACT_CASES, ids=lambda c: c.id)
def test_dcnv3_dcnv4_pixel_exact_positions(case: DcnCase):
    """Zero offsets (every DCNv3/DCNv4 layer at initialisation) and whole-pixel ones (even
    ones with offset_scale 0.5): every sample on a pixel centre, where bilinear interpolation
    has a kink; the offset gradient must come from the kernels' pixel cell, in float32 too."""
    whole_range = 2 if case.offset_scale == 1.0 else 1
    for dtype in (torch.float32, torch.float64):
        t = case.tensors(dtype)
        whole = torch.randint(-whole_range, whole_range + 1, t["offset"].shape, generator=generator(case.seed + 1))
        whole = whole * round(1 / case.offset_scale)
        for offset in (torch.zeros_like(t["offset"]), whole.to(dtype)):
            _dcn_both(case, {**t, "offset": offset}, case.seed + 2,
                      rel=1e-12 if dtype == torch.float64 else 2e-6)


def test_grid_sample_formulation_misses_the_kernels_cell_at_pixel_exact_positions():
    """Why the dispatch does not use the grid_sample formulation: its [-1, 1] coordinates round
    some pixel-exact samples into the neighbouring cell (the offset gradients differ), where the
    pure path takes the kernels' cell (the test above)."""
    case = DcnCase(1, 7, 13, 2, 3, seed=32)
    t = case.tensors(torch.float32)
    t["offset"] = torch.zeros_like(t["offset"])
    kernels, _ = both_paths(_v3, t, 3, args=case.args())

    def grid(input, offset, mask, *, args):
        return dcnv3_core_grid_sample(input, offset, mask, *args)

    sampled = forward_backward(grid, t, 3, args=case.args())
    torch.testing.assert_close(sampled[0], kernels[0], rtol=1e-5, atol=1e-5)
    gap = (sampled[1]["offset"] - kernels[1]["offset"]).abs().max() / kernels[1]["offset"].abs().max()
    assert gap > 1e-2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e6])
def test_dcnv3_dcnv4_non_finite_offsets(value):
    case = dcn_tests.CASES[0]
    t = case.tensors()
    spoiled = torch.rand(t["mask"].shape, generator=generator(3)) < 0.3
    pairs = t["offset"].view(*t["mask"].shape, 2).clone()
    pairs[..., 0] = torch.where(spoiled, torch.full_like(pairs[..., 0], value), pairs[..., 0])
    bad = {**t, "offset": pairs.flatten(-2)}
    kernels, pure = both_paths(_v3, bad, 4, args=case.args())
    assert torch.isfinite(pure[0]).all() and all(torch.isfinite(g).all() for g in pure[1].values())
    assert_results_match(pure, kernels, rel=1e-12)


def test_dcnv3_dcnv4_empty_batch():
    case = DcnCase(0, 5, 6, 2, 3, seed=33)
    _dcn_both(case, case.tensors(), 1, rel=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dcnv3_dcnv4_reduced_precision_computes_in_float32(dtype):
    """float16 / bfloat16 (MPS, CUDA without the kernels): computed in float32 and rounded
    once, as the CUDA kernels accumulate; gradients in the inputs' dtype."""
    case = dcn_tests.CASES[4]
    with use_pure_ops():
        for fn, tensors in ((_v3, case.tensors(torch.float32)), (_v4, case.packed(torch.float32))):
            low = {k: v.to(dtype) for k, v in tensors.items()}
            out, grads = forward_backward(fn, low, 5, args=case.args())
            assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
            want = fn(**{k: v.float() for k, v in low.items()}, args=case.args())
            assert torch.equal(out, want.to(dtype))


@pytest.mark.parametrize("case", dcn_tests.GRADCHECK_CASES, ids=lambda c: c.id)
def test_dcnv3_dcnv4_gradcheck(case: DcnCase):
    """float64 gradcheck of the pure path, both ops (the kernels' test, the fallback forced)."""
    with use_pure_ops():
        dcn_tests.test_gradcheck(case)


# ---------------------------------------------------------------- bad arguments

def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (compared below)
        return type(exc), str(exc)
    return None


def _same_error_on_both_paths(fn):
    with _dispatch.set_mode("kernels"):
        kernels = _error_of(fn)
    with use_pure_ops():
        pure = _error_of(fn)
    assert kernels is not None
    assert pure == kernels


@pytest.mark.parametrize("changes", [a[1] for a in conv_tests.BAD_ARGS], ids=[a[0] for a in conv_tests.BAD_ARGS])
def test_deform_conv2d_bad_arguments_same_errors(changes):
    _same_error_on_both_paths(lambda: conv_tests._call(**changes))


@pytest.mark.parametrize("changes", [a[1] for a in pool_tests.BAD_ARGS], ids=[a[0] for a in pool_tests.BAD_ARGS])
def test_deform_roi_pool_bad_arguments_same_errors(changes):
    """Including the RoI value checks, which live in the kernels (csrc/roi_checks.h) and are
    mirrored on the pure path with the same RuntimeError messages."""
    _same_error_on_both_paths(lambda: deform_roi_pool(**{**pool_tests._good_args(), **changes}))


@pytest.mark.parametrize("changes", [a[1] for a in conv_tests.RAW_BAD_ARGS],
                         ids=[a[0] for a in conv_tests.RAW_BAD_ARGS])
def test_pure_op_checks_like_the_kernel(changes):
    """The pure function registered as the op when there is no extension checks what the C++
    kernel checks, with its messages."""
    from detkit.ops.pure.deform_conv2d import deform_conv2d_op

    a = {**conv_tests._good_args(), "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], **changes}
    args = (a["input"], a["offset"], a["weight"], a["mask"], a["bias"], a["stride"], a["padding"], a["dilation"])
    assert _error_of(lambda: deform_conv2d_op(*args)) == _error_of(lambda: torch.ops.detkit.deform_conv2d(*args))


def test_pure_roi_op_checks_like_the_kernel():
    from detkit.ops.pure.deform_roi_pool import deform_roi_pool_op

    a = pool_tests._good_args()
    bad = [(a["input"], a["rois"][:, 1:], a["offset"], a["mask"], 2, 3, 0.5, 2, 0.1),
           (a["input"], a["rois"], a["offset"][:, :1], a["mask"], 2, 3, 0.5, 2, 0.1),
           (a["input"], a["rois"], a["offset"], a["mask"].float(), 2, 3, 0.5, 2, 0.1),
           (a["input"], pool_tests._rois_with(2, float("nan")), a["offset"], a["mask"], 2, 3, 0.5, 2, 0.1),
           (a["input"], pool_tests._rois_with(0, 2.0), None, None, 2, 3, 0.5, 2, 0.1)]
    for args in bad:
        kernel = _error_of(lambda: torch.ops.detkit.deform_roi_pool(*args))
        assert kernel is not None and _error_of(lambda: deform_roi_pool_op(*args)) == kernel


@pytest.mark.parametrize("changes", [a[1] for a in dcn_tests.BAD_ARGS], ids=[a[0] for a in dcn_tests.BAD_ARGS])
def test_dcnv3_bad_arguments_same_errors(changes):
    _same_error_on_both_paths(lambda: dcn_tests._call_v3(**changes))


@pytest.mark.parametrize("changes", [a[1] for a in dcn_tests.BAD_ARGS_V4],
                         ids=[a[0] for a in dcn_tests.BAD_ARGS_V4])
def test_dcnv4_bad_arguments_same_errors(changes):
    _same_error_on_both_paths(lambda: dcn_tests._call_v4(**changes))


_DCN_GOOD = dcn_tests._GOOD
_DCN_RAW_BAD = [
    *((name, changes) for name, changes, _ in dcn_tests.RAW_BAD_ARGS),
    ("input_rank", {"input": _DCN_GOOD["input"][0]}),
    ("offset_rank", {"offset": _DCN_GOOD["offset"][0]}),
    ("offset_dtype", {"offset": _DCN_GOOD["offset"].float()}),
    ("pairs", {"kernel_size": [3]}),
    ("kernel_zero", {"kernel_size": [0, 3]}),
    ("padding_negative", {"padding": [1, -1]}),
    ("group_zero", {"group": 0, "group_channels": 8}),
    ("one_point_removed", {"kernel_size": [1, 1], "remove_center": True}),
    ("too_small", {"kernel_size": [9, 3]}),
    ("remove_center_shapes", {"remove_center": True}),
]


@pytest.mark.parametrize("changes", [a[1] for a in _DCN_RAW_BAD], ids=[a[0] for a in _DCN_RAW_BAD])
def test_pure_dcn_ops_check_like_the_kernel(changes):
    """The pure functions registered as dcnv3_core / dcnv4_core without the extension check
    what the C++ kernel checks, with its messages."""
    a = {"input": _DCN_GOOD["input"], "offset": _DCN_GOOD["offset"], "mask": _DCN_GOOD["mask"],
         "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "group": 2,
         "group_channels": 4, "remove_center": False, **changes}
    geometry = (a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["group"], a["group_channels"], 1.0,
                a["remove_center"])
    args = (a["input"], a["offset"], a["mask"], *geometry)
    kernel = _error_of(lambda: torch.ops.detkit.dcnv3_core(*args))
    assert kernel is not None and _error_of(lambda: dcnv3_core_op(*args)) == kernel
    packed = a.get("offset_mask", _DCN_GOOD["offset_mask"] if "offset" not in changes else a["offset"])
    args = (a["input"], packed, *geometry)
    kernel = _error_of(lambda: torch.ops.detkit.dcnv4_core(*args))
    if kernel is not None:
        assert _error_of(lambda: dcnv4_core_op(*args)) == kernel


def test_pure_dcnv4_op_checks_the_padding_like_the_kernel():
    args = (_DCN_GOOD["input"], _DCN_GOOD["offset_mask"][..., :54], [3, 3], [1, 1], [1, 1], [1, 1], 2, 4, 1.0, False)
    kernel = _error_of(lambda: torch.ops.detkit.dcnv4_core(*args))
    assert kernel is not None and _error_of(lambda: dcnv4_core_op(*args)) == kernel


# ---------------------------------------------------------------- formulations, autocast, compile

def test_gather_formulation_equals_embedding_bag(monkeypatch):
    """Devices without embedding_bag (MPS, XPU, ...) take index_select-multiply-sum: the same
    results, checked here on CPU by taking that branch."""
    conv = conv_tests.HAND_PICKED[1]
    pools = [PoolCase(2, 3, 7, 9, (2, 3), 1.0, 0, 4, (1.0, 8.0), seed=1),
             PoolCase(2, 3, 7, 9, (2, 3), 0.5, 2, 4, (1.0, 8.0), seed=2)]

    dcn = dcn_tests.CASES[4]

    def run_all():
        results = [forward_backward(_conv, conv.tensors(), 1, **conv.conv_args())]
        for case in pools:
            tensors, rois = _pool_tensors(case, torch.float64)
            results.append(forward_backward(_pool, tensors, 5, rois=rois, **case.pool_args()))
        results.append(forward_backward(_v3, dcn.tensors(), 6, args=dcn.args()))
        results.append(forward_backward(_v4, dcn.packed(), 6, args=dcn.args()))
        return results

    with use_pure_ops():
        bags = run_all()
        monkeypatch.setattr(_bags, "EMBEDDING_BAG_DEVICES", set())
        gathers = run_all()
    for a, b in zip(gathers, bags):
        assert_results_match(a, b, rel=1e-12)


def test_autocast_runs_the_pure_path_in_float32():
    case = conv_tests.HAND_PICKED[0]
    t = case.tensors(torch.float32)
    with use_pure_ops():
        expected = _conv(**t, **case.conv_args())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _conv(**{k: (v.bfloat16() if k == "input" and v is not None else v) for k, v in t.items()},
                        **case.conv_args())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _conv(**{**t, "input": t["input"].bfloat16().float()}, **case.conv_args()))
    assert expected.dtype == torch.float32
    dcn = dcn_tests.CASES[0]
    t = {k: v.float() for k, v in dcn.tensors().items()}
    with use_pure_ops():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = dcnv3_core(t["input"].bfloat16(), t["offset"], t["mask"].bfloat16(), *dcn.args())
        want = dcnv3_core(t["input"].bfloat16().float(), t["offset"], t["mask"].bfloat16().float(), *dcn.args())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_torch_compile_traces_the_pure_path_whole():
    """fullgraph=True: no graph break anywhere in any op (fixed sampling ratio), forward and
    backward, with the same results as eager."""
    conv = conv_tests.HAND_PICKED[0]
    pool = PoolCase(2, 3, 7, 9, (2, 3), 0.5, 2, 4, (1.0, 8.0), seed=2)
    pool_tensors, rois = _pool_tensors(pool, torch.float64)
    dcn = dcn_tests.CASES[5]  # 5x5, remove_center, offset_scale 0.5, D = 7

    def both(input, offset, weight, bias, mask, pool_input, pool_offset, pool_mask, dcn_input, dcn_offset,
             dcn_mask, dcn_offset_mask):
        a = deform_conv2d(input, offset, weight, bias, conv.stride, conv.padding, conv.dilation, mask)
        b = deform_roi_pool(pool_input, rois, pool_offset, pool_mask, pool.output_size, pool.spatial_scale,
                            pool.sampling_ratio, pool.gamma)
        c = dcnv3_core(dcn_input, dcn_offset, dcn_mask.softmax(-1), *dcn.args())
        d = dcnv4_core(dcn_input * 2, dcn_offset_mask, *dcn.args())
        return a.sum() + (b * b).sum() + (c * d).sum()

    tensors = {**conv.tensors(), **{f"pool_{k}": v for k, v in pool_tensors.items()},
               **{f"dcn_{k}": v for k, v in dcn.tensors().items()}, "dcn_offset_mask": dcn.packed()["offset_mask"]}
    with use_pure_ops():
        torch._dynamo.reset()
        compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
        leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        eager_leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        got, want = compiled(**leaves), both(**eager_leaves)
        got.backward()
        want.backward()
    torch.testing.assert_close(got, want)
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, eager_leaves[name].grad, msg=name)


# ---------------------------------------------------------------- the dispatch

@pytest.fixture
def no_cpu_kernels(monkeypatch):
    """As if the extension had no CPU kernels (a device without detkit kernels), the
    once-per-process warning not yet given."""
    table = {key: (False if key[1] == "cpu" else found) for key, found in _dispatch._has_kernel.items()}
    monkeypatch.setattr(_dispatch, "_has_kernel", table)
    monkeypatch.setattr(_dispatch, "_warned", False)
    with _dispatch.set_mode("auto"):
        yield


def test_fallback_warns_once_per_process(no_cpu_kernels):
    """One warning for all four ops."""
    case = conv_tests.HAND_PICKED[0]
    t = case.tensors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _conv(**t, **case.conv_args())
        _conv(**t, **case.conv_args())
        args = pool_tests._good_args()
        deform_roi_pool(**args)
        dcn = dcn_tests.CASES[0]
        dcnv3_core(*dcn.tensors().values(), *dcn.args())
        dcnv4_core(*dcn.packed().values(), *dcn.args())
    ours = [w for w in caught if issubclass(w.category, PureOpsWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "pure-PyTorch path for cpu tensors" in message
    assert "pip install --no-build-isolation -e ." in message and "DETKIT_OPS=pure" in message
    assert ours[0].filename == __file__  # points at the caller
    with use_pure_ops():
        torch.testing.assert_close(out, _conv(**t, **case.conv_args()), rtol=0, atol=0)
    assert detkit.ops.ops_path("cpu") == "pure"


def test_forced_pure_path_does_not_warn(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", False)
    case = conv_tests.HAND_PICKED[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_pure_ops():
            _conv(**case.tensors(), **case.conv_args())
            assert detkit.ops.ops_path("cpu") == "pure"


def test_kernels_mode_refuses_the_fallback(no_cpu_kernels):
    case = conv_tests.HAND_PICKED[0]
    with _dispatch.set_mode("kernels"), pytest.raises(RuntimeError, match=r"DETKIT_OPS=kernels forbids"):
        _conv(**case.tensors(), **case.conv_args())


def test_use_pure_ops_sets_and_restores():
    start = _dispatch.mode()
    handle = use_pure_ops()
    try:
        assert _dispatch.mode() == "pure"
        with use_pure_ops(False):
            assert _dispatch.mode() == "auto"
        assert _dispatch.mode() == "pure"
    finally:
        _dispatch.set_mode(handle.previous)
    assert _dispatch.mode() == start
    with pytest.raises(ValueError, match="mode must be one of auto, pure, kernels"):
        _dispatch.set_mode("fast")


def test_environment_variable(monkeypatch):
    for value, mode in [("", "auto"), ("pure", "pure"), (" Kernels ", "kernels"), ("auto", "auto")]:
        monkeypatch.setenv("DETKIT_OPS", value)
        assert _dispatch._mode_from_env() == mode
    monkeypatch.setenv("DETKIT_OPS", "slow")
    with pytest.raises(ValueError, match=r"DETKIT_OPS must be one of auto, pure, kernels"):
        _dispatch._mode_from_env()


def test_paths_and_require_ops_per_device():
    assert detkit.ops.ops_path("cpu") == ("pure" if _dispatch.mode() == "pure" else "kernels")
    detkit.ops.require_ops("cpu")  # the CPU kernels are built
    if not detkit.ops.cuda_kernels_built():
        assert _dispatch.path("cuda") == ("kernels" if _dispatch.mode() == "kernels" else "pure")
        with pytest.raises(RuntimeError, match=r"CPU kernels only"):
            detkit.ops.require_ops("cuda")
    with pytest.raises(RuntimeError, match=r"no mps kernel"):
        detkit.ops.require_ops("mps")


def test_op_table_matches_the_extensions_schemas():
    """The schemas the pure path defines without the extension are csrc/schemas.cpp's."""
    for name, op in _dispatch.OPS.items():
        assert str(getattr(torch.ops.detkit, name).default._schema) == f"detkit::{op.schema}"


def test_dcn_ops_warn_on_their_own(no_cpu_kernels):
    """A process whose first fallback is a DCNv3/DCNv4 op warns once, at the caller, naming the
    op's kernel that is missing."""
    case = dcn_tests.CASES[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dcnv4_core(*case.packed().values(), *case.args())
        dcnv3_core(*case.tensors().values(), *case.args())
    ours = [w for w in caught if issubclass(w.category, PureOpsWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__
    assert "has no cpu kernel of dcnv4_core" in str(ours[0].message)
    with use_pure_ops():
        torch.testing.assert_close(out, dcnv4_core(*case.packed().values(), *case.args()), rtol=0, atol=0)
    assert _dispatch.path("cpu", "dcnv3_core") == "pure"
