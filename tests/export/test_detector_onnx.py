"""Whole detectors exported to one standard ONNX file give PyTorch eval's detections in onnxruntime.

Models carry trained-like, non-zero offsets (the offset branches of a fresh model are zero,
which would make the deformable layers plain ones). Images are the synthetic val images of
the default data config, drawn at their own sizes (the file's image size is dynamic), and
real photographs.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime  # noqa: F401  (a test dependency, pyproject.toml [test]: never skipped)
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from detkit.data.synthetic import render_synthetic_image
from detkit.data.synthetic_config import SyntheticConfig
from detkit.export import (
    OnnxDetector,
    OnnxExportError,
    export_onnx,
    graph_domains,
    iter_nodes,
    read_metadata,
)
from detkit.modeling.build import build_faster_rcnn, build_resnet
from detkit.ops import DeformConv2d, DeformRoIPool
from tests.helpers import one_to_one

REPO = Path(__file__).resolve().parents[2]
# onnxruntime against PyTorch eval, both float32. Measured 2026-12-07 over the 1700 detections
# of this file and test_tools_onnx.py (boxes up to 540 px): box corners differ by at most
# 2.7e-4 px (4.5 float32 ulps at 512), scores by at most 1.8e-6. Tolerances: about 7x and 5.7x
# that (another CPU's kernels may round differently), far below what a wrong op would give.
BOX_TOL, SCORE_TOL = 2e-3, 1e-5


def synthetic_val_images(count: int | list[int]) -> list[torch.Tensor]:
    """Val images of configs/data/synthetic.yaml's generator (the first `count`, or those
    indices), [3, H, W] in [0, 1]."""
    data = OmegaConf.load(REPO / "configs/data/synthetic.yaml")
    config = SyntheticConfig(**OmegaConf.to_container(data.generator))
    indices = range(count) if isinstance(count, int) else count
    return [torch.from_numpy(render_synthetic_image(config, "val", i)[0]).permute(2, 0, 1).float() / 255
            for i in indices]


# Val images 11 (227 x 227), 31 (147 x 211) and 34 (213 x 183) are sizes whose resized side a
# float32 computation gets one pixel short (see detkit.modeling.transform); 0 is 229 x 197.
VAL_INDICES = [0, 11, 31, 34]


@pytest.fixture(scope="module")
def val_images():
    images = synthetic_val_images(VAL_INDICES)
    assert len({tuple(img.shape) for img in images}) > 1  # sizes differ: the file's size is dynamic
    return images


def photographs() -> list[torch.Tensor]:
    """Real photographs, [3, H, W] RGB in [0, 1]: the sample photos matplotlib ships (a
    portrait, 600 x 512, and a product box, 128 x 128); none can be downloaded here."""
    import cv2
    import matplotlib  # a main dependency

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    images = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        bgr = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        assert bgr is not None, f"cannot read {folder / name}"
        images.append(torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255)
    return images


def make_trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every offset branch non-zero weights: conv offsets of about a pixel, RoI bin shifts of
    a few percent of the RoI (what training produces), and masks away from sigmoid(0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DeformConv2d):
                branch = module.offset_branch
                fan_in = branch.weight[0].numel()
                branch.weight.copy_(torch.randn(branch.weight.shape, generator=gen) * (0.5 / fan_in ** 0.5))
                branch.bias.copy_(torch.randn(branch.bias.shape, generator=gen) * 0.7)
            elif isinstance(module, DeformRoIPool):
                last = module.offset_branch[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.05)
                last.bias.copy_(torch.randn(last.bias.shape, generator=gen) * 0.5)
    return model.eval()


def assert_offsets_nonzero(model: nn.Module, image: torch.Tensor) -> None:
    """The deformable layers really move their samples (else the test would not test them)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(m.offset_branch(a[0]).abs().mean()))
             for m in model.modules() if isinstance(m, DeformConv2d)]
    with torch.no_grad():
        model([image])
    for h in hooks:
        h.remove()
    assert seen and min(float(s) for s in seen) > 0.1


