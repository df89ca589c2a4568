"""CUDA kernels against the CPU kernels (which the other test files check against torchvision
and the reference), low precision, autocast and torch.compile on CUDA.

Skipped unless a CUDA device is present; with one, a build without the CUDA kernels fails.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import detkit.ops
from detkit.ops import DeformConv2d, DeformRoIPool, deform_conv2d, deform_roi_pool
from detkit.ops._extension import set_cuda_columns_budget
from tests.helpers import (
    assert_close_scaled,
    assert_results_match,
    forward_backward,
    generator,
    normal,
    random_rois,
    uniform,
)
from tests.ops.test_deform_conv2d import CASES as CONV_RANDOM_CASES
from tests.ops.test_deform_conv2d import HAND_PICKED as CONV_CASES
from tests.ops.test_deform_conv2d import ConvCase, _spoil_offsets
from tests.ops.test_deform_roi_pool import REFERENCE_CASES as POOL_CASES
from tests.ops.test_deform_roi_pool import PoolCase

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available"),
    # Not skipped when the CUDA kernels were not built: test_the_cuda_kernels_were_built fails
    # then (a visible GPU with a CPU-only build is a broken install, not a reason to skip).
]

CUDA = "cuda"


def test_the_cuda_kernels_were_built():
    """On a machine with a GPU, a detkit built without its CUDA kernels is a failure."""
    assert detkit.ops.cuda_kernels_built(), (
        "a CUDA device is visible but detkit was built without its CUDA kernels: rebuild with "
        "DETKIT_WITH_CUDA=1 pip install --no-build-isolation -e .")


def _to(tensors: dict, device=None, dtype=None) -> dict:
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in tensors.items()}


def _cpu_result(result):
    out, grads = result
    return out.cpu(), {k: g.cpu() for k, g in grads.items()}


def _conv(input, offset, weight, bias=None, mask=None, **conv):
    return deform_conv2d(input, offset, weight, bias, mask=mask, **conv)


def _pool(input, rois, offset=None, mask=None, **kw):
    return deform_roi_pool(input, rois, offset, mask, **kw)


def _run_with_grad(fn, tensors: dict, grad_output: torch.Tensor, **kwargs):
    """Forward, then backward of the given output gradient; returns output and grads by name."""
    leaves = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in tensors.items()}
    out = fn(**leaves, **kwargs)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_output)
    return out.detach(), dict(zip(names, grads))


# ---------------------------------------------------------------- CUDA vs CPU, float32 / float64

CUDA_CONV_CASES = CONV_CASES + CONV_RANDOM_CASES[len(CONV_CASES):len(CONV_CASES) + 12]


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CUDA_CONV_CASES, ids=lambda c: c.id)
def test_deform_conv2d_cuda_matches_cpu(case: ConvCase, dtype, rel):
    tensors = case.tensors(dtype)
    cpu = forward_backward(_conv, tensors, grad_seed=case.seed + 1, **case.conv_args())
    gpu = forward_backward(_conv, _to(tensors, CUDA), grad_seed=case.seed + 1, **case.conv_args())
    assert gpu[0].device.type == CUDA and gpu[0].dtype == dtype
    assert_results_match(_cpu_result(gpu), cpu, rel)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c.id)
def test_deform_roi_pool_cuda_matches_cpu(case: PoolCase, dtype, rel):
    tensors = case.tensors(dtype)
    rois = tensors.pop("rois")
    cpu = forward_backward(_pool, tensors, grad_seed=case.seed + 1, rois=rois, **case.pool_args())
    gpu = forward_backward(_pool, _to(tensors, CUDA), grad_seed=case.seed + 1, rois=rois.to(CUDA),
                           **case.pool_args())
    assert gpu[0].device.type == CUDA and gpu[0].dtype == dtype
    assert_results_match(_cpu_result(gpu), cpu, rel)


def test_deform_roi_pool_cuda_without_offsets_many_rois():
    gen = generator(5)
    x = normal((3, 16, 20, 24), gen, dtype=torch.float32)
    rois = random_rois(gen, 300, 3, 160.0, 192.0, 2.0, 120.0, dtype=torch.float32)
    kw = {"output_size": 7, "spatial_scale": 0.125, "sampling_ratio": 0}
    cpu = forward_backward(lambda input: deform_roi_pool(input, rois, **kw), {"input": x}, grad_seed=6)
    gpu = forward_backward(lambda input: deform_roi_pool(input, rois.to(CUDA), **kw), {"input": x.to(CUDA)},
                           grad_seed=6)
    assert_results_match(_cpu_result(gpu), cpu, 1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_cuda_non_contiguous_inputs(layout):
    case = ConvCase(2, 6, 4, 5, 6, (3, 3), (1, 2), 1, (2, 1), groups=2, offset_groups=3, seed=7)
    tensors = _to(case.tensors(), CUDA)

    def strided(t):
        if t.dim() != 4:  # bias: every other element of a bigger tensor holding junk
            big = normal((2 * t.shape[0],), generator(99), std=100.0, dtype=t.dtype).to(t.device)
            big[::2] = t
            return big[::2]
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        return t.transpose(2, 3).contiguous().transpose(2, 3)

    got = forward_backward(_conv, {k: strided(v) for k, v in tensors.items()}, grad_seed=8, **case.conv_args())
    want = forward_backward(_conv, tensors, grad_seed=8, **case.conv_args())
    assert_results_match(got, want, 1e-12)

    pool_case = POOL_CASES[1]
    t = _to(pool_case.tensors(), CUDA)
    rois = t.pop("rois")
    got = forward_backward(_pool, {k: strided(v) for k, v in t.items()}, grad_seed=9, rois=rois,
                           **pool_case.pool_args())
    want = forward_backward(_pool, t, grad_seed=9, rois=rois, **pool_case.pool_args())
    assert_results_match(got, want, 1e-12)


@pytest.mark.parametrize("values", [[float("nan")], [float("inf"), float("-inf")], [1e6, -1e6]],
                         ids=["nan", "inf", "huge"])
def test_cuda_non_finite_offsets_match_cpu(values):
    case = ConvCase(2, 6, 4, 5, 6, (3, 3), 1, 1, 1, groups=2, offset_groups=3, seed=10)
    tensors = case.tensors()
    tensors["offset"], _ = _spoil_offsets(tensors["offset"], generator(11), values)
    cpu = forward_backward(_conv, tensors, grad_seed=12, **case.conv_args())
    gpu = _cpu_result(forward_backward(_conv, _to(tensors, CUDA), grad_seed=12, **case.conv_args()))
    assert torch.isfinite(gpu[0]).all()
    assert all(torch.isfinite(g).all() for g in gpu[1].values())
    assert_results_match(gpu, cpu, 1e-10)


def test_cuda_empty_batch_and_no_rois():
    case = ConvCase(0, 4, 6, 5, 7, (3, 3), 1, 1, 1, groups=2, offset_groups=2, seed=13)
    t = {k: v.requires_grad_(True) for k, v in _to(case.tensors(), CUDA).items()}
    out = deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])
    assert out.shape == (0, 6, 5, 7)
    out.sum().backward()
    assert torch.equal(t["weight"].grad, torch.zeros_like(t["weight"]))
    assert torch.equal(t["bias"].grad, torch.zeros_like(t["bias"]))

    x = normal((2, 3, 5, 6), generator(14)).to(CUDA).requires_grad_(True)
    pooled = deform_roi_pool(x, torch.empty(0, 5, dtype=torch.float64, device=CUDA), output_size=(2, 3))
    assert pooled.shape == (0, 3, 2, 3)
    pooled.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cuda_bad_batch_index_raises():
    gen = generator(15)
    x = normal((2, 3, 5, 6), gen).to(CUDA)
    rois = random_rois(gen, 4, 2, 5.0, 6.0, 1.0, 4.0).to(CUDA)
    rois[2, 0] = 5
    with pytest.raises((ValueError, RuntimeError), match=r"batch index"):
        deform_roi_pool(x, rois, output_size=2)


BAD_ROI_VALUES = [(0, -0.5, r"rois\[2, 0\] \(batch index\) is -0.5"), (0, 2.0, r"batch index"),
                  (1, float("nan"), r"rois\[2, 1\] is not finite"),
                  (4, float("inf"), r"rois\[2, 4\] is not finite")]


@pytest.mark.parametrize("column,value,match", BAD_ROI_VALUES, ids=["index_minus_half", "index_2", "nan", "inf"])
def test_cuda_bad_rois_refused_by_the_kernel(column, value, match):
    """The CUDA kernel refuses what the CPU kernel refuses, also when called through
    torch.ops (no Python checks), forward and backward, with sampling_ratio=0 (where an inf
    coordinate used to make the sample loops run ~1e18 times)."""
    gen = generator(23)
    x = normal((2, 3, 5, 6), gen).to(CUDA)
    rois = random_rois(gen, 4, 2, 5.0, 6.0, 1.0, 4.0).to(CUDA)
    rois[2, column] = value
    offset = normal((4, 2, 2, 2), gen).to(CUDA)
    with pytest.raises(RuntimeError, match=match):
        deform_roi_pool(x, rois, offset, output_size=2, sampling_ratio=0)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.detkit.deform_roi_pool(x, rois, offset, None, 2, 2, 1.0, 0, 0.1)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.detkit.deform_roi_pool_backward(torch.ones(4, 3, 2, 2, dtype=x.dtype, device=CUDA), x,
                                                  rois, offset, None, 2, 2, 1.0, 0, 0.1)


def test_cuda_float16_rois_beyond_65504_are_refused():
    x = normal((1, 4, 8, 8), generator(24)).to(CUDA, torch.float16)
    rois = torch.tensor([[0, 1.0, 1.0, 7.0, 7.0], [0, 2.0, 2.0, 70000.0, 6.0]], device=CUDA).half()
    assert torch.isinf(rois[1, 3])
    with pytest.raises(RuntimeError, match=r"rois\[1, 3\] is not finite.*65504"):
        deform_roi_pool(x, rois, output_size=2, sampling_ratio=0)


def test_cuda_huge_finite_rois_are_bounded_and_match_cpu():
    """Huge but finite RoIs run a capped sampling grid (csrc/roi_checks.h), as on the CPU."""
    gen = generator(25)
    x = normal((2, 3, 40, 50), gen)
    rois = random_rois(gen, 5, 2, 40.0, 50.0, 2.0, 30.0)
    rois[1, 1:] = torch.tensor([-1e30, -1e30, 1e30, 1e30], dtype=torch.float64)
    rois[3, 1:] = torch.tensor([-700.0, -10.0, 800.0, 1490.0], dtype=torch.float64)
    offset = normal((5, 2, 1, 1), gen)
    tensors = {"input": x, "offset": offset}
    kw = {"output_size": 1, "sampling_ratio": 0}
    cpu = forward_backward(_pool, tensors, grad_seed=26, rois=rois, **kw)
    gpu = _cpu_result(forward_backward(_pool, _to(tensors, CUDA), grad_seed=26, rois=rois.to(CUDA), **kw))
    assert torch.equal(gpu[0][1], torch.zeros_like(gpu[0][1]))
    assert_results_match(gpu, cpu, 1e-10)


def test_cuda_graph_capture_skips_the_host_check_and_zeroes_bad_rois():
    """During CUDA graph capture the host-side RoI check (a device-to-host copy) cannot run;
    the kernels then treat a non-finite or out-of-range RoI as empty instead of reading
    out of bounds or looping without end."""
    gen = generator(27)
    x = normal((2, 3, 6, 7), gen, dtype=torch.float32).to(CUDA)
    good = random_rois(gen, 3, 2, 12.0, 14.0, 2.0, 8.0, dtype=torch.float32).to(CUDA)
    rois = torch.cat([good, torch.tensor([[-0.5, 1.0, 1.0, 5.0, 5.0], [0, float("inf"), 1.0, 5.0, 5.0]],
                                         device=CUDA)])
    expected = deform_roi_pool(x, good, output_size=2, spatial_scale=0.5, sampling_ratio=0)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = torch.ops.detkit.deform_roi_pool(x, rois, None, None, 2, 2, 0.5, 0, 0.1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[:3], expected)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))


# ---------------------------------------------------------------- float16 / bfloat16

LOW_PRECISION = [torch.float16, torch.bfloat16]
LOW_CONV_CASES = [CONV_CASES[0], CONV_CASES[1], CONV_CASES[6], CONV_CASES[7],
                  ConvCase(2, 32, 16, 12, 10, (3, 3), 1, 1, 1, groups=2, offset_groups=4, seed=16)]
LOW_POOL_CASES = [POOL_CASES[0], POOL_CASES[2], POOL_CASES[4],
                  PoolCase(2, 32, 12, 14, 7, 0.5, 2, 20, (2.0, 20.0), seed=17)]


def _low_precision_tol(dtype) -> float:
    # The kernels accumulate in float32; what remains is rounding of stored intermediates
    # (the GEMM columns) and of the results: a few units of the dtype's epsilon, relative
    # to the scale of each result.
    return 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", LOW_CONV_CASES, ids=lambda c: c.id)
def test_deform_conv2d_low_precision_matches_float32_cpu(case: ConvCase, dtype):
    """Inputs rounded to the low dtype; the float32 CPU result on the same rounded values
    is what the CUDA kernel should reproduce up to its own rounding."""
    low = _to(case.tensors(), dtype=dtype)
    ho, wo = case.output_size()
    grad_output = normal((case.batch, case.out_channels, ho, wo), generator(case.seed + 2)).to(dtype)
    cpu = _run_with_grad(_conv, _to(low, dtype=torch.float32), grad_output.float(), **case.conv_args())
    gpu = _run_with_grad(_conv, _to(low, CUDA), grad_output.to(CUDA), **case.conv_args())
    assert gpu[0].dtype == dtype and all(g.dtype == dtype for g in gpu[1].values())
    got = (gpu[0].float().cpu(), {k: g.float().cpu() for k, g in gpu[1].items()})
    assert_results_match(got, cpu, _low_precision_tol(dtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", LOW_POOL_CASES, ids=lambda c: c.id)
def test_deform_roi_pool_low_precision_matches_float32_cpu(case: PoolCase, dtype):
    low = _to(case.tensors(), dtype=dtype)
    rois = low.pop("rois")
    ph, pw = case.pooled
    grad_output = normal((case.num_rois, case.channels, ph, pw), generator(case.seed + 2)).to(dtype)
    cpu = _run_with_grad(_pool, _to(low, dtype=torch.float32), grad_output.float(), rois=rois.float(),
                         **case.pool_args())
    gpu = _run_with_grad(_pool, _to(low, CUDA), grad_output.to(CUDA), rois=rois.to(CUDA), **case.pool_args())
    assert gpu[0].dtype == dtype and all(g.dtype == dtype for g in gpu[1].values())
    got = (gpu[0].float().cpu(), {k: g.float().cpu() for k, g in gpu[1].items()})
    assert_results_match(got, cpu, _low_precision_tol(dtype))


# ---------------------------------------------------------------- autocast

class _TinyNet(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = DeformConv2d(3, channels, 3, padding=1, offset_groups=1, modulated=True)
        self.pool = DeformRoIPool(channels, output_size=3, spatial_scale=0.5, sampling_ratio=2,
                                  modulated=True, hidden_dim=16)

    def forward(self, x, rois):
        return self.pool(self.conv(x), rois)


def _nontrivial_offset_branches(model: _TinyNet, gen: torch.Generator) -> None:
    with torch.no_grad():
        w = model.conv.offset_branch.weight
        w.copy_(normal(w.shape, gen, std=0.2, dtype=w.dtype))
        last = model.pool.offset_branch[-1]
        last.weight.copy_(normal(last.weight.shape, gen, std=0.5, dtype=last.weight.dtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cuda_autocast_runs_offsets_and_ops_in_float32(dtype):
    """Under autocast the offset branches and the deformable ops run in float32 (the policy
    of csrc/autocast.cpp and detkit/ops/modules.py): the sampling positions, and so the
    outputs, equal those of the float32 model, while a plain conv beside them runs in the
    low dtype."""
    torch.manual_seed(18)
    gen = generator(19)
    model = _TinyNet().to(CUDA)
    _nontrivial_offset_branches(model, gen)
    x = normal((2, 3, 16, 20), gen, dtype=torch.float32).to(CUDA)
    rois = torch.tensor([[0, 2.0, 3.0, 30.0, 26.0], [1, 8.0, 0.5, 20.0, 31.0], [0, -4.0, 6.0, 12.0, 14.0]],
                        device=CUDA)
    plain = nn.Conv2d(3, 4, 3).to(CUDA)
    full_offsets = model.conv.predict_offsets(x)
    full_conv, full = model.conv(x), model(x, rois)
    with torch.autocast("cuda", dtype=dtype):
        offsets = model.conv.predict_offsets(x)
        conv = model.conv(x)
        out = model(x, rois)
        assert plain(x).dtype == dtype
    assert offsets[0].dtype == torch.float32 and offsets[1].dtype == torch.float32
    assert_close_scaled(offsets[0], full_offsets[0], 1e-6, "offsets")
    assert_close_scaled(offsets[1], full_offsets[1], 1e-6, "mask")
    assert conv.dtype == torch.float32 and out.dtype == torch.float32
    assert_close_scaled(conv, full_conv, 1e-5, "conv")
    assert_close_scaled(out, full, 1e-5, "pooled")
    (out.square().mean()).backward()
    assert model.conv.offset_branch.weight.grad.abs().max() > 0
    assert model.pool.offset_branch[-1].weight.grad.abs().max() > 0


def test_cuda_autocast_keeps_roi_coordinates_precise():
    """Autocast may round features, not box geometry: RoI corners of a 1024-pixel image
    rounded to bfloat16 move by up to 4 pixels, which shifts the pooled features far more
    than bfloat16 feature rounding does (torchvision's roi_align runs in float32 under
    autocast for this reason)."""
    gen = generator(20)
    x = normal((2, 8, 50, 64), gen, dtype=torch.float32).to(CUDA)
    rois = random_rois(gen, 30, 2, 800.0, 1024.0, 32.0, 400.0, dtype=torch.float32).to(CUDA)
    kw = {"output_size": 7, "spatial_scale": 1 / 16, "sampling_ratio": 2}
    full = deform_roi_pool(x, rois, **kw)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = deform_roi_pool(x, rois, **kw)
    assert out.is_floating_point()
    assert_close_scaled(out.float(), full, 8 * torch.finfo(torch.bfloat16).eps)


# ---------------------------------------------------------------- torch.compile on CUDA

@pytest.mark.slow
def test_cuda_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(21)
    gen = generator(22)
    model = _TinyNet().to(CUDA)
    eager = copy.deepcopy(model)
    x = normal((2, 3, 16, 20), gen, dtype=torch.float32).to(CUDA)
    rois = random_rois(gen, 6, 2, 32.0, 40.0, 4.0, 30.0, dtype=torch.float32).to(CUDA)
    target = normal((6, 8, 3, 3), gen, dtype=torch.float32).to(CUDA)
    compiled = torch.compile(model, fullgraph=True)

    out_c, out_e = compiled(x, rois), eager(x, rois)
    assert_close_scaled(out_c.detach(), out_e.detach(), 1e-5, "compiled output")
    F.mse_loss(out_c, target).backward()
    F.mse_loss(out_e, target).backward()
    compiled_params = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        assert_close_scaled(compiled_params[name].grad, p.grad, 1e-4, f"grad of {name}")

    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(compiled(x, rois), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    torch._dynamo.reset()


# ---------------------------------------------------------------- chunked im2col path

@contextlib.contextmanager
def _columns_budget(num_bytes: int):
    previous = set_cuda_columns_budget(num_bytes)
    try:
        yield
    finally:
        set_cuda_columns_budget(previous)


CHUNK_CASES = [ConvCase(5, 16, 12, 11, 13, (3, 3), 1, 1, 1, groups=2, offset_groups=2, seed=30),
               ConvCase(3, 8, 6, 9, 8, (3, 2), (2, 1), (1, 0), (1, 2), groups=1, offset_groups=4, seed=31),
               ConvCase(4, 6, 6, 7, 7, (1, 1), 1, 0, 1, groups=3, offset_groups=1, seed=32)]


@pytest.mark.parametrize("images_per_chunk", [1, 2], ids=["chunk1", "chunk2"])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: c.id)
def test_cuda_chunked_im2col_matches_one_chunk(case: ConvCase, images_per_chunk):
    """Real shapes (256 channels, 3x3, 200x272) run one image per chunk; the test shapes fit
    one chunk unless the budget is lowered. Every output and gradient must agree."""
    tensors = _to(case.tensors(torch.float64), CUDA)
    whole = forward_backward(_conv, tensors, grad_seed=case.seed + 1, **case.conv_args())
    ho, wo = case.output_size()
    taps = case.kernel[0] * case.kernel[1]
    per_image = (case.in_channels * taps + case.out_channels) * ho * wo * 8  # bytes, float64
    with _columns_budget(per_image * images_per_chunk):
        chunked = forward_backward(_conv, tensors, grad_seed=case.seed + 1, **case.conv_args())
    assert_results_match(chunked, whole, 1e-12)


def test_cuda_weight_gradient_sums_chunks_in_float32():
    """float16 weight gradient over two one-image chunks whose partial sums (about +-80000)
    exceed float16's range while their total does not: summed in float32 it matches the
    float32 CPU result; rounded to float16 per chunk it would be inf."""
    x = torch.full((2, 1, 8, 8), 32.0)
    offset = torch.zeros(2, 2 * 9, 8, 8)
    weight = torch.ones(1, 1, 3, 3)
    grad_output = torch.full((2, 1, 8, 8), 40.0)
    grad_output[1] *= -(1 - 2 ** -6)
    leaves = [t.clone().requires_grad_(True) for t in (x, offset, weight)]
    want = torch.autograd.grad(deform_conv2d(*leaves, padding=1), leaves[2], grad_output)[0]
    partial = float((grad_output[0] * 32).sum())
    assert float(want.abs().max()) < 65504 < partial
    low = [t.to(CUDA, torch.float16).requires_grad_(True) for t in (x, offset, weight)]
    with _columns_budget(1):
        got = torch.autograd.grad(deform_conv2d(*low, padding=1), low[2], grad_output.to(CUDA, torch.float16))[0]
    assert torch.isfinite(got).all()
    assert_close_scaled(got.float().cpu(), want, 4 * torch.finfo(torch.float16).eps)


# ---------------------------------------------------------------- DCNv3 / DCNv4 (dcnv3_core, dcnv4_core)
#
# csrc/cuda/dcnv3_cuda.cu against the float64 references of detkit/ops/reference.py (run on the
# CPU) and against the CPU kernels. Offsets are odd multiples of 1/128 and offset_scale a power
# of two, so every sampling position is exact in float32 (and in the low dtypes' float32
# arithmetic) and never an integer: no sample can fall on the other side of a pixel boundary in
# one dtype than in another, where the offset gradient jumps.

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
    offset_std: float = 2.0
    seed: int = 0

    @property
    def id(self) -> str:
        kh, kw = self.kernel
        extra = "".join([f"_s{self.stride[0]}x{self.stride[1]}" if self.stride != (1, 1) else "",
                         f"_d{self.dilation[0]}x{self.dilation[1]}" if self.dilation != (1, 1) else "",
                         "_rc" if self.remove_center else "",
                         f"_os{self.offset_scale:g}" if self.offset_scale != 1.0 else ""])
        return (f"n{self.batch}_{self.height}x{self.width}_g{self.group}d{self.group_channels}"
                f"_k{kh}x{kw}_p{self.pad[0]}x{self.pad[1]}{extra}")

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    def output_size(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        return ((self.height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
                (self.width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)

    def args(self) -> tuple:
        """The arguments after the tensors, in the order of dcnv3_core / dcnv4_core."""
        return (*self.kernel, *self.stride, *self.pad, *self.dilation, self.group, self.group_channels,
                self.offset_scale, self.remove_center)

    def packed_width(self) -> int:
        return (self.group * self.points * 3 + 7) // 8 * 8

    def dcnv3_tensors(self, dtype=torch.float64) -> dict:
        gen = generator(self.seed)
        ho, wo = self.output_size()
        g, k = self.group, self.points
        x = normal((self.batch, self.height, self.width, g * self.group_channels), gen)
        offset = _odd_128ths(normal((self.batch, ho, wo, g * k * 2), gen, std=self.offset_std))
        mask = uniform((self.batch, ho, wo, g * k), gen, -0.5, 1.0)
        return _to({"input": x, "offset": offset, "mask": mask}, dtype=dtype)

    def dcnv4_tensors(self, dtype=torch.float64) -> dict:
        return self.pack(self.dcnv3_tensors(dtype))

    def pack(self, dcnv3_tensors: dict) -> dict:
        """DCNv4's packing of DCNv3's tensors: per group 2K offsets then K weights, padded to a
        multiple of 8 with junk the op must ignore."""
        offset, mask = dcnv3_tensors["offset"], dcnv3_tensors["mask"]
        n, ho, wo, _ = offset.shape
        g, k = self.group, self.points
        used = torch.cat([offset.reshape(n, ho, wo, g, 2 * k), mask.reshape(n, ho, wo, g, k)], -1)
        junk = normal((n, ho, wo, self.packed_width() - 3 * g * k), generator(self.seed + 100), std=50.0)
        return {"input": dcnv3_tensors["input"],
                "offset_mask": torch.cat([used.flatten(-2), junk.to(offset.dtype)], -1)}

    def tensors(self, op: str, dtype=torch.float64) -> dict:
        return self.dcnv3_tensors(dtype) if op == "dcnv3" else self.dcnv4_tensors(dtype)


def _odd_128ths(t: torch.Tensor) -> torch.Tensor:
    """The nearest odd multiple of 1/128 to each value."""
    return (torch.floor(t * 64) * 2 + 1) / 128


def _dcn(op: str, reference: bool = False):
    """fn(**tensors, case=...) running detkit.ops.dcnv3_core / dcnv4_core or their references."""
    def run(case: DcnCase, **tensors):
        if reference:
            from detkit.ops import reference as ref
            fn = ref.dcnv3_core_reference if op == "dcnv3" else ref.dcnv4_core_reference
        else:
            fn = detkit.ops.dcnv3_core if op == "dcnv3" else detkit.ops.dcnv4_core
        return fn(*tensors.values(), *case.args())
    return run


DCN_OPS = ["dcnv3", "dcnv4"]
DCN_CASES = [
    DcnCase(2, 7, 8, 2, 4, seed=40),
    DcnCase(1, 9, 6, 3, 5, stride=(2, 2), seed=41),
    DcnCase(2, 10, 9, 1, 3, pad=(2, 2), dilation=(2, 2), seed=42),
    DcnCase(1, 11, 12, 2, 6, kernel=(5, 5), pad=(2, 2), seed=43),
    DcnCase(2, 6, 7, 4, 2, remove_center=True, seed=44),
    DcnCase(1, 8, 9, 2, 12, kernel=(3, 5), stride=(1, 2), pad=(0, 2), dilation=(2, 1), remove_center=True,
            seed=45),
    DcnCase(2, 1, 9, 2, 3, kernel=(1, 3), pad=(0, 1), seed=46),  # H = 1
    DcnCase(1, 7, 1, 1, 7, kernel=(3, 1), pad=(1, 0), offset_scale=0.5, seed=47),  # W = 1
    DcnCase(1, 5, 6, 2, 24, offset_std=6.0, seed=48),  # most samples far outside the image
    DcnCase(2, 6, 5, 1, 1, kernel=(2, 2), pad=(0, 0), offset_scale=2.0, seed=49),  # even kernel, D = 1
    DcnCase(1, 5, 7, 2, 40, kernel=(2, 3), pad=(1, 1), remove_center=True, seed=50),  # even, remove_center
]
# Every grain of the CUDA kernels: channel vectors of 1..8 elements, segments of 1..32 lanes,
# lanes walking several vectors (D / vector > 32), idle lanes (D / vector not a power of two).
LARGE_DCN_CASES = [
    DcnCase(2, 56, 56, 4, 16, seed=51),  # InternImage-T stage 1 (C 64, G 4)
    DcnCase(2, 14, 14, 16, 16, seed=52),  # stage 3 (C 256, G 16)
    DcnCase(1, 20, 24, 2, 160, seed=53),
    DcnCase(1, 13, 14, 1, 256, stride=(2, 2), seed=54),
    DcnCase(3, 33, 17, 3, 3, kernel=(5, 5), pad=(2, 2), remove_center=True, seed=55),
    DcnCase(2, 23, 19, 5, 24, dilation=(2, 3), pad=(2, 3), seed=56),
]


def _dcn_reference_result(op: str, case: DcnCase, tensors: dict, grad_seed: int, device: str = "cpu"):
    """The float64 reference's output and gradients for the values of `tensors`, on the CPU
    (on the GPU for the large cases: the reference is plain torch ops, so that runs torch's own
    CUDA kernels, and it is 20 s a case on two CPU cores). Returned on the CPU."""
    result = forward_backward(_dcn(op, reference=True), _to(tensors, device, torch.float64), grad_seed=grad_seed,
                              case=case)
    return _cpu_result(result)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("op", DCN_OPS)
@pytest.mark.parametrize("case", DCN_CASES, ids=lambda c: c.id)
def test_dcn_cuda_matches_reference(case: DcnCase, op, dtype, rel):
    tensors = case.tensors(op, dtype)
    gpu = forward_backward(_dcn(op), _to(tensors, CUDA), grad_seed=case.seed + 1, case=case)
    assert gpu[0].device.type == CUDA and gpu[0].dtype == dtype
    assert gpu[0].shape == (case.batch, *case.output_size(), case.group * case.group_channels)
    want = _dcn_reference_result(op, case, tensors, case.seed + 1)
    assert_results_match(_cpu_result(gpu), want, rel)
    if op == "dcnv4":  # the padding of the packed tensor gets no gradient
        pad = gpu[1]["offset_mask"][..., 3 * case.group * case.points:]
        assert torch.equal(pad, torch.zeros_like(pad))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("op", DCN_OPS)
@pytest.mark.parametrize("case", LARGE_DCN_CASES, ids=lambda c: c.id)
def test_dcn_cuda_large_matches_reference(case: DcnCase, op, dtype, rel):
    tensors = case.tensors(op, dtype)
    gpu = forward_backward(_dcn(op), _to(tensors, CUDA), grad_seed=case.seed + 1, case=case)
    assert_results_match(_cpu_result(gpu), _dcn_reference_result(op, case, tensors, case.seed + 1, CUDA), rel)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("op", DCN_OPS)
@pytest.mark.parametrize("case", DCN_CASES[:6] + LARGE_DCN_CASES[:3], ids=lambda c: c.id)
def test_dcn_cuda_matches_cpu(case: DcnCase, op, dtype, rel):
    tensors = case.tensors(op, dtype)
    cpu = forward_backward(_dcn(op), tensors, grad_seed=case.seed + 1, case=case)
    gpu = forward_backward(_dcn(op), _to(tensors, CUDA), grad_seed=case.seed + 1, case=case)
    assert_results_match(_cpu_result(gpu), cpu, rel)


LOW_DCN_CASES = [DCN_CASES[0], DCN_CASES[3], DCN_CASES[5], DCN_CASES[8],
                 DcnCase(2, 12, 10, 4, 16, seed=57),  # 8-element vectors, 2 lanes
                 DcnCase(1, 9, 11, 2, 64, stride=(2, 2), remove_center=True, seed=58)]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", DCN_OPS)
@pytest.mark.parametrize("case", LOW_DCN_CASES, ids=lambda c: c.id)
def test_dcn_low_precision_matches_float32(case: DcnCase, op, dtype):
    """Inputs rounded to the low dtype; the float64 reference on the same rounded values is what
    the CUDA kernels (float32 accumulation, one rounding of each result) reproduce to a few units
    of the dtype's epsilon, relative to the scale of each result."""
    low = case.tensors(op, dtype)
    ho, wo = case.output_size()
    grad_output = normal((case.batch, ho, wo, case.group * case.group_channels), generator(case.seed + 2))
    grad_output = grad_output.to(dtype)
    want = _run_with_grad(_dcn(op, reference=True), _to(low, dtype=torch.float64), grad_output.double(),
                          case=case)
    gpu = _run_with_grad(_dcn(op), _to(low, CUDA), grad_output.to(CUDA), case=case)
    assert gpu[0].dtype == dtype and all(g.dtype == dtype for g in gpu[1].values())
    got = (gpu[0].double().cpu(), {k: g.double().cpu() for k, g in gpu[1].items()})
    assert_results_match(got, want, _low_precision_tol(dtype))


