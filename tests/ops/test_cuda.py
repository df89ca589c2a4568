"""CUDA kernels against the CPU kernels (which the other test files check against torchvision
and the reference), low precision, autocast and torch.compile on CUDA.

Skipped unless a CUDA device is present; with one, a build without the CUDA kernels fails.
"""
from __future__ import annotations

import contextlib
import copy

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