def assert_same_detections(expected: dict, actual: dict, where: str) -> None:
    """Same count; the PyTorch and ONNX detections paired one to one (a bipartite matching, so
    ties in score order do not matter), each pair with the same label, box corners within
    BOX_TOL px and scores within SCORE_TOL."""
    n = len(expected["scores"])
    assert len(actual["scores"]) == n, f"{where}: {len(actual['scores'])} detections in onnxruntime, {n} in PyTorch"
    box_distance = (expected["boxes"][:, None] - actual["boxes"][None]).abs().amax(-1)
    compatible = ((box_distance <= BOX_TOL)
                  & ((expected["scores"][:, None] - actual["scores"][None]).abs() <= SCORE_TOL)
                  & (expected["labels"][:, None] == actual["labels"][None]))
    pairs = one_to_one(compatible)
    if len(pairs) < n:
        unmatched = sorted(set(range(n)) - {i for i, _ in pairs})[0]
        same_label = box_distance[unmatched][actual["labels"] == expected["labels"][unmatched]]
        nearest = float(same_label.min()) if len(same_label) else float("inf")
        raise AssertionError(f"{where}: {n - len(pairs)} of {n} detections unmatched, e.g. {unmatched} "
                             f"{expected['boxes'][unmatched].tolist()} (nearest same-label box {nearest:.3g} px "
                             f"away; tolerances {BOX_TOL} px, score {SCORE_TOL})")


def export_and_compare(model, images, path: Path, batch_size: int = 1, **export_args) -> OnnxDetector:
    result = export_onnx(model, path, batch_size=batch_size, metadata={"label_to_category_id": {1: 11, 2: 12}},
                         **export_args)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert graph_domains(proto) == {""}                    # default-domain ONNX ops only, subgraphs too
    assert result.domains == [""]
    detector = OnnxDetector(path)
    with torch.no_grad():
        if batch_size == 1:
            expected = [model([img])[0] for img in images]
        else:
            expected = model(images)
    actual = detector(images)
    assert sum(len(e["scores"]) for e in expected) > 0
    for k, (exp, act) in enumerate(zip(expected, actual, strict=True)):
        assert_same_detections(exp, act, f"image {k} {tuple(images[k].shape)}")
    return detector


def tiny_resnet(norm: str = "bn", **kwargs) -> nn.Module:
    return build_resnet(depth=18, width=8, norm=norm, gn_groups=4, freeze_at=0, **kwargs)


SMALL = dict(fpn_channels=16, representation_size=32, deform_hidden_dim=32,
             rpn_options=dict(pre_nms_top_n_test=200, post_nms_top_n_test=100),
             roi_heads_options=dict(score_thresh=0.05, detections_per_img=50),
             transform_options=dict(min_size=192, max_size=320))


def test_default_run_model(val_images, tmp_path):
    """configs/model/faster_rcnn_r18_fpn_cpu.yaml (tools/train.py's default): R18 at half width,
    DCNv2 in res3-res5, modulated deformable RoI pooling, FPN."""
    torch.manual_seed(0)
    config = OmegaConf.load(REPO / "configs/model/faster_rcnn_r18_fpn_cpu.yaml")
    config.num_classes = 9
    model = make_trained_like(instantiate(config, _convert_="all"))
    assert model.roi_heads.box_roi_pool.kind == "mdeform"
    assert_offsets_nonzero(model, val_images[0])
    # The synthetic val images and real photographs (other statistics, sizes and aspect ratios).
    photos = photographs()
    with torch.no_grad():
        assert all(len(model([photo])[0]["scores"]) > 0 for photo in photos)  # something to compare
    detector = export_and_compare(model, val_images + photos, tmp_path / "default.onnx")
    ops = {n.op_type for n in iter_nodes(onnx.load(str(tmp_path / "default.onnx")).graph)}  # If branches too
    assert {"DeformConv", "RoiAlign", "Resize", "NonMaxSuppression"} <= ops
    # Traced with one image, the file takes any batch (of one size): each image's detections
    # are its own single-image ones.
    assert detector.dynamic_batch
    batch = [val_images[1], val_images[1].flip(-1), val_images[1].flip(-2)]
    boxes, scores, labels, index = detector.run(torch.stack(batch).numpy())
    for k, image in enumerate(batch):
        with torch.no_grad():
            expected = model([image])[0]
        mine = index == k
        actual = {"boxes": torch.from_numpy(boxes[mine]), "scores": torch.from_numpy(scores[mine]),
                  "labels": torch.from_numpy(labels[mine])}
        assert_same_detections(expected, actual, f"batch image {k}")
    assert detector.label_to_category_id == {1: 11, 2: 12}
    assert read_metadata(str(tmp_path / "default.onnx"))["opset"] == 19