@pytest.mark.parametrize("op", DCN_OPS)
def test_dcn_cuda_gradcheck(op):
    for case in (DcnCase(1, 4, 5, 2, 3, seed=60),
                 DcnCase(1, 5, 4, 1, 2, kernel=(3, 2), stride=(2, 1), dilation=(1, 2), pad=(1, 1),
                         remove_center=True, offset_scale=0.5, seed=61)):
        tensors = {k: v.to(CUDA).requires_grad_(True) for k, v in case.tensors(op).items()}
        fn = _dcn(op)
        assert torch.autograd.gradcheck(lambda *t: fn(case, **dict(zip(tensors, t))), tuple(tensors.values()),
                                        nondet_tol=1e-10)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float16, 4 * torch.finfo(torch.float16).eps)],
                         ids=["f64", "f16"])
@pytest.mark.parametrize("op", DCN_OPS)
def test_dcn_cuda_misaligned_and_strided_inputs(op, dtype, rel):
    """Tensors one element off the vector alignment (the kernels fall back to narrower channel
    vectors) and non-contiguous tensors give the result of contiguous aligned ones."""
    case = DcnCase(2, 9, 8, 2, 16, seed=62)
    tensors = _to(case.tensors(op, dtype), CUDA)

    def misaligned(t):
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.flatten()
        return flat[1:].view(t.shape)

    def strided(t):
        return t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)

    want = forward_backward(_dcn(op), tensors, grad_seed=63, case=case)
    for layout in (misaligned, strided):
        got = forward_backward(_dcn(op), {k: layout(v) for k, v in tensors.items()}, grad_seed=63, case=case)
        assert_results_match(got, want, rel)


