"""Inputs that used to kill the process or pool the wrong image.

- deform_roi_pool on an empty feature map (H or W = 0): the CPU sampling read (and, in the
  backward, wrote) corner index -1. Every sample of an empty map is outside it, so the result
  is zeros and every gradient is zero, on every device.
- deform_conv2d's CPU backward on a zero-width input with padding divided by width * channels.
- RoI batch indices with a float16 / bfloat16 input: rois had to share the input's dtype, in
  which indices above 2048 / 256 round to another image's. rois now keep their own dtype
  (read in the input's accumulation type); low-precision rois are refused for batches whose
  indices they cannot hold.
"""
from __future__ import annotations

import pytest
import torch

import detkit.ops
from detkit.modeling.heads.poolers import RoIPooler
from detkit.ops import deform_conv2d, deform_roi_pool
from detkit.ops.reference import deform_roi_pool_reference
from tests.helpers import assert_close_scaled, generator, normal, random_rois, uniform

def needs_cuda(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="no CUDA device available")(fn))

POOL_KINDS = ["plain", "deformable", "modulated"]
EMPTY_MAPS = [(0, 6), (5, 0), (0, 0)]


def _pool_tensors(kind: str, batch: int, channels: int, height: int, width: int, num_rois: int,
                  pooled=(2, 3), seed: int = 0, device="cpu", dtype=torch.float64) -> dict:
    gen = generator(seed)
    ph, pw = pooled
    return {
        "input": normal((batch, channels, height, width), gen, dtype=dtype).to(device),
        "rois": random_rois(gen, num_rois, batch, 16.0, 16.0, 2.0, 12.0, dtype=dtype).to(device),
        "offset": (uniform((num_rois, 2, ph, pw), gen, -1.0, 1.0, dtype=dtype).to(device)
                   if kind != "plain" else None),
        "mask": (uniform((num_rois, 1, ph, pw), gen, 0.1, 1.0, dtype=dtype).to(device)
                 if kind == "modulated" else None),
    }


