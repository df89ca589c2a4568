"""Detectors whose backbone holds the newer deformable layers (DCNv3, DCNv4, per-channel offset
sampling) export to standard ONNX and give PyTorch eval's detections in onnxruntime, on the
synthetic val images and a real photograph, with trained-like (non-zero) offsets."""
from __future__ import annotations

import onnx
import pytest
import torch

from detkit.modeling.backbone import deformable_layers
from detkit.modeling.build import build_faster_rcnn
from detkit.ops import offset_branch_parameters
from tests.export.test_detector_onnx import SMALL, export_and_compare, photographs, tiny_resnet

C3_C5 = {"res3": "all", "res4": "all", "res5": "all"}


def randomise_offset_branches(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every offset-branch parameter made non-zero (a fresh model samples the regular grid), at
    a scale that moves samples by about a pixel."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, p in offset_branch_parameters(model):
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / fan_in ** 0.5 if p.dim() > 1 else 0.3))
    return model.eval()


def moved_samples(model: torch.nn.Module, image: torch.Tensor) -> float:
    """The smallest mean |offset| over the deformable layers in one forward (in input pixels)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(m.sampling_offsets(a[0])[0].abs().mean()))
             for _, m in deformable_layers(model)]
    with torch.no_grad():
        model([image])
    for h in hooks:
        h.remove()
    return min(float(s) for s in seen)


@pytest.mark.parametrize("kind,groups,options,opset", [
    ("dcnv3", 2, {"offset_scale": 1.0, "center_feature_scale": True}, 22),
    ("dcnv3", 2, {"offset_scale": 0.5}, 19),
    ("dcnv4", 2, {"remove_center": True, "dw_kernel_size": 3}, 22),
    ("offset_sampling", 1, {}, 19),
])
def test_detectors_with_every_newer_kind_export(tmp_path, kind, groups, options, opset):
    from tests.export.test_detector_onnx import synthetic_val_images

    torch.manual_seed(4)
    backbone = tiny_resnet(deform_blocks=C3_C5, deform_kind=kind, deform_groups=groups, deform_options=options)
    model = randomise_offset_branches(build_faster_rcnn(backbone, 9, "fpn", "alignv2", **SMALL), seed=4)
    images = synthetic_val_images([0, 11]) + photographs()[:1]
    assert moved_samples(model, images[0]) > 0.1
    export_and_compare(model, images, tmp_path / f"{kind}.onnx", opset=opset)
    ops = {n.op_type for n in onnx.load(str(tmp_path / f"{kind}.onnx")).graph.node}
    assert "DeformConv" in ops
