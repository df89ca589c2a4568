"""The exported resize gives eager PyTorch's resized image, size to the pixel, for any input size."""
from __future__ import annotations

import onnxruntime  # noqa: F401  (a test dependency, pyproject.toml [test]: never skipped)
import torch
from torchvision.models.detection.transform import _resize_image_and_masks

from detkit.modeling.transform import resize_like_eager
from tests.export.onnx_helpers import export_module, run_onnx
from tests.helpers import generator


class _Resize(torch.nn.Module):
    def forward(self, x):
        return resize_like_eager(x[0], 192, 320)


def test_resize_matches_eager_for_many_sizes():
    model = export_module(_Resize(), (torch.rand(1, 3, 192, 256),), ["x"], dynamic_axes={"x": [2, 3]})
    gen = generator(0)
    # The sizes torchvision's float32 tracing path gets one pixel short, then random ones.
    sizes = [(227, 227), (147, 211), (213, 183), (200, 260), (214, 228)]
    sizes += [tuple(int(v) for v in torch.randint(40, 700, (2,), generator=gen)) for _ in range(30)]
    for height, width in sizes:
        x = torch.rand((1, 3, height, width), generator=gen)
        expected = _resize_image_and_masks(x[0], 192, 320)[0]    # what GeneralizedRCNNTransform does
        torch.testing.assert_close(resize_like_eager(x[0], 192, 320), expected, rtol=0, atol=0)
        (actual,) = run_onnx(model, {"x": x})
        assert actual.shape == tuple(expected.shape), (height, width)
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-4)