def _check_empty_map_pool(kind: str, height: int, width: int, device: str) -> None:
    t = _pool_tensors(kind, 2, 3, height, width, 4, seed=height * 10 + width, device=device)
    leaves = {k: (v.requires_grad_(True) if v is not None and k != "rois" else v) for k, v in t.items()}
    out = deform_roi_pool(leaves["input"], leaves["rois"], leaves["offset"], leaves["mask"],
                          output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2)
    assert out.shape == (4, 3, 2, 3)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.ones_like(out))
    assert leaves["input"].grad.shape == (2, 3, height, width)
    for name in ("offset", "mask"):
        if leaves[name] is not None:
            grad = leaves[name].grad
            assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("height,width", EMPTY_MAPS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", POOL_KINDS)
def test_deform_roi_pool_empty_feature_map_gives_zeros(kind, height, width):
    _check_empty_map_pool(kind, height, width, "cpu")


@pytest.mark.parametrize("height,width", EMPTY_MAPS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", POOL_KINDS)
@needs_cuda
def test_cuda_deform_roi_pool_empty_feature_map_gives_zeros(kind, height, width):
    _check_empty_map_pool(kind, height, width, "cuda")


@pytest.mark.parametrize("threads", [1, 2])
def test_deform_roi_pool_empty_map_with_parallel_work(threads):
    """Enough RoIs and channels for the parallel loops (tests/ops/test_large_sizes.py) on an
    empty map: no thread reads or writes outside it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = _pool_tensors("modulated", 2, 256, 7, 0, 40, pooled=(3, 3), seed=5)
        leaves = {k: (v.requires_grad_(True) if k != "rois" else v) for k, v in t.items()}
        out = deform_roi_pool(leaves["input"], leaves["rois"], leaves["offset"], leaves["mask"], 3, 0.5, 2)
        out.backward(torch.ones_like(out))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(leaves["offset"].grad, torch.zeros_like(leaves["offset"]))
    assert torch.equal(leaves["mask"].grad, torch.zeros_like(leaves["mask"]))


# ---------------------------------------------------------------- zero-size deform_conv2d

ZERO_CONV = [  # height, width, kernel, padding, stride, groups, offset groups
    (5, 0, (1, 1), 1, 1, 2, 2),
    (0, 4, (1, 3), (1, 1), (2, 1), 1, 3),
    (0, 0, (3, 3), 2, 1, 3, 1),
    (9, 0, (1, 1), (0, 2), (1, 2), 3, 3),  # more rows than a crop grain would give one thread
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("height,width,kernel,padding,stride,groups,offset_groups", ZERO_CONV)
def test_deform_conv2d_zero_size_input_forward_and_backward(height, width, kernel, padding, stride,
                                                            groups, offset_groups, threads):
    """A zero-height or zero-width input with padding still has output positions; they only
    see padding, so the output is the bias and only the bias gets a gradient. (The CPU
    backward died of SIGFPE here.)"""
    gen = generator(height * 7 + width)
    batch, channels, out_channels = 2, 6, 3 * groups
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ho = (height + 2 * ph - kernel[0]) // sh + 1
    wo = (width + 2 * pw - kernel[1]) // sw + 1
    taps = offset_groups * kernel[0] * kernel[1]
    tensors = {
        "input": normal((batch, channels, height, width), gen),
        "offset": uniform((batch, 2 * taps, ho, wo), gen, -2.0, 2.0),
        "weight": normal((out_channels, channels // groups, *kernel), gen),
        "bias": normal((out_channels,), gen),
        "mask": uniform((batch, taps, ho, wo), gen, 0.0, 1.0),
    }
    leaves = {k: v.requires_grad_(True) for k, v in tensors.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"],
                            stride, padding, 1, leaves["mask"])
        grad_out = normal(out.shape, generator(1))
        out.backward(grad_out)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (batch, out_channels, ho, wo) and ho > 0 and wo > 0
    torch.testing.assert_close(out, tensors["bias"].view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)
    assert leaves["input"].grad.shape == (batch, channels, height, width)
    for name in ("offset", "weight", "mask"):
        assert torch.equal(leaves[name].grad, torch.zeros_like(tensors[name])), name
    torch.testing.assert_close(leaves["bias"].grad, grad_out.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- RoI dtypes and batch indices

def _image_by_image(input, rois, **kw) -> torch.Tensor:
    """Each RoI pooled from its own image alone (index 0 of a one-image batch)."""
    rows = []
    for roi in rois:
        index = int(roi[0])
        single = torch.cat([roi.new_zeros(1), roi[1:]]).unsqueeze(0)
        rows.append(deform_roi_pool(input[index:index + 1], single, **kw))
    return torch.cat(rows)


@pytest.mark.parametrize("input_dtype,rois_dtype", [
    (torch.float64, torch.float32), (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16)], ids=str)
def test_rois_keep_their_own_dtype(input_dtype, rois_dtype):
    """rois need not share the input's dtype: the result is that of rois converted first
    (their values are exact in both dtypes here)."""
    gen = generator(3)
    x = normal((3, 4, 9, 11), gen, dtype=input_dtype)
    rois = torch.tensor([[0, 1.0, 2.0, 14.0, 12.0], [2, -3.0, 4.0, 8.0, 20.0], [1, 5.5, 0.25, 20.0, 6.0]])
    offset = uniform((3, 2, 2, 2), gen, -1.0, 1.0, dtype=input_dtype)
    kw = {"output_size": 2, "spatial_scale": 0.5, "sampling_ratio": 2}
    got = deform_roi_pool(x, rois.to(rois_dtype), offset, **kw)
    want = deform_roi_pool(x, rois.to(input_dtype), offset, **kw)
    assert got.dtype == input_dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_indices_above_low_precision_range_pool_their_own_image():
    """Images 255..299 of a 300-image batch: bfloat16 would round 257 to 256 and 299 to 300."""
    gen = generator(4)
    x = normal((300, 2, 5, 6), gen, dtype=torch.float32)
    rois = torch.tensor([[i, 1.0, 1.0, 9.0, 8.0] for i in (255, 256, 257, 258, 299, 0)])
    assert (rois[:, 0].to(torch.bfloat16).float() != rois[:, 0]).any()
    out = deform_roi_pool(x, rois, output_size=2, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(out, _image_by_image(x, rois, output_size=2, spatial_scale=0.5,
                                                    sampling_ratio=2), rtol=0, atol=0)
    # Image 257 really differs from image 256, so a rounded index would show.
    assert not torch.equal(out[1], out[2])


@pytest.mark.parametrize("rois_dtype,batch,limit", [(torch.bfloat16, 258, 256), (torch.float16, 2050, 2048)],
                         ids=["bfloat16", "float16"])
def test_low_precision_rois_refused_when_indices_cannot_be_exact(rois_dtype, batch, limit):
    x = torch.zeros(batch, 1, 2, 2)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=rois_dtype)
    match = rf"rois of dtype .* hold batch indices exactly only up to {limit}, but the input has {batch} images"
    with pytest.raises(RuntimeError, match=match):
        deform_roi_pool(x, rois, output_size=1)
    with pytest.raises(RuntimeError, match=match):  # the kernel checks it: direct calls too
        torch.ops.detkit.deform_roi_pool(x, rois, None, None, 1, 1, 1.0, 0, 0.1)
    # One image fewer: every index is exact in that dtype, so they are accepted.
    ok = deform_roi_pool(x[: batch - 1], rois, output_size=1)
    assert ok.shape == (1, 1, 1, 1)


def test_rois_on_another_device_or_not_floating_are_refused():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match=r"rois must be a floating-point Tensor"):
        deform_roi_pool(x, torch.zeros(1, 5, dtype=torch.int64), output_size=1)
    with pytest.raises(RuntimeError, match=r"rois must be a floating-point tensor"):
        torch.ops.detkit.deform_roi_pool(x, torch.zeros(1, 5, dtype=torch.int64), None, None, 1, 1, 1.0, 0, 0.1)
    with pytest.raises(ValueError, match=r"rois is on meta but input is on cpu"):
        deform_roi_pool(x, torch.zeros(1, 5, device="meta"), output_size=1)


def test_float32_rois_under_cpu_autocast_keep_indices():
    gen = generator(6)
    x = normal((300, 2, 5, 6), gen, dtype=torch.float32)
    rois = torch.tensor([[257, 1.0, 1.0, 9.0, 8.0], [299, 0.0, 2.0, 6.0, 9.0]])
    want = _image_by_image(x, rois, output_size=2, spatial_scale=0.5, sampling_ratio=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = deform_roi_pool(x, rois, output_size=2, spatial_scale=0.5, sampling_ratio=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind,want", [("align", torch.bfloat16), ("pool", torch.bfloat16),
                                       ("alignv2", torch.float32), ("mdeform", torch.float32)])
def test_pooler_hands_detkit_ops_float32_rois_for_low_precision_features(kind, want):
    """torchvision's ops need rois in the feature's dtype; detkit's keep float32 (exact indices)."""
    pooler = RoIPooler(kind, ["p2"], [4], in_channels=2, output_size=2, hidden_dim=8)
    feature = torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16)
    rois = torch.tensor([[257.0, 0, 0, 4, 4]])
    assert pooler._cast(feature, rois).dtype == want
    assert pooler._cast(feature.double(), rois).dtype == torch.float64


@pytest.mark.parametrize("dtype,batch", [(torch.bfloat16, 300), (torch.float16, 2100)], ids=str)
@needs_cuda
def test_cuda_low_precision_input_with_float32_rois_pools_the_right_image(dtype, batch):
    """A float16 / bfloat16 input with float32 rois: every RoI pools its own image, also past
    the index range of the input's dtype, forward and backward."""
    if not detkit.ops.cuda_kernels_built():
        pytest.fail("a CUDA device is visible but detkit was built without its CUDA kernels")
    gen = generator(7)
    x = normal((batch, 2, 5, 6), gen).to("cuda", dtype)
    indices = [255, 256, 257, 299, batch - 1] + ([2047, 2048, 2049] if batch > 2048 else [])
    rois = torch.tensor([[i, 1.0, 1.0, 9.0, 8.0] for i in indices], device="cuda")
    offset = uniform((len(indices), 2, 2, 2), gen, -1.0, 1.0).to("cuda", dtype)
    kw = {"output_size": 2, "spatial_scale": 0.5, "sampling_ratio": 2}
    leaf = x.clone().requires_grad_(True)
    out = deform_roi_pool(leaf, rois, offset, **kw)
    want = torch.cat([deform_roi_pool(x[i:i + 1], torch.cat([rois.new_zeros(1), r[1:]]).unsqueeze(0),
                                      offset[k:k + 1], **kw) for k, (i, r) in enumerate(zip(indices, rois))])
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()
    touched = (leaf.grad.float().abs().flatten(1).sum(1) > 0).nonzero().flatten().tolist()
    assert touched == sorted(indices)


def test_reference_agrees_on_exact_indices_with_mixed_dtypes():
    """The float64 reference with float32 rois equals the kernel (a mixed-dtype call is defined
    by the rois' values, not their dtype)."""
    gen = generator(8)
    x = normal((3, 3, 6, 7), gen)
    rois = random_rois(gen, 5, 3, 12.0, 14.0, 2.0, 10.0, dtype=torch.float32)
    got = deform_roi_pool(x, rois, output_size=2, spatial_scale=0.5, sampling_ratio=2)
    want = deform_roi_pool_reference(x, rois.double(), output_size=2, spatial_scale=0.5, sampling_ratio=2)
    assert_close_scaled(got, want, 1e-10)


@pytest.mark.parametrize("input_shape, weight_shape, offset_channels, message", [
    ((1, 0, 5, 5), (4, 1, 3, 3), 18, r"input must have at least one channel, got shape \[1, 0, 5, 5\]"),
    ((1, 4, 5, 5), (4, 4, 0, 0), 18, r"weight's kernel must not be empty, got weight \[4, 4, 0, 0\]"),
    ((1, 4, 5, 5), (4, 4, 0, 3), 18, r"weight's kernel must not be empty"),
])
def test_deform_conv2d_op_refuses_no_channels_and_empty_kernels(input_shape, weight_shape, offset_channels, message):
    """Called directly (past the Python checks), the CPU kernel divided by the conv groups and
    by the kernel's taps, both zero here, and died of SIGFPE; it now refuses, as CUDA's does."""
    x, w = torch.randn(input_shape), torch.randn(weight_shape)
    offset = torch.zeros(input_shape[0], offset_channels, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.detkit.deform_conv2d(x, offset, w, None, None, [1, 1], [1, 1], [1, 1])
