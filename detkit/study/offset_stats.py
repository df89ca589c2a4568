"""DCNv1 Table 2: the "effective dilation" of deformable conv layers, by object size.

Effective dilation of one activation (one output position of a deformable conv, one offset
group) = the mean distance between the sampling locations of horizontally or vertically
adjacent taps of its filter (for 3x3: 6 horizontal + 6 vertical pairs), in units of the
layer's input grid. A plain conv with dilation d gives exactly d; offsets that push every
tap (i, j) outward by delta * (i - 1, j - 1) give d + delta.

Activations are split by what their centre falls on (`activation_categories`): a ground-
truth box of the ORIGINAL image, by the box's area w * h (COCO's thresholds: small < 32**2 <=
medium < 96**2 <= large), the smallest box when several contain it, or background. The
centre of output position (r, c) is `LayerOffsets.output_to_image(r, c)` (pixel-index frame;
+0.5 gives the box frame) and a box contains it when x1 <= X <= x2 and y1 <= Y <= y2.
Activations whose centre lies on the transform's padding (outside the image) are ignored.

`OffsetStatistics` accumulates, per layer and category, the count, mean and standard
deviation (population) of the effective dilation over activations (and offset groups) and, for DCNv2
layers, the mean modulation (mask value averaged over the filter's taps).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from detkit.vis.sampling import LayerOffsets

__all__ = ["CATEGORIES", "SMALL_AREA", "LARGE_AREA", "sampling_positions", "effective_dilation",
           "activation_categories", "size_category", "paper_name", "OffsetStatistics", "table2_markdown"]

CATEGORIES = ("small", "medium", "large", "background")
SMALL_AREA = 32.0 ** 2
LARGE_AREA = 96.0 ** 2
_OUTSIDE = -1


def sampling_positions(layer: LayerOffsets) -> np.ndarray:
    """[G, K, 2, Ho, Wo] (y, x) sampling positions in the layer's input grid."""
    kh, kw = layer.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    out_h, out_w = layer.output_size
    i, j = np.divmod(np.arange(kh * kw), kw)
    rows = np.arange(out_h, dtype=np.float64)[None, :, None] * sh - ph + (i * dh)[:, None, None]
    cols = np.arange(out_w, dtype=np.float64)[None, None, :] * sw - pw + (j * dw)[:, None, None]
    y = rows + layer.offset[:, :, 0]
    x = cols + layer.offset[:, :, 1]
    return np.stack([y, x], axis=2)


def effective_dilation(layer: LayerOffsets) -> np.ndarray:
    """[G, Ho, Wo]: mean distance between adjacent taps' sampling positions, per activation."""
    kh, kw = layer.kernel_size
    if kh < 2 and kw < 2:
        raise ValueError(f"{layer.name}: a {kh}x{kw} filter has no adjacent taps")
    pos = sampling_positions(layer)
    groups, _, _, out_h, out_w = pos.shape
    pos = pos.reshape(groups, kh, kw, 2, out_h, out_w)
    horizontal = np.linalg.norm(pos[:, :, 1:] - pos[:, :, :-1], axis=3)  # [G, kh, kw-1, Ho, Wo]
    vertical = np.linalg.norm(pos[:, 1:] - pos[:, :-1], axis=3)          # [G, kh-1, kw, Ho, Wo]
    total = horizontal.sum(axis=(1, 2)) + vertical.sum(axis=(1, 2))
    return total / (kh * (kw - 1) + (kh - 1) * kw)


def size_category(area: float) -> str:
    """COCO's size class of a box area in original pixels."""
    return "small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"