def test_dcnv4_equals_dcnv3_on_cuda():
    case = DcnCase(2, 8, 7, 3, 8, remove_center=True, seed=64)
    v3 = forward_backward(_dcn("dcnv3"), _to(case.dcnv3_tensors(), CUDA), grad_seed=65, case=case)
    v4 = forward_backward(_dcn("dcnv4"), _to(case.dcnv4_tensors(), CUDA), grad_seed=65, case=case)
    assert torch.equal(v4[0], v3[0])
    g, k = case.group, case.points
    packed = v4[1]["offset_mask"][..., :3 * g * k].unflatten(-1, (g, 3 * k))
    assert_close_scaled(v4[1]["input"], v3[1]["input"], 1e-12, "grad of input")
    assert_close_scaled(packed[..., :2 * k].flatten(-2), v3[1]["offset"], 1e-12, "grad of offset")
    assert_close_scaled(packed[..., 2 * k:].flatten(-2), v3[1]["mask"], 1e-12, "grad of mask")


@pytest.mark.parametrize("op", DCN_OPS)
def test_dcn_cuda_empty_batch(op):
    case = DcnCase(0, 6, 5, 2, 4, seed=66)
    t = {k: v.to(CUDA).requires_grad_(True) for k, v in case.tensors(op).items()}
    out = _dcn(op)(case, **t)
    assert out.shape == (0, 6, 5, 8)
    out.sum().backward()
    assert all(v.grad is not None and v.grad.shape == v.shape for v in t.values())


