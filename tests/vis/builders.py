"""Builders shared by the detkit.vis tests: tiny detectors and synthetic deformable layers."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf

from detkit.config.build import build_model
from detkit.ops import offset_branch_parameters
from detkit.vis import ImageGeometry, LayerOffsets

REPO = Path(__file__).resolve().parents[2]
CPU_MODEL = REPO / "configs" / "model" / "faster_rcnn_r18_fpn_cpu.yaml"
MIN_SIZE, MAX_SIZE = 64, 96  # the tiny models' transform: an 80x100 image becomes 64x80


def tiny_config(**changes) -> dict:
    """configs/model/faster_rcnn_r18_fpn_cpu.yaml shrunk (3 classes, width-8 ResNet, 64 px images)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CPU_MODEL))
    cfg.update(num_classes=3, fpn_channels=16, representation_size=32, deform_hidden_dim=32,
               transform_options={"min_size": MIN_SIZE, "max_size": MAX_SIZE})
    cfg["backbone"]["width"] = 8
    backbone = changes.pop("backbone", {})
    cfg["backbone"].update(backbone)
    cfg.update(changes)
    return cfg


def build_tiny(seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(**changes)).eval()


def single_scale_config(**backbone) -> dict:
    """A single-scale (papers' layout) tiny R50: res5 deformable, deformable RoI pooling on res5."""
    return tiny_config(layout="single_scale", pooler_kind="deform",
                       backbone={"depth": 50, "out_features": ["res4", "res5"], "deform_blocks": {"res5": "all"},
                                 "deform_kind": "dcnv1", **backbone})


def randomise_offset_branches(model: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, p in offset_branch_parameters(model):  # every deformable layer kind's branch
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[3, H, W] float RGB in [0, 1] with some structure (upsampled noise)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(height // 8, 2), max(width // 8, 2), generator=gen)
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]


# ----------------------------------------------------------------- synthetic layers

def conv_out(size: int, stride: int, padding: int, dilation: int, kernel: int = 3) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def synthetic_layer(name: str, input_size: tuple[int, int], input_stride: int, geometry: ImageGeometry,
                    stride: int = 1, dilation: int = 1, offset: np.ndarray | None = None,
                    mask: np.ndarray | None = None, stage: str | None = None) -> LayerOffsets:
    """A 3x3 deformable layer (padding = dilation, as ResNet's) with the given offsets
    ([9, 2, Ho, Wo] or broadcastable; zero by default), one offset group, in `stage`."""
    out = (conv_out(input_size[0], stride, dilation, dilation), conv_out(input_size[1], stride, dilation, dilation))
    full = np.zeros((1, 9, 2) + out)
    if offset is not None:
        full[0] = np.broadcast_to(np.asarray(offset, np.float64), (9, 2) + out)
    return LayerOffsets(name, full, None if mask is None else np.broadcast_to(mask, (1, 9) + out).copy(),
                        (3, 3), (stride, stride), (dilation, dilation), (dilation, dilation), tuple(input_size),
                        (input_stride, input_stride), geometry, stage)


def identity_geometry(height: int, width: int) -> ImageGeometry:
    return ImageGeometry((height, width), (height, width), (height, width))


def write_image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB test image written to `path`; returns it (HxWx3 uint8 RGB)."""
    rgb = (smooth_image(height, width, seed).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_coco_folder(folder: Path, sizes: dict[int, tuple[int, int]], boxes: dict[int, list[list[float]]],
                      category_of=lambda index: 1) -> tuple[Path, Path]:
    """A COCO folder: `folder`/images/<id>.png of `sizes` {id: (height, width)} and
    `folder`/instances.json with `boxes` {id: [[x, y, w, h], ...]} (area w * h, categories 1
    "a" and 2 "b"; annotation k gets category_of(k)). Returns (images folder, JSON path)."""
    images = folder / "images"
    images.mkdir()
    entries, annotations = [], []
    for image_id, (h, w) in sizes.items():
        write_image(images / f"{image_id}.png", h, w, seed=image_id)
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for box in boxes[image_id]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_of(len(annotations)), "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    annotation_file = folder / "instances.json"
    annotation_file.write_text(json.dumps({"images": entries, "annotations": annotations,
                                           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return images, annotation_file


__all__ = ["build_tiny", "write_image", "write_coco_folder", "tiny_config", "single_scale_config", "randomise_offset_branches", "smooth_image",
           "synthetic_layer", "identity_geometry", "conv_out"]
