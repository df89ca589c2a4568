"""detkit deform_roi_pool exported as standard ops (RoiAlign over shifted bins) equals the kernel."""
from __future__ import annotations

import onnxruntime  # noqa: F401  (a test dependency, pyproject.toml [test]: never skipped)
import pytest
import torch

from detkit.ops import deform_roi_pool
from tests.export.onnx_helpers import export_module, run_onnx
from tests.helpers import generator, normal, random_rois, uniform

OUTPUT = (5, 4)
STANDARD_POOL_OPS = {"RoiAlign", "Slice", "Squeeze", "Cast", "Constant", "Mul", "Add", "Sub", "Div", "Reshape",
                     "Concat", "Unsqueeze", "Expand", "Transpose"}


class _Pool(torch.nn.Module):
    def __init__(self, with_offset: bool, with_mask: bool, scale: float, ratio: int, gamma: float) -> None:
        super().__init__()
        self.args = with_offset, with_mask, scale, ratio, gamma

    def forward(self, x, rois, offset, mask):
        with_offset, with_mask, scale, ratio, gamma = self.args
        return deform_roi_pool(x, rois, offset if with_offset else None, mask if with_mask else None, OUTPUT,
                               scale, ratio, gamma)


def _inputs(dtype, seed=0, count=48, edges=True):
    gen = generator(seed)
    batch, channels, height, width, stride = 2, 6, 13, 17, 4
    x = normal((batch, channels, height, width), gen, dtype=dtype)
    # Centres over [-0.2, 1.2] of the image: many RoIs cross or lie past the border.
    rois = random_rois(gen, count, batch, height * stride, width * stride, 1.0, 60.0, dtype=dtype)
    edge = torch.tensor([[0, 0.0, 0.0, 20.0, 20.0], [1, 40.0, 30.0, width * stride, height * stride],
                         [1, -8.0, -8.0, 6.0, 6.0], [0, width * stride - 3.0, 0.0, width * stride + 9.0, 7.0]],
                        dtype=dtype)
    if edges:
        rois = torch.cat([rois, edge])
    offset = normal((rois.shape[0], 2, *OUTPUT), gen, std=1.5, dtype=dtype)  # shifts up to ~ half the RoI
    mask = uniform((rois.shape[0], 1, *OUTPUT), gen, 0.0, 1.0, dtype=dtype)
    return {"x": x, "rois": rois, "offset": offset, "mask": mask}, 1.0 / stride


@pytest.mark.parametrize("ratio", [2, 0], ids=["ratio2", "adaptive"])
@pytest.mark.parametrize("with_offset,with_mask", [(False, False), (True, False), (True, True), (False, True)],
                         ids=["align", "deform", "mdeform", "mask-only"])
def test_deform_roi_pool_equals_kernel(with_offset, with_mask, ratio):
    # Adaptive sampling (ratio 0) counts ceil(bin size) samples; the RoiAlign of one shifted bin
    # may count one more where the bin size is an exact integer (documented in detkit.ops.onnx), as
    # for the hand-made border RoIs of integer sizes: those run with a fixed ratio only.
    edges = ratio > 0
    tensors, scale = _inputs(torch.float32, seed=ratio, edges=edges)
    pool = _Pool(with_offset, with_mask, scale, ratio, 0.1)
    expected = pool(**tensors)
    assert float(expected.abs().max()) > 0
    dynamic = {"rois": [0], "offset": [0], "mask": [0]}
    model = export_module(pool, tuple(tensors.values()), list(tensors), dynamic_axes=dynamic)
    assert {n.op_type for n in model.graph.node} <= STANDARD_POOL_OPS
    (actual,) = run_onnx(model, tensors)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # The RoI count is dynamic: other RoIs, and none at all, run through the same file.
    other, _ = _inputs(torch.float32, seed=7, count=9, edges=edges)
    other["x"] = tensors["x"]
    (actual,) = run_onnx(model, other)
    torch.testing.assert_close(torch.from_numpy(actual), pool(**other), rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())
    empty = {k: (v[:0] if k != "x" else v) for k, v in tensors.items()}
    (actual,) = run_onnx(model, empty)
    assert actual.shape == (0, 6, *OUTPUT)


def test_float64_is_the_kernel_to_rounding():
    """In float64 the composition is the kernel's arithmetic up to the rounding of the bin corners."""
    tensors, scale = _inputs(torch.float64, seed=3)
    pool = _Pool(True, True, scale, 2, 0.1)
    expected = pool(**tensors)
    model = export_module(pool, tuple(tensors.values()), list(tensors))
    (actual,) = run_onnx(model, tensors)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-10, atol=1e-10)


def test_large_offsets_leave_the_feature_map():
    """Bins shifted wholly off the map read zero, as in the kernel."""
    tensors, scale = _inputs(torch.float32, seed=5)
    tensors["offset"] = tensors["offset"] * 20
    pool = _Pool(True, False, scale, 2, 0.1)
    expected = pool(**tensors)
    assert int((expected == 0).sum()) > 0
    model = export_module(pool, tuple(tensors.values()), list(tensors))
    (actual,) = run_onnx(model, tensors)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
