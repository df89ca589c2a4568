"""detkit deform_conv2d exported alone as ONNX DeformConv, run in onnxruntime, equals the op."""
from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort
import onnxscript  # noqa: F401  (test dependencies, pyproject.toml [test]: never skipped)
import pytest
import torch

from detkit.ops import DeformConv2d, deform_conv2d
from detkit.ops.onnx import custom_translation_table
from tests.export.onnx_helpers import export_module, run_onnx
from tests.helpers import generator, normal, uniform

TOL = 1e-5  # issue: f32 to 1e-5


@dataclass(frozen=True)
class ConvCase:
    channels: int
    out_channels: int
    kernel: tuple[int, int]
    groups: int
    offset_groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    size: tuple[int, int] = (11, 13)
    batch: int = 2


CASES = [
    ConvCase(4, 6, (3, 3), 1, 1, (1, 1), (1, 1), (1, 1)),
    ConvCase(8, 6, (3, 3), 2, 1, (2, 1), (1, 2), (1, 2)),      # conv groups, unequal pairs
    ConvCase(8, 8, (3, 2), 1, 4, (1, 2), (2, 0), (2, 1)),      # offset groups, non-square kernel
    ConvCase(6, 9, (1, 3), 3, 3, (2, 2), (0, 1), (1, 1)),      # both groups
    ConvCase(3, 5, (3, 3), 1, 1, (1, 1), (2, 2), (2, 2), size=(1, 7), batch=1),  # a 1-row input
]


class _Op(torch.nn.Module):
    """The bare op, its tensors as graph inputs."""

    def __init__(self, case: ConvCase, with_mask: bool, with_bias: bool) -> None:
        super().__init__()
        self.case, self.with_mask, self.with_bias = case, with_mask, with_bias

    def forward(self, x, offset, weight, mask, bias):
        c = self.case
        return deform_conv2d(x, offset, weight, bias if self.with_bias else None, c.stride, c.padding,
                             c.dilation, mask if self.with_mask else None)


def _tensors(case: ConvCase, seed: int) -> dict[str, torch.Tensor]:
    gen = generator(seed)
    kh, kw = case.kernel
    height, width = case.size
    out_h = (height + 2 * case.padding[0] - (case.dilation[0] * (kh - 1) + 1)) // case.stride[0] + 1
    out_w = (width + 2 * case.padding[1] - (case.dilation[1] * (kw - 1) + 1)) // case.stride[1] + 1
    taps = case.offset_groups * kh * kw
    f32 = torch.float32
    return {
        "x": normal((case.batch, case.channels, height, width), gen, dtype=f32),
        # offsets of a few pixels: many taps land between pixels and some outside the image
        "offset": normal((case.batch, 2 * taps, out_h, out_w), gen, std=2.0, dtype=f32),
        "weight": normal((case.out_channels, case.channels // case.groups, kh, kw), gen, dtype=f32),
        "mask": uniform((case.batch, taps, out_h, out_w), gen, 0.0, 1.0, dtype=f32),
        "bias": normal((case.out_channels,), gen, dtype=f32),
    }


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"g{c.groups}og{c.offset_groups}s{c.stride}p{c.padding}d{c.dilation}")
def test_deform_conv2d_equals_onnxruntime(case, with_mask, with_bias):
    tensors = _tensors(case, seed=10 * CASES.index(case) + 2 * with_mask + with_bias)
    op = _Op(case, with_mask, with_bias)
    expected = op(**tensors)
    model = export_module(op, tuple(tensors.values()), list(tensors))
    nodes = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == 1
    attrs = {a.name: (list(a.ints) if a.ints else a.i) for a in nodes[0].attribute}
    assert attrs["group"] == case.groups and attrs["offset_group"] == case.offset_groups
    assert attrs["pads"] == [case.padding[0], case.padding[1]] * 2
    (actual,) = run_onnx(model, tensors)
    assert actual.shape == tuple(expected.shape)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=TOL, atol=TOL * expected.abs().max().item())


@pytest.mark.parametrize("opset", [19, 22])
def test_current_exporter_translation(opset):
    """The onnxscript translation (torch.onnx.export(dynamo=True)) of a modulated layer with
    offset groups and non-zero offsets, at both DeformConv opsets."""
    torch.manual_seed(1)
    layer = DeformConv2d(8, 6, 3, stride=2, padding=2, dilation=2, offset_groups=2, modulated=True).eval()
    torch.nn.init.normal_(layer.offset_branch.weight, std=0.3)
    x = normal((1, 8, 12, 10), generator(3), dtype=torch.float32)
    with torch.no_grad():
        expected = layer(x)
        program = torch.onnx.export(layer, (x,), dynamo=True, opset_version=opset, verbose=False,
                                    custom_translation_table=custom_translation_table(opset))
    model = program.model_proto
    assert {n.domain for n in model.graph.node} == {""}
    assert "DeformConv" in {n.op_type for n in model.graph.node}
    assert max(o.version for o in model.opset_import if o.domain == "") == opset
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=TOL, atol=TOL * expected.abs().max().item())