def test_fpn_dconv_c3_c5_mdpool_batch2_opset22(val_images, tmp_path):
    """DCNv1 with 2 offset groups in res3-res5, mdpool, a file for batches of exactly two images
    (the per-image forward), at opset 22 (DeformConv-22; the RoI pooling as gathers, since
    onnxruntime runs no RoiAlign-22)."""
    torch.manual_seed(1)
    backbone = tiny_resnet(deform_blocks={"res3": "all", "res4": "all", "res5": "all"}, deform_groups=2)
    model = make_trained_like(build_faster_rcnn(backbone, 9, "fpn", "mdeform", **SMALL), seed=1)
    assert_offsets_nonzero(model, val_images[0])
    same_size = [val_images[0], val_images[0].flip(-1)]     # a batch shares one size
    detector = export_and_compare(model, same_size, tmp_path / "fpn_b2.onnx", batch_size=2, opset=22,
                                  dynamic_batch=False)
    portrait = photographs()[0]                               # and a real photograph, twice
    export_and_compare(model, [portrait, portrait.flip(-1)], tmp_path / "fpn_b2_photo.onnx", batch_size=2,
                       opset=22, dynamic_batch=False)
    assert not detector.dynamic_batch and detector.batch_size == 2
    with pytest.raises(ValueError, match="exactly 2 images"):
        detector(same_size[:1])
    proto = onnx.load(str(tmp_path / "fpn_b2.onnx"))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [22]
    ops = {n.op_type for n in proto.graph.node}
    assert "DeformConv" in ops and "RoiAlign" not in ops


def test_single_scale_dilated_res5_dpool(val_images, tmp_path):
    """The DCN papers' layout: RPN on res4, dilated res5 (DCNv1 in all its blocks), deformable RoI
    pooling on res5 at stride 16; exported at opset 20."""
    torch.manual_seed(2)
    backbone = tiny_resnet(dilate_res5=True, out_features=["res4", "res5"], deform_blocks={"res5": "all"})
    model = make_trained_like(build_faster_rcnn(backbone, 9, "single_scale", "deform", anchor_sizes=[[16, 32, 64, 128]],
                                                **SMALL), seed=2)
    assert model.roi_heads.box_roi_pool.strides == (16,)
    assert_offsets_nonzero(model, val_images[0])
    export_and_compare(model, val_images + photographs(), tmp_path / "single.onnx", opset=20)


@pytest.mark.parametrize("layout,kind,norm", [("fpn", "align", "frozen_bn"), ("fpn", "alignv2", "gn"),
                                              ("single_scale", "pool", "bn")])
def test_plain_pooler_kinds(val_images, tmp_path, layout, kind, norm):
    """The other pooler kinds, and the other norms of the ResNet (frozen BN, GroupNorm)."""
    torch.manual_seed(3)
    kwargs = dict(dilate_res5=True, out_features=["res4", "res5"]) if layout == "single_scale" else {}
    backbone = tiny_resnet(norm, deform_blocks={"res4": [-1]}, deform_kind="dcnv2", **kwargs)
    model = make_trained_like(build_faster_rcnn(backbone, 9, layout, kind, **SMALL), seed=3)
    export_and_compare(model, val_images[:2], tmp_path / f"{kind}.onnx")


