"""dcnv3_core / dcnv4_core exported as standard ONNX (a depthwise DeformConv), run in
onnxruntime, equal the ops to 1e-5 (float32), with both exporters."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from detkit.ops import dcnv3_core, dcnv4_core  # noqa: E402
from detkit.ops.dcnv3 import dcnv4_packed_width  # noqa: E402
from detkit.ops.onnx import custom_translation_table  # noqa: E402
from tests.export.onnx_helpers import export_module, run_onnx  # noqa: E402
from tests.helpers import generator, normal, uniform  # noqa: E402

TOL = 1e-5  # issue: f32 to 1e-5


@dataclass(frozen=True)
class Case:
    group: int
    group_channels: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    remove_center: bool = False
    size: tuple[int, int] = (9, 11)
    batch: int = 2

    def args(self) -> tuple:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        return (kh, kw, sh, sw, ph, pw, dh, dw, self.group, self.group_channels, self.offset_scale,
                self.remove_center)

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    def tensors(self, seed: int, packed: bool) -> dict[str, torch.Tensor]:
        gen = generator(seed)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        h, w = self.size
        ho, wo = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        f32 = torch.float32
        x = normal((self.batch, h, w, self.group * self.group_channels), gen, dtype=f32)
        gk = self.group * self.points
        # offsets of a few pixels: samples land between pixels, some outside the image
        offset = normal((self.batch, ho, wo, 2 * gk), gen, std=2.0, dtype=f32)
        mask = uniform((self.batch, ho, wo, gk), gen, -0.5, 1.0, dtype=f32)
        if not packed:
            return {"input": x, "offset": offset, "mask": mask}
        used = torch.cat([offset.unflatten(-1, (self.group, -1)), mask.unflatten(-1, (self.group, -1))],
                         -1).flatten(-2)
        tail = normal((self.batch, ho, wo, dcnv4_packed_width(self.group, self.points) - 3 * gk), gen,
                      std=10.0, dtype=f32)
        return {"input": x, "offset_mask": torch.cat([used, tail], -1)}


CASES = [
    Case(2, 4),
    Case(3, 5, stride=(2, 1), pad=(1, 2), dilation=(1, 2)),            # unequal pairs, D odd
    Case(2, 3, offset_scale=2.0, remove_center=True),
    Case(1, 6, kernel=(5, 5), pad=(2, 2), offset_scale=0.5, remove_center=True),
    Case(2, 4, kernel=(2, 3), pad=(0, 1), dilation=(2, 1), offset_scale=1.5),
    Case(4, 2, size=(1, 7), batch=1),                                  # a 1-row input
]


class _V3(torch.nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case

    def forward(self, input, offset, mask):
        return dcnv3_core(input, offset, mask, *self.case.args())


class _V4(torch.nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case

    def forward(self, input, offset_mask):
        return dcnv4_core(input, offset_mask, *self.case.args())


def _assert_close(actual, expected: torch.Tensor) -> None:
    actual = torch.as_tensor(actual)
    assert actual.shape == expected.shape and float(expected.abs().max()) > 0
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL * expected.abs().max().item())


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c.group}d{c.group_channels}k{c.kernel}s{c.stride}"
                         f"p{c.pad}d{c.dilation}os{c.offset_scale}{'rc' if c.remove_center else ''}")
def test_torchscript_export_equals_onnxruntime(case: Case, packed: bool):
    tensors = case.tensors(seed=CASES.index(case), packed=packed)
    module = _V4(case) if packed else _V3(case)
    expected = module(**tensors)
    model = export_module(module, tuple(tensors.values()), list(tensors))
    nodes = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == 1
    attrs = {a.name: (list(a.ints) if a.ints else a.i) for a in nodes[0].attribute}
    assert attrs["group"] == case.group * case.group_channels and attrs["offset_group"] == case.group
    (actual,) = run_onnx(model, tensors)
    _assert_close(torch.from_numpy(actual), expected)


def test_dynamic_batch_and_size():
    """Batch and spatial size stay free (exported with dynamic axes, run on other sizes)."""
    case = Case(2, 4)
    tensors = case.tensors(seed=7, packed=False)
    model = export_module(_V3(case), tuple(tensors.values()), list(tensors),
                          dynamic_axes={n: {0: "n", 1: "h", 2: "w"} for n in tensors})
    other = Case(2, 4, size=(6, 13), batch=3).tensors(seed=8, packed=False)
    (actual,) = run_onnx(model, other)
    _assert_close(torch.from_numpy(actual), _V3(case)(**other))


@pytest.mark.parametrize("opset", [19, 22])
@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_current_exporter_translation(opset, packed):
    """The onnxscript translation (torch.onnx.export(dynamo=True)) at both DeformConv opsets."""
    case = CASES[2]  # offset_scale 2 and remove_center: every part of the translation
    tensors = case.tensors(seed=11, packed=packed)
    module = (_V4(case) if packed else _V3(case)).eval()
    with torch.no_grad():
        expected = module(**tensors)
        program = torch.onnx.export(module, tuple(tensors.values()), dynamo=True, opset_version=opset,
                                    verbose=False, custom_translation_table=custom_translation_table(opset))
    model = program.model_proto
    assert {n.domain for n in model.graph.node} == {""}
    assert "DeformConv" in {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (actual,) = session.run(None, dict(zip(names, (t.numpy() for t in tensors.values()))))
    _assert_close(torch.from_numpy(actual), expected)
