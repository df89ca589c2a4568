"""The gather form of the RoI poolers (opset 22 files) is the kernels' arithmetic, in PyTorch."""
from __future__ import annotations

import pytest
import torch
import torchvision

from detkit.modeling.heads.poolers import GatherRoIPooler, RoIPooler
from detkit.modeling.heads.roi_align_gather import roi_align_gather
from detkit.ops import deform_roi_pool
from tests.helpers import generator, normal, random_rois, uniform


def _inputs(dtype):
    gen = generator(0)
    x = normal((2, 6, 13, 17), gen, dtype=dtype)
    rois = random_rois(gen, 60, 2, 52, 68, 1.0, 60.0, dtype=dtype)   # many cross the border
    rois = torch.cat([rois, torch.tensor([[0, 0, 0, 20, 20], [1, 40, 30, 68, 52.0]], dtype=dtype)])
    offset = normal((rois.shape[0], 2, 5, 4), gen, std=1.5, dtype=dtype)
    mask = uniform((rois.shape[0], 1, 5, 4), gen, 0.0, 1.0, dtype=dtype)
    return x, rois, offset, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_equals_kernels(dtype):
    x, rois, offset, mask = _inputs(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(roi_align_gather(x, rois, (5, 4), 0.25, 2, True, offset, mask, 0.1),
                               deform_roi_pool(x, rois, offset, mask, (5, 4), 0.25, 2, 0.1), **tol)
    torch.testing.assert_close(roi_align_gather(x, rois, (5, 4), 0.25, 2, True),
                               deform_roi_pool(x, rois, None, None, (5, 4), 0.25, 2), **tol)
    torch.testing.assert_close(roi_align_gather(x, rois, (5, 4), 0.25, 3, aligned=False),
                               torchvision.ops.roi_align(x, rois, (5, 4), 0.25, 3, aligned=False), **tol)


@pytest.mark.parametrize("kind", ["align", "alignv2", "deform", "mdeform"])
def test_gather_pooler_equals_pooler(kind):
    torch.manual_seed(0)
    pooler = RoIPooler(kind, ["p2", "p3", "p4", "p5"], [4, 8, 16, 32], 6, output_size=5, sampling_ratio=2,
                       hidden_dim=16).eval()
    if pooler.deform_pool is not None:
        torch.nn.init.normal_(pooler.deform_pool.offset_branch[-1].weight, std=0.1)
    gen = generator(1)
    features = {f"p{k}": normal((1, 6, 256 // 2 ** k, 320 // 2 ** k), gen, dtype=torch.float32) for k in (2, 3, 4, 5)}
    boxes = random_rois(gen, 80, 1, 256, 320, 4.0, 250.0, dtype=torch.float32)[:, 1:]
    with torch.no_grad():
        expected = pooler(features, [boxes])
        actual = GatherRoIPooler(pooler)(features, [boxes])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_gather_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="positive sampling_ratio"):
        roi_align_gather(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 2), 1.0, 0)
    with pytest.raises(ValueError, match="'pool' kind"):
        GatherRoIPooler(RoIPooler("pool", ["p2"], [4], 4))