def test_image_without_detections(val_images, tmp_path):
    """An image that yields no detection gives empty outputs in onnxruntime too."""
    torch.manual_seed(4)
    small = {**SMALL, "roi_heads_options": dict(score_thresh=0.9, detections_per_img=50)}
    model = make_trained_like(build_faster_rcnn(tiny_resnet(), 9, "fpn", "align", **small))
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    blank = torch.zeros(3, 150, 170)
    with torch.no_grad():
        expected = model([blank])[0]
    assert len(expected["scores"]) == 0
    actual = OnnxDetector(path)([blank])[0]
    assert actual["boxes"].shape == (0, 4) and actual["scores"].shape == (0,)


def test_settings_changed_on_the_model_reach_the_file(val_images, tmp_path):
    """The export reads the RPN's and RoI heads' settings from the model's own modules: changed
    there after building (nothing else), they change the exported file's detections, which still
    match PyTorch eval's, in the dynamic-batch and the per-image forms."""
    torch.manual_seed(6)
    model = make_trained_like(build_faster_rcnn(tiny_resnet(), 9, "fpn", "align", **SMALL))
    images = val_images[:2]
    detector = export_and_compare(model, images, tmp_path / "before.onnx")
    assert [len(d["scores"]) for d in detector(images)] == [50, 50]     # SMALL's detections_per_img
    model.roi_heads.score_thresh = 0.12
    with torch.no_grad():
        many = [len(d["scores"]) for d in model(images)]                # from 100 proposals per image
    model.rpn._post_nms_top_n["testing"] = 3
    for dynamic_batch in (True, False):
        detector = export_and_compare(model, images, tmp_path / f"rpn_{dynamic_batch}.onnx",
                                      dynamic_batch=dynamic_batch)
        detections = detector(images)
        counts = [len(d["scores"]) for d in detections]
        # At most 8 classes of each of 3 proposals, fewer than from 100; all above the threshold.
        assert all(0 < n <= 3 * 8 and n < m for n, m in zip(counts, many)), (counts, many)
        assert min(float(d["scores"].min()) for d in detections) > 0.12
    model.roi_heads.detections_per_img = 2
    for dynamic_batch in (True, False):
        detector = export_and_compare(model, images, tmp_path / f"heads_{dynamic_batch}.onnx",
                                      dynamic_batch=dynamic_batch)
        assert [len(d["scores"]) for d in detector(images)] == [2, 2]


class _Cummax(nn.Module):
    """A backbone wrapper using an op with no ONNX translation (aten::cummax)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.out_channels, self.strides = inner, inner.out_channels, inner.strides

    def forward(self, x):
        return self.inner(torch.cummax(x, dim=3)[0])


def test_refuses_what_cannot_be_exported_before_writing(tmp_path, capfd):
    torch.manual_seed(5)
    model = build_faster_rcnn(tiny_resnet(deform_blocks={"res5": [0]}), 9, "fpn", "align", **SMALL).eval()
    path = tmp_path / "never.onnx"
    with pytest.raises(OnnxExportError,
                       match=r"opset 18 .*DeformConv exists from opset 19.*backbone\.layer4\.0\.conv2"):
        export_onnx(model, path, opset=18)
    with pytest.raises(OnnxExportError, match="opset 23 is not supported"):
        export_onnx(model, path, opset=23)
    model.roi_heads.box_roi_pool.sampling_ratio = 0
    with pytest.raises(OnnxExportError, match="box_roi_pool: adaptive sampling .* no opset-22 form"):
        export_onnx(model, path, opset=22)
    model.roi_heads.box_roi_pool.kind = "pool"
    with pytest.raises(OnnxExportError, match="box_roi_pool: the 'pool' kind .* opset 22"):
        export_onnx(model, path, opset=22)
    model.roi_heads.box_roi_pool.kind, model.roi_heads.box_roi_pool.sampling_ratio = "align", 2
    with pytest.raises(OnnxExportError, match="exports detkit FasterRCNN detectors; got a ResNet"):
        export_onnx(model.backbone, path)
    model.backbone = _Cummax(model.backbone)
    capfd.readouterr()
    with pytest.raises(OnnxExportError, match=r"cannot export backbone .*aten::cummax"):
        export_onnx(model, path)
    assert capfd.readouterr().out == ""        # not the exporter's dump of its whole IR graph
    assert not path.exists() and list(tmp_path.iterdir()) == []