def activation_categories(layer: LayerOffsets, boxes: np.ndarray | Sequence) -> np.ndarray:
    """[Ho, Wo] int: index into CATEGORIES of what each activation's centre lies on (the smallest
    containing box of `boxes` [N, 4] x1y1x2y2 in original pixels, else background), or -1 when
    the centre is off the image (on the padding)."""
    out_h, out_w = layer.output_size
    x, _ = layer.output_to_image(0, np.arange(out_w))
    _, y = layer.output_to_image(np.arange(out_h), 0)
    x, y = np.asarray(x) + 0.5, np.asarray(y) + 0.5  # pixel-index -> box (corner) frame
    height, width = layer.geometry.original_size
    result = np.full((out_h, out_w), CATEGORIES.index("background"), np.int64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for k in np.argsort(-areas, kind="stable"):  # largest first: smaller boxes overwrite
        x1, y1, x2, y2 = boxes[k]
        inside = ((y >= y1) & (y <= y2))[:, None] & ((x >= x1) & (x <= x2))[None, :]
        result[inside] = CATEGORIES.index(size_category(float(areas[k])))
    off_image = ~(((y >= 0) & (y < height))[:, None] & ((x >= 0) & (x < width))[None, :])
    result[off_image] = _OUTSIDE
    return result


def paper_name(name: str) -> str:
    """'backbone.layer4.2.conv2' -> 'res5c': stage, then the block index as a letter (a, b, c, ...;
    ResNet-101's res4 blocks 1..22, which Caffe calls res4b1..res4b22, become res4b..res4w)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a.startswith("layer") and a[5:].isdigit() and b.isdigit():
            stage, block = int(a[5:]) + 1, int(b)
            return f"res{stage}{chr(ord('a') + block)}" if block < 26 else f"res{stage}.{block}"
    return name


class _Moments:
    """Count, mean and sum of squared deviations (Chan et al.'s parallel combination)."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).reshape(-1)
        n = values.size
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")


class OffsetStatistics:
    """Effective dilation (and DCNv2 mask) statistics per layer and object-size category.

    update(layers, boxes) once per image (layers from `detkit.vis.capture`, boxes [N, 4] in the
    original image's pixels), then `result()` (a JSON-ready dict) or `table()`.
    """

    def __init__(self) -> None:
        self.num_images = 0
        self._layers: dict[str, dict] = {}
        # stage -> {"layers": [short names], "dilation_moments": {category: _Moments}}: every
        # activation of the stage's deformable layers pooled (DCNv2's conv3-5 models, per stage)
        self._stages: dict[str, dict] = {}

    def update(self, layers: Iterable[LayerOffsets], boxes: np.ndarray | Sequence) -> None:
        for layer in layers:
            entry = self._layers.get(layer.name)
            if entry is None:
                entry = self._layers[layer.name] = {
                    "name": layer.name, "short_name": paper_name(layer.name), "stage": layer.stage,
                    "dilation": list(layer.dilation), "kernel_size": list(layer.kernel_size),
                    "stride": list(layer.stride), "input_stride": list(layer.input_stride),
                    "offset_groups": layer.offset_groups, "modulated": layer.modulated,
                    "dilation_moments": {c: _Moments() for c in CATEGORIES + ("all",)},
                    "mask_moments": {c: _Moments() for c in CATEGORIES + ("all",)},
                }
            stage = self._stages.setdefault(str(layer.stage), {
                "layers": [], "dilation_moments": {c: _Moments() for c in CATEGORIES + ("all",)}})
            if entry["short_name"] not in stage["layers"]:
                stage["layers"].append(entry["short_name"])
            dilation = effective_dilation(layer)                       # [G, Ho, Wo]
            mask = None if layer.mask is None else layer.mask.mean(axis=1)  # [G, Ho, Wo]
            categories = activation_categories(layer, boxes)          # [Ho, Wo]
            for index, name in enumerate(CATEGORIES):
                chosen = categories == index
                entry["dilation_moments"][name].add(dilation[:, chosen])
                stage["dilation_moments"][name].add(dilation[:, chosen])
                if mask is not None:
                    entry["mask_moments"][name].add(mask[:, chosen])
            valid = categories != _OUTSIDE
            entry["dilation_moments"]["all"].add(dilation[:, valid])
            stage["dilation_moments"]["all"].add(dilation[:, valid])
            if mask is not None:
                entry["mask_moments"]["all"].add(mask[:, valid])
        self.num_images += 1

    def result(self) -> dict:
        """{"num_images", "categories", "layers": [{name, short_name, stage, dilation, ...,
        "effective_dilation": {category: {"count", "mean", "std"}}, "mean_mask": {category: mean}
        (modulated layers only)}], "stages": [{stage, layers (short names), "effective_dilation"}]}
        in forward order; a stage's statistics pool every activation of its deformable layers.
        Empty categories have count 0 and null values."""
        layers = []
        for entry in self._layers.values():
            out = {k: v for k, v in entry.items() if not k.endswith("_moments")}
            out["effective_dilation"] = _summary(entry["dilation_moments"])
            if entry["modulated"]:
                out["mean_mask"] = {c: (m.mean if m.count else None) for c, m in entry["mask_moments"].items()}
            layers.append(out)
        stages = [{"stage": name, "layers": list(stage["layers"]),
                   "effective_dilation": _summary(stage["dilation_moments"])} for name, stage in self._stages.items()]
        return {"num_images": self.num_images, "categories": list(CATEGORIES), "layers": layers, "stages": stages}

    def table(self) -> str:
        """DCNv1 Table 2's layout: one row per layer, mean +- std of the effective dilation for
        small / medium / large objects and background (and the mean mask for DCNv2 layers)."""
        result = self.result()
        header = ["layer", "dilation"] + list(CATEGORIES)
        modulated = any(layer["modulated"] for layer in result["layers"])
        if modulated:
            header += [f"mask {c}" for c in CATEGORIES]
        header.append("activations s/m/l/bg")
        rows = [header]
        for layer in result["layers"]:
            row = [f"{layer['short_name']}", "x".join(str(d) for d in dict.fromkeys(layer["dilation"]))]
            for c in CATEGORIES:
                row.append(_cell(layer["effective_dilation"][c]))
            if modulated:
                for c in CATEGORIES:
                    value = layer.get("mean_mask", {}).get(c)
                    row.append("-" if value is None else f"{value:.2f}")
            row.append("/".join(str(layer["effective_dilation"][c]["count"]) for c in CATEGORIES))
            rows.append(row)
        lines = _aligned(rows)
        if len(result["stages"]) > 1:
            rows = [["stage", "layers"] + list(CATEGORIES)]
            for stage in result["stages"]:
                rows.append([stage["stage"], ",".join(stage["layers"])]
                            + [_cell(stage["effective_dilation"][c]) for c in CATEGORIES])
            lines += [""] + _aligned(rows)
        lines.append(f"effective dilation (mean ± std over activations, in input-grid units) on "
                     f"{result['num_images']} images")
        return "\n".join(lines)


def table2_markdown(result: dict, title: str | None = None) -> str:
    """DCNv1 Table 2 as Markdown from `OffsetStatistics.result()` (or the offset_stats.json
    analyze_offsets writes): one row per deformable layer, then one per stage when there are
    several, with the effective dilation's mean ± std on small / medium / large objects and
    background, the nominal dilation, and the activation counts behind each cell."""
    header = ["layer", "nominal dilation", *CATEGORIES, "activations s / m / l / bg"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]

    def row(name: str, nominal: str, stats: dict) -> str:
        counts = " / ".join(str(stats[c]["count"]) for c in CATEGORIES)
        return f"| {' | '.join([name, nominal, *(_cell(stats[c]) for c in CATEGORIES), counts])} |"

    for layer in result["layers"]:
        nominal = "x".join(str(d) for d in dict.fromkeys(layer["dilation"]))
        lines.append(row(layer["short_name"], nominal, layer["effective_dilation"]))
    stages = result.get("stages", [])
    if len(stages) > 1:
        for stage in stages:
            lines.append(row(f"**{stage['stage']}** ({', '.join(stage['layers'])})", "", stage["effective_dilation"]))
    caption = (f"Effective dilation (mean ± std over activations, in units of each layer's input grid) "
               f"on {result['num_images']} images.")
    return "\n".join(([f"{title}", ""] if title else []) + lines + ["", caption])


def _summary(moments: dict[str, _Moments]) -> dict:
    return {c: {"count": m.count, "mean": m.mean if m.count else None, "std": m.std if m.count else None}
            for c, m in moments.items()}


def _cell(stats: dict) -> str:
    return "-" if not stats["count"] else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def _aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell (the first left-aligned), a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines
