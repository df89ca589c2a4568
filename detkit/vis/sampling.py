"""Where deformable layers sample: captured offsets, stacked sampling points, deformable RoI bins.

What this module computes (the DCNv1 paper's Figures 5 and 7):

- `capture(model, image)` runs one eval forward of a detkit detector with hooks and returns,
  for every deformable conv layer (DCNv1-v4, offset sampling), its predicted offsets (and
  per-tap weights) in deform_conv2d's terms, with the geometry needed
  to place them in the image (`LayerOffsets`), the detections, and, when the RoI pooler is
  deformable, the bins of the top detections (`RoIBins`).
- `follow_sampling_points(layers, unit_xy)` follows the sampling locations of one
  activation unit of the last deformable layer back through the `num_layers` stacked
  deformable 3x3 layers below it: 9, then 81, then 729 points, in original image pixels.

Coordinate conventions (used by every function here and by the tests):

- Points are in the ORIGINAL image's pixel-index frame: pixel (x, y) has its centre at the
  integer coordinates (x, y) (OpenCV's drawing frame). Boxes and RoI bins are in the box
  frame of the detections (x1, y1, x2, y2, corner coordinates as the model returns them).
- A feature at index u on a grid of stride s (network-input pixels per grid cell) is the
  network-input pixel u * s. That is the exact centre of the receptive field of ResNet's
  padded convolutions (7x7/2 pad 3, max-pool 3/2 pad 1, 3x3/2 pad 1 and 1x1/2 all map output
  u to input 2u), so it composes exactly through strided layers.
- The model's transform resizes the image (bilinear, align_corners=False) from (H, W) to
  (h, w) before padding; network-input pixel-index x maps to original pixel-index
  (x + 0.5) * W / w - 0.5 (and likewise for y), the resize's own sampling rule. Boxes
  (corner frame) scale by W / w, as torchvision's postprocess does.
- A layer's input stride is inferred from the padded network input and the layer's input
  grid (`ceil(padded / stride) == grid` on both axes, powers of two preferred); detkit pads
  to a multiple of 32, which makes it exact.

Stacking rule (`follow_sampling_points`): the unit at output position (ho, wo) of layer L
samples, for tap k = (i, j), the position (ho*s - p + i*d + dy_k, wo*s - p + j*d + dx_k) of
L's input grid (offsets read at (ho, wo)). Such a position is mapped to network-input pixels
(times L's input stride) and from there to a fractional position of the previous
deformable layer L-1's OUTPUT grid (divided by L-1's output stride). When the two strides
are equal (the Bottleneck case: 1x1 convs and residuals keep the grid) this is the identity;
when a plain strided layer sits between them (a BasicBlock's conv1), that layer is treated as
point-wise, like a 1x1 conv, and only the deformable layers spread the points. L-1's
offsets at a fractional position are the bilinear interpolation of its offset map (positions
outside its grid are clamped to the border), and its taps are placed around the fractional
position with the same formula. With all offsets zero the points are therefore exactly the
receptive field of the plain dilated/strided conv stack (with multiplicity).

Output order: level n (1-based) holds 9**n points; point index = parent_index * 9 + k.

Offset groups: the points of one offset group (`offset_group`, default 0) are followed in
every layer; DCN's detectors use one group.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from detkit.utils.comm import unwrap_model as unwrap
from detkit.modeling.backbone import deformable_layers
from detkit.modeling.backbone.resnet import STAGE_MODULES, ResNet
from detkit.ops import DeformRoIPool

__all__ = [
    "STAGES", "ImageGeometry", "LayerOffsets", "RoIBins", "Capture", "capture", "capture_deformable_offsets",
    "unwrap", "deformable_conv_names", "deformable_conv_stages", "has_deformable_pooling", "select_stage",
    "check_sampling_request", "locate_unit", "follow_sampling_points", "roi_bins", "deformable_roi_bins",
]

#: Stage name -> the ResNet module holding it (detkit/torchvision names), the ResNet's own table.
STAGES = STAGE_MODULES


# --------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class ImageGeometry:
    """Sizes of one image through the model's transform.

    original_size: (H, W) of the image given to the model.
    network_size: (h, w) after the transform's resize (before padding).
    padded_size: (H_pad, W_pad) of the batch tensor the backbone sees.
    """

    original_size: tuple[int, int]
    network_size: tuple[int, int]
    padded_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(ry, rx): original pixels per network-input pixel."""
        return (self.original_size[0] / self.network_size[0], self.original_size[1] / self.network_size[1])

    def network_to_image(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Network-input pixel-index coordinates -> original pixel-index coordinates."""
        ry, rx = self.scale
        return (np.asarray(x, np.float64) + 0.5) * rx - 0.5, (np.asarray(y, np.float64) + 0.5) * ry - 0.5

    def image_to_network(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Original pixel-index coordinates -> network-input pixel-index coordinates."""
        ry, rx = self.scale
        return (np.asarray(x, np.float64) + 0.5) / rx - 0.5, (np.asarray(y, np.float64) + 0.5) / ry - 0.5

    def boxes_to_network(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes [N, 4] (x1, y1, x2, y2, corner frame) in original pixels -> network-input pixels."""
        ry, rx = self.scale
        return np.asarray(boxes, np.float64) / np.array([rx, ry, rx, ry])


@dataclass
class LayerOffsets:
    """One deformable conv layer's offsets for one image, with its geometry.

    offset: [G, K, 2, Ho, Wo] float64, (dy, dx) per tap k = i*kw + j, in input-grid units
        (the op's layout [2*G*K, Ho, Wo] reshaped).
    mask: [G, K, Ho, Wo] per-tap weights (DCNv2's sigmoid mask, DCNv3's softmax, DCNv4's raw
        weights) or None (DCNv1, offset sampling).
    input_size: (H_in, W_in) of the layer's input grid.
    input_stride: (sy, sx) network-input pixels per input-grid cell.
    stage: the ResNet stage ("res2".."res5") holding the layer, as the model reports it
        (`deformable_conv_stages`), or None.
    """

    name: str
    offset: np.ndarray
    mask: np.ndarray | None
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_size: tuple[int, int]
    input_stride: tuple[int, int]
    geometry: ImageGeometry
    stage: str | None = None

    def __post_init__(self) -> None:
        self.offset = np.asarray(self.offset, np.float64)
        if self.offset.ndim != 5 or self.offset.shape[1] != self.kernel_size[0] * self.kernel_size[1] \
                or self.offset.shape[2] != 2:
            taps = self.kernel_size[0] * self.kernel_size[1]
            raise ValueError(f"{self.name}: offset must be [G, {taps}, 2, Ho, Wo], got {self.offset.shape}")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, np.float64)
            expected = self.offset.shape[:2] + self.offset.shape[3:]
            if self.mask.shape != expected:
                raise ValueError(f"{self.name}: mask must be {list(expected)}, got {list(self.mask.shape)}")

    @property
    def offset_groups(self) -> int:
        return int(self.offset.shape[0])

    @property
    def modulated(self) -> bool:
        return self.mask is not None

    @property
    def output_size(self) -> tuple[int, int]:
        return int(self.offset.shape[3]), int(self.offset.shape[4])

    @property
    def output_stride(self) -> tuple[int, int]:
        return self.input_stride[0] * self.stride[0], self.input_stride[1] * self.stride[1]

    def output_to_image(self, row: np.ndarray | float, col: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Output-grid positions (row, col) -> original pixel-index (x, y): the activation centres."""
        sy, sx = self.output_stride
        return self.geometry.network_to_image(np.asarray(col, np.float64) * sx, np.asarray(row, np.float64) * sy)

    def input_to_image(self, row: np.ndarray | float, col: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Input-grid positions (row, col) -> original pixel-index (x, y)."""
        sy, sx = self.input_stride
        return self.geometry.network_to_image(np.asarray(col, np.float64) * sx, np.asarray(row, np.float64) * sy)

    def valid_output_extent(self) -> tuple[int, int]:
        """(rows, cols) of output positions whose centre lies on the resized image (not the padding)."""
        h, w = self.geometry.network_size
        sy, sx = self.output_stride
        return min((h - 1) // sy + 1, self.output_size[0]), min((w - 1) // sx + 1, self.output_size[1])


@dataclass
class RoIBins:
    """The bins of one RoI of a deformable RoI pooling layer, in the box frame of the original image.

    box: [4] (x1, y1, x2, y2). offset: [2, ph, pw] normalised (x, y) as the op takes it.
    mask: [ph, pw] bin weights (DCNv2) or None. regular / shifted: [ph, pw, 4] bin rectangles
    (x1, y1, x2, y2) without and with the shift gamma * offset * RoI size.
    """

    box: np.ndarray
    offset: np.ndarray
    mask: np.ndarray | None
    gamma: float
    regular: np.ndarray
    shifted: np.ndarray
    score: float | None = None
    label: int | None = None
    feature: str | None = None

    @property
    def regular_centers(self) -> np.ndarray:
        """[ph, pw, 2] (x, y) centres of the regular bins."""
        return np.stack([(self.regular[..., 0] + self.regular[..., 2]) / 2,
                         (self.regular[..., 1] + self.regular[..., 3]) / 2], axis=-1)

    @property
    def shifted_centers(self) -> np.ndarray:
        """[ph, pw, 2] (x, y) centres of the shifted bins."""
        return np.stack([(self.shifted[..., 0] + self.shifted[..., 2]) / 2,
                         (self.shifted[..., 1] + self.shifted[..., 3]) / 2], axis=-1)

    @property
    def shift(self) -> np.ndarray:
        """[ph, pw, 2] (dx, dy) shift of every bin in image pixels."""
        return self.shifted_centers - self.regular_centers


@dataclass
class Capture:
    """What one hooked forward saw: detections (original pixels, sorted by score), the
    deformable conv layers (forward order) and the RoI bins of the top detections."""

    detections: dict[str, Tensor]
    layers: list[LayerOffsets]
    roi_bins: list[RoIBins]
    geometry: ImageGeometry
    deformable_pooling: bool = False


# --------------------------------------------------------------------------- model inspection

def _normalise_stage(stage: str | None) -> str | None:
    if stage is None:
        return None
    stage = str(stage)
    if stage in STAGES:
        return stage
    for res, layer in STAGES.items():
        if stage == layer:
            return res
    raise ValueError(f"unknown stage {stage!r}; valid stages are {list(STAGES)} (or layer1..layer4)")


def deformable_conv_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's deformable conv layers (DCNv1-v4, offset sampling), in registration (forward) order."""
    return [name for name, _ in deformable_layers(unwrap(model))]


def deformable_conv_stages(model: nn.Module) -> dict[str, str | None]:
    """{qualified name: stage} of the model's deformable conv layers, in registration (forward)
    order; the stage ("res2".."res5") is what the detkit ResNet holding the layer reports
    (`ResNet.stage_of`), None for a layer outside any ResNet."""
    model = unwrap(model)
    resnets = [(prefix, module) for prefix, module in model.named_modules() if isinstance(module, ResNet)]

    def stage(name: str) -> str | None:
        for prefix, resnet in resnets:
            if not prefix or name.startswith(prefix + "."):
                return resnet.stage_of(name[len(prefix) + 1:] if prefix else name)
        return None

    return {name: stage(name) for name, _ in deformable_layers(model)}


def _roi_pooler(model: nn.Module) -> nn.Module | None:
    return getattr(getattr(unwrap(model), "roi_heads", None), "box_roi_pool", None)


def has_deformable_pooling(model: nn.Module) -> bool:
    """Whether the detector's RoI pooler is deformable ("deform" or "mdeform")."""
    return isinstance(getattr(_roi_pooler(model), "deform_pool", None), DeformRoIPool)


def select_stage(layers: Sequence[LayerOffsets], stage: str | None) -> list[LayerOffsets]:
    """The layers (LayerOffsets) of one stage ("res5", "res4", ... or "layer4", ...), by their
    `stage`; all of them when stage is None."""
    stage = _normalise_stage(stage)
    if stage is None:
        return list(layers)
    return [layer for layer in layers if layer.stage == stage]


def check_sampling_request(model: nn.Module, stage: str | None = None, num_layers: int = 3) -> int:
    """Check, before any forward, that sampling points can be followed; returns the number of
    deformable conv layers that will be used (0 when the model has none but deformable RoI
    pooling, and no stage was asked for). ValueError with the reason otherwise."""
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    stages = deformable_conv_stages(model)
    names = list(stages)
    if not names and not has_deformable_pooling(model):
        raise ValueError("the model has no deformable layers (neither deformable convolutions nor deformable "
                         "RoI pooling): there is nothing to visualise")
    wanted = _normalise_stage(stage)
    chosen = names if wanted is None else [name for name in names if stages[name] == wanted]
    if not names and stage is None:
        return 0
    if len(chosen) < num_layers:
        where = f"stage {_normalise_stage(stage)}" if stage is not None else "the model"
        listed = f" ({', '.join(chosen)})" if chosen else ""
        raise ValueError(f"{where} has {len(chosen)} deformable conv layer{'s' if len(chosen) != 1 else ''}"
                         f"{listed} but num_layers={num_layers} needs {num_layers}; lower num_layers"
                         + ("" if stage is None else " or choose another stage"))
    return int(num_layers)


def _infer_stride(padded: int, grid: int, other_padded: int, other_grid: int, name: str) -> int:
    """The integer stride s with ceil(padded / s) == grid on both axes (powers of two first)."""
    def fits(s: int) -> bool:
        return -(-padded // s) == grid and -(-other_padded // s) == other_grid

    powers = [1 << e for e in range(0, max(padded, other_padded).bit_length() + 1) if fits(1 << e)]
    candidates = powers or [s for s in range(1, max(padded, other_padded) + 1) if fits(s)]
    if not candidates:
        raise ValueError(f"{name}: cannot infer the stride of its input grid {grid}x{other_grid} from the padded "
                         f"image {padded}x{other_padded}")
    ratio = padded / grid
    return min(candidates, key=lambda s: abs(math.log(s / ratio)))


def _layer_offsets(name: str, module: nn.Module, input_shape: Sequence[int], offset: Tensor,
                   mask: Tensor | None, geometry: ImageGeometry, stage: str | None) -> LayerOffsets:
    # Every deformable conv layer (DeformConv2d, DCNv3, DCNv4, OffsetSampling) reports its
    # offsets in deform_conv2d's terms, relative to its `sampling_geometry`.
    conv = module.sampling_geometry
    kh, kw = conv.kernel_size
    groups = conv.groups
    _, _, height, width = (int(v) for v in input_shape)
    out_h, out_w = int(offset.shape[-2]), int(offset.shape[-1])
    off = offset[0].detach().to("cpu", torch.float64).numpy().reshape(groups, kh * kw, 2, out_h, out_w)
    msk = None if mask is None else mask[0].detach().to("cpu", torch.float64).numpy().reshape(
        groups, kh * kw, out_h, out_w)
    ph, pw = geometry.padded_size
    sy = _infer_stride(ph, height, pw, width, name)
    sx = _infer_stride(pw, width, ph, height, name)
    return LayerOffsets(name, off, msk, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding),
                        tuple(conv.dilation), (height, width), (sy, sx), geometry, stage)


# --------------------------------------------------------------------------- capture

def _as_image_tensor(image) -> Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 (RGB), got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor.float().div(255) if image.dtype == np.uint8 else tensor.float()
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a Tensor [3, H, W] (RGB in [0, 1]), got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    return image if image.is_floating_point() else image.float().div(255)


def capture(model: nn.Module, image, top_k: int = 3, roi_boxes: Tensor | np.ndarray | None = None) -> Capture:
    """One eval forward of a detkit detector on `image` ([3, H, W] float RGB in [0, 1], or an HxWx3
    uint8 RGB array) with hooks on every deformable conv layer (offsets via `sampling_offsets`
    on the hooked input), on the transform (sizes) and on a deformable RoI pooler (its features).

    RoI bins are computed for `roi_boxes` ([N, 4] original pixels) when given, else for the
    `top_k` highest-scoring detections. The model's train/eval mode is restored afterwards.
    """
    model = unwrap(model)
    if not hasattr(model, "transform"):
        raise ValueError("capture needs a detkit detector (a model with a `transform`), got "
                         f"{type(model).__name__}")
    tensor = _as_image_tensor(image)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    tensor = tensor.to(device)
    original_size = (int(tensor.shape[1]), int(tensor.shape[2]))
    modules = dict(deformable_layers(model))
    stages = deformable_conv_stages(model)
    records: list[tuple[str, nn.Module, tuple[int, ...], Tensor, Tensor | None]] = []
    sizes: dict[str, tuple[int, int]] = {}
    pool_features: dict[str, Tensor] = {}
    handles = []

    def conv_hook(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            x = inputs[0]
            offset, mask = module.sampling_offsets(x)
            records.append((name, module, tuple(x.shape), offset, mask))
        return hook

    def transform_hook(module, inputs, output) -> None:
        batch = output[0]
        sizes["network"] = tuple(int(v) for v in batch.image_sizes[0])
        sizes["padded"] = (int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1]))

    def pooler_hook(module, args) -> None:
        pool_features.update(args[0])

    pooler = _roi_pooler(model)
    deformable_pool = has_deformable_pooling(model)
    was_training = model.training
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(conv_hook(name)))
        handles.append(model.transform.register_forward_hook(transform_hook))
        if deformable_pool:
            handles.append(pooler.register_forward_pre_hook(pooler_hook))
        model.eval()
        with torch.inference_mode():
            detections = model([tensor])[0]
            geometry = ImageGeometry(original_size, sizes["network"], sizes["padded"])
            order = torch.argsort(detections["scores"], descending=True, stable=True)
            detections = {k: v[order] for k, v in detections.items()}
            layers = [_layer_offsets(name, module, shape, offset, mask, geometry, stages[name])
                      for name, module, shape, offset, mask in records]
            bins: list[RoIBins] = []
            if deformable_pool:
                if roi_boxes is not None:
                    boxes = torch.as_tensor(np.asarray(roi_boxes, np.float64), dtype=torch.float64).reshape(-1, 4)
                    scores = labels = None
                else:
                    boxes = detections["boxes"][:max(int(top_k), 0)].double().cpu()
                    scores = detections["scores"][:len(boxes)].tolist()
                    labels = detections["labels"][:len(boxes)].tolist()
                bins = deformable_roi_bins(pooler, pool_features, boxes.numpy(), geometry, scores, labels)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Capture(detections, layers, bins, geometry, deformable_pool)


def capture_deformable_offsets(model: nn.Module, image) -> tuple[dict[str, Tensor], list[LayerOffsets]]:
    """(detections, [LayerOffsets] in forward order) of one hooked eval forward (see `capture`)."""
    result = capture(model, image, top_k=0)
    return result.detections, result.layers


# --------------------------------------------------------------------------- sampling points

def locate_unit(layer: LayerOffsets, unit_xy: Sequence[float]) -> tuple[int, int]:
    """The output position (row, col) of `layer` whose centre is nearest to the original-image
    point unit_xy = (x, y), kept on the resized image (not on the padding)."""
    x, y = float(unit_xy[0]), float(unit_xy[1])
    height, width = layer.geometry.original_size
    if not (0 <= x < width and 0 <= y < height) or not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"point ({x:g}, {y:g}) is outside the image ({width}x{height} pixels: x in [0, {width}), "
                         f"y in [0, {height}))")
    net_x, net_y = layer.geometry.image_to_network(x, y)
    sy, sx = layer.output_stride
    rows, cols = layer.valid_output_extent()
    row = int(np.clip(np.floor(float(net_y) / sy + 0.5), 0, rows - 1))
    col = int(np.clip(np.floor(float(net_x) / sx + 0.5), 0, cols - 1))
    return row, col


def _bilinear(maps: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """maps [..., H, W] sampled at fractional (rows, cols) [N] -> [N, ...]; clamped to the border."""
    height, width = maps.shape[-2:]
    rows = np.clip(rows, 0, height - 1)
    cols = np.clip(cols, 0, width - 1)
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
    wr, wc = rows - r0, cols - c0
    moved = np.moveaxis(maps, (-2, -1), (0, 1))  # [H, W, ...]
    shape = (-1,) + (1,) * (maps.ndim - 2)
    wr, wc = wr.reshape(shape), wc.reshape(shape)
    return ((1 - wr) * (1 - wc) * moved[r0, c0] + (1 - wr) * wc * moved[r0, c1]
            + wr * (1 - wc) * moved[r1, c0] + wr * wc * moved[r1, c1])


def _taps(layer: LayerOffsets, rows: np.ndarray, cols: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampling positions [N, K] (rows, cols) in the layer's input grid of output positions (rows, cols) [N]."""
    kh, kw = layer.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    offsets = _bilinear(layer.offset[group], rows, cols)  # [N, K, 2]
    i, j = np.divmod(np.arange(kh * kw), kw)
    y = rows[:, None] * sh - ph + i[None] * dh + offsets[:, :, 0]
    x = cols[:, None] * sw - pw + j[None] * dw + offsets[:, :, 1]
    return y, x


def follow_sampling_points(layers: Sequence[LayerOffsets], unit_xy: Sequence[float], num_layers: int = 3,
                           stage: str | None = None, offset_group: int = 0) -> list[np.ndarray]:
    """Sampling points of one activation unit through the last `num_layers` deformable layers.

    layers: LayerOffsets in forward order (from `capture`); `stage` keeps only one stage's.
    unit_xy: a point (x, y) in original image pixels; the unit is the last layer's output
    position nearest to it (`locate_unit`).
    Returns [level 1 (9, 2), level 2 (81, 2), ...] arrays of (x, y) in original image pixels
    (pixel-index frame); see the module docstring for the stacking rule and the order.
    """
    chosen = select_stage(layers, stage)
    num_layers = int(num_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if len(chosen) < num_layers:
        where = f"stage {_normalise_stage(stage)}" if stage is not None else "the model"
        raise ValueError(f"{where} has {len(chosen)} deformable conv layers but num_layers={num_layers} needs "
                         f"{num_layers}")
    stack = list(chosen[-num_layers:])
    for layer in stack:
        if not 0 <= offset_group < layer.offset_groups:
            raise ValueError(f"offset_group {offset_group} is out of range: {layer.name} has "
                             f"{layer.offset_groups} offset groups")
    top = stack[-1]
    row, col = locate_unit(top, unit_xy)
    rows, cols = np.array([row], np.float64), np.array([col], np.float64)
    levels = []
    for index in range(len(stack) - 1, -1, -1):
        layer = stack[index]
        y, x = _taps(layer, rows, cols, offset_group)
        y, x = y.reshape(-1), x.reshape(-1)
        sy, sx = layer.input_stride
        image_x, image_y = layer.geometry.network_to_image(x * sx, y * sy)
        levels.append(np.stack([image_x, image_y], axis=1))
        if index > 0:
            below = stack[index - 1]
            oy, ox = below.output_stride
            rows, cols = y * sy / oy, x * sx / ox
    return levels


# --------------------------------------------------------------------------- RoI bins

def roi_bins(box: Sequence[float], offset: np.ndarray | Tensor, mask: np.ndarray | Tensor | None,
             gamma: float, **info) -> RoIBins:
    """Regular and shifted bins of a box [4] (x1, y1, x2, y2) for offset [2, ph, pw] (normalised:
    bin (i, j) moves by gamma * offset[0, i, j] * box width along x and gamma * offset[1, i, j] *
    box height along y) and mask [ph, pw] / [1, ph, pw] or None. Any frame works (the shift
    scales with the box), so boxes in original pixels give bins in original pixels."""
    box = np.asarray(box, np.float64).reshape(4)
    offset = np.asarray(offset.detach().cpu() if isinstance(offset, Tensor) else offset, np.float64)
    if offset.ndim != 3 or offset.shape[0] != 2:
        raise ValueError(f"offset must be [2, ph, pw], got {offset.shape}")
    _, ph, pw = offset.shape
    if mask is not None:
        mask = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask, np.float64).reshape(ph, pw)
    x1, y1, x2, y2 = box
    bin_w, bin_h = (x2 - x1) / pw, (y2 - y1) / ph
    jj, ii = np.meshgrid(np.arange(pw, dtype=np.float64), np.arange(ph, dtype=np.float64))
    regular = np.stack([x1 + jj * bin_w, y1 + ii * bin_h, x1 + (jj + 1) * bin_w, y1 + (ii + 1) * bin_h], axis=-1)
    dx = gamma * offset[0] * (x2 - x1)
    dy = gamma * offset[1] * (y2 - y1)
    shifted = regular + np.stack([dx, dy, dx, dy], axis=-1)
    return RoIBins(box, offset, mask, float(gamma), regular, shifted, **info)


def deformable_roi_bins(pooler: nn.Module, features: Mapping[str, Tensor], boxes: np.ndarray,
                        geometry: ImageGeometry, scores: Sequence[float] | None = None,
                        labels: Sequence[int] | None = None) -> list[RoIBins]:
    """Bins of a deformable `RoIPooler` for boxes [N, 4] in original pixels.

    Maps the boxes to network-input pixels and asks the pooler which feature map each goes to
    (`RoIPooler.level_indices`) and how it shifts its bins (`RoIPooler.predict_offsets`, one
    box at a time, batch index 0).
    """
    deform_pool = getattr(pooler, "deform_pool", None)
    if not isinstance(deform_pool, DeformRoIPool):
        raise ValueError("the RoI pooler is not deformable")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return []
    net_boxes = torch.from_numpy(geometry.boxes_to_network(boxes))
    levels = pooler.level_indices(net_boxes).tolist()
    first_image = {name: features[name][:1] for name in pooler.feature_names}
    out: list[RoIBins] = []
    for k, level in enumerate(levels):
        # One box at a time, so its offsets do not depend on the other boxes (batched fc layers
        # may sum in another order).
        roi = torch.cat([net_boxes.new_zeros(1), net_boxes[k]]).reshape(1, 5)
        offset, mask = pooler.predict_offsets(first_image, roi)
        out.append(roi_bins(boxes[k], offset[0], None if mask is None else mask[0], deform_pool.gamma,
                            score=None if scores is None else float(scores[k]),
                            label=None if labels is None else int(labels[k]), feature=pooler.feature_names[level]))
    return out