@pytest.mark.parametrize("values", [[float("nan")], [float("inf"), float("-inf")], [1e6, -1e6]],
                         ids=["nan", "inf", "huge"])
@pytest.mark.parametrize("op", DCN_OPS)
def test_dcn_cuda_non_finite_offsets_match_cpu(op, values):
    """A non-finite or huge offset puts its sample outside the image: 0, with zero gradients."""
    case = DcnCase(2, 6, 7, 2, 4, seed=67)
    tensors = case.dcnv3_tensors()
    offset = tensors["offset"].flatten().clone()
    picks = torch.randperm(offset.numel(), generator=generator(68))[:offset.numel() // 5]
    offset[picks] = torch.tensor(values, dtype=offset.dtype).repeat(len(picks))[:len(picks)]
    tensors["offset"] = offset.view(tensors["offset"].shape)
    if op == "dcnv4":
        tensors = case.pack(tensors)
    cpu = forward_backward(_dcn(op), tensors, grad_seed=69, case=case)
    gpu = _cpu_result(forward_backward(_dcn(op), _to(tensors, CUDA), grad_seed=69, case=case))
    assert torch.isfinite(gpu[0]).all()
    assert all(torch.isfinite(g).all() for g in gpu[1].values())
    assert_results_match(gpu, cpu, 1e-10)


def _dcn_bad_calls():
    """(id, op, tensors, args) of calls the kernels refuse; args in the order of case.args()."""
    case = DcnCase(1, 6, 7, 2, 4, seed=70)
    v3, v4 = case.dcnv3_tensors(), case.dcnv4_tensors()

    def args(**changes):  # case.args() with some entries replaced, by position
        return tuple(changes.get(f"a{i}", a) for i, a in enumerate(case.args()))

    rc1x1 = DcnCase(1, 6, 7, 2, 4, kernel=(1, 1), pad=(0, 0), remove_center=True)
    return [
        ("channels", "dcnv3", {**v3, "input": v3["input"][..., :7]}, args()),
        ("offset_width", "dcnv3", {**v3, "offset": v3["offset"][..., :-2]}, args()),
        ("mask_shape", "dcnv3", {**v3, "mask": v3["mask"][:, :-1]}, args()),
        ("unpadded_packing", "dcnv4", {**v4, "offset_mask": v4["offset_mask"][..., :3 * 2 * 9]}, args()),
        ("stride_0", "dcnv3", v3, args(a2=0)),
        ("too_small", "dcnv4", {**v4, "input": v4["input"][:, :1, :1]}, args(a4=0, a5=0)),
        ("remove_center_1x1", "dcnv3", rc1x1.dcnv3_tensors(), rc1x1.args()),
        ("group_channels", "dcnv4", v4, args(a9=3)),
    ]


@pytest.mark.parametrize("bad", _dcn_bad_calls(), ids=lambda b: b[0])
def test_dcn_cuda_refuses_what_the_cpu_refuses(bad):
    """Through torch.ops (no Python checks) the CUDA kernels refuse what the CPU kernels refuse,
    with the same message; through detkit.ops the Python checks answer alike on both devices."""
    _, op, tensors, args = bad
    kernel_size, stride, padding, dilation = [list(args[i:i + 2]) for i in (0, 2, 4, 6)]
    direct = getattr(torch.ops.detkit, f"{op}_core")
    public = getattr(detkit.ops, f"{op}_core")

    def refusal(call, device):
        with pytest.raises((RuntimeError, ValueError)) as info:
            call(*_to(tensors, device).values())
        return info.type, str(info.value).splitlines()[0]

    def via_ops(*t):
        return direct(*t, kernel_size, stride, padding, dilation, *args[8:])

    def via_python(*t):
        return public(*t, *args)

    assert refusal(via_ops, "cpu") == refusal(via_ops, CUDA)
    assert refusal(via_python, "cpu") == refusal(via_python, CUDA)


OPCHECK_DCN_CASES = [DcnCase(2, 5, 6, 2, 4, seed=71),
                     DcnCase(1, 6, 5, 3, 3, kernel=(3, 2), stride=(2, 1), remove_center=True, seed=72)]


def _dcn_op_args(case: DcnCase, op: str, dtype=torch.float64, requires_grad=True) -> tuple:
    tensors = [t.to(CUDA).requires_grad_(requires_grad) for t in case.tensors(op, dtype).values()]
    kh, kw, sh, sw, ph, pw, dh, dw, *rest = case.args()
    return (*tensors, [kh, kw], [sh, sw], [ph, pw], [dh, dw], *rest)


@pytest.mark.parametrize("op", DCN_OPS)
@pytest.mark.parametrize("case", OPCHECK_DCN_CASES, ids=lambda c: c.id)
def test_dcn_cuda_opcheck(case: DcnCase, op):
    """Schema, fake kernels and autograd registration hold for the CUDA kernels too; the backward
    ops' fake kernels predict the CUDA results' shapes and strides (inductor asserts them)."""
    torch.library.opcheck(getattr(torch.ops.detkit, f"{op}_core").default, _dcn_op_args(case, op))
    args = _dcn_op_args(case, op, torch.float32, requires_grad=False)
    ho, wo = case.output_size()
    grad_output = normal((case.batch, ho, wo, case.group * case.group_channels), generator(case.seed + 1),
                         dtype=torch.float32).to(CUDA)
    torch.library.opcheck(getattr(torch.ops.detkit, f"{op}_core_backward").default, (grad_output, *args),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_dcn_cuda_torch_compile_fullgraph():
    torch._dynamo.reset()
    case = DcnCase(2, 9, 10, 4, 8, seed=73)
    v3, v4 = _to(case.dcnv3_tensors(torch.float32), CUDA), _to(case.dcnv4_tensors(torch.float32), CUDA)

    def both(input, offset, mask, offset_mask):
        return (detkit.ops.dcnv3_core(input, offset, mask, *case.args()).square().sum()
                + detkit.ops.dcnv4_core(input, offset_mask, *case.args()).abs().sum())

    tensors = {**v3, "offset_mask": v4["offset_mask"]}
    compiled = forward_backward(torch.compile(both, fullgraph=True), tensors, grad_seed=74)
    eager = forward_backward(both, tensors, grad_seed=74)
    assert_results_match(compiled, eager, 1e-5)
    torch._dynamo.reset()
