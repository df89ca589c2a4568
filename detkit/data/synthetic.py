"""Synthetic shapes: detkit's default, self-generating COCO-format detection dataset.

Each image is a cluttered background with a few shapes drawn on it. The shape
classes (`SYNTHETIC_CLASSES`) differ only in geometry: every object gets a
random colour (often a gradient or a stripe texture, sometimes only its outline
is drawn), so a detector has to model shape to tell them apart. Every object
is independently stretched, rotated, bent by a smooth random elastic warp and
seen through a mild random perspective, which is the kind of geometric
variation deformable convolution and deformable RoI pooling are built for.

Per object, in unit coordinates (the template spans about [-1, 1]):

  template (with per-instance proportions)  ->  [bend]  ->  elastic warp  ->  perspective
  ->  anisotropic stretch  ->  rotation  ->  scale to its size  ->  placement

The bend (off by default, `max_bend`) curves the template along a circular arc, as a
bent or articulated part would be. `size_distribution` chooses how object sizes are
drawn (square-root-uniform by default, or log-uniform, which spreads them evenly over
scales) and `size_bands` can split the size range into bands that get equal shares of
the objects (to fill COCO's small / medium / large buckets alike). These options at their
defaults leave the output exactly as it was before they existed, and are then left out
of the manifest, so cached datasets of such configurations stay valid.

Objects are drawn one after the other, so later ones occlude earlier ones.
Each object's annotation is the bounding box of the pixels of it that remain
visible in the final image (its mask minus what later objects cover, clipped to
the image); an object with less than `min_visible_fraction` of its mask visible
(or whose visible box is under 2 px on a side) gets no annotation. Its visible
pixel count is the annotation's `area` (what COCOeval's small/medium/large
ranges use).

Backgrounds: a two-colour linear gradient, low-frequency colour noise, texture
patches (stripes, checkerboards, noise) in rotated rectangles, random straight
lines and random-walk polylines; after the objects, a few thin lines cross
over everything, then a light blur (sometimes) and pixel noise. None of this
clutter is annotated and none of it has the shape of a class.

Generation is deterministic: image `i` of split `s` is drawn from its own
`numpy.random.Generator` seeded with `SeedSequence([seed, split_code, i])`, so
images can be generated in any order by any number of worker processes and any
single image can be reproduced alone (`render_synthetic_image`). Annotation ids
are assigned in image order afterwards, so the JSON does not depend on the
number of workers either.

Layout written by `generate_synthetic_coco(root, ...)`:

  root/train/000000.jpg ...            root/val/000000.jpg ...
  root/annotations/instances_train.json   root/annotations/instances_val.json
  root/manifest.json                   (written last: its presence marks a complete dataset)

Image ids are 1-based per split (image `i` has id `i + 1`), category ids are
1..K in the order of `SYNTHETIC_CLASSES`.

`ensure_synthetic_dataset(root, config)` is the entry point for training: it
returns `root` at once when its manifest matches the requested configuration
and generator version, and otherwise (re)generates the dataset into a temporary
sibling folder and renames it into place, under a file lock, so concurrent
callers (one per distributed rank) generate it once and a killed generation
never leaves a folder that looks complete.

This module needs only numpy and OpenCV (no torch), so its worker processes
start quickly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from filelock import FileLock
from tqdm import tqdm

from detkit.data.synthetic_config import SyntheticConfig
from detkit.utils import comm

__all__ = [
    "SYNTHETIC_CLASSES",
    "GENERATOR_VERSION",
    "generate_synthetic_coco",
    "ensure_synthetic_dataset",
    "render_synthetic_image",
    "synthetic_paths",
    "default_synthetic_root",
    "visible_annotations",
]

logger = logging.getLogger(__name__)

#: Class names; category id of SYNTHETIC_CLASSES[i] is i + 1.
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "triangle", "star", "ring", "cross", "ellipse", "arrow", "lshape", "heart",
)

#: Bumped whenever the rendering changes, so cached datasets get regenerated.
GENERATOR_VERSION = 2

_SPLIT_CODES = {"train": 0, "val": 1}
_MANIFEST = "manifest.json"


def synthetic_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image_dir, annotation_file) of a split ("train" or "val") of a synthetic dataset."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}; got {split!r}")
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def default_synthetic_root() -> Path:
    """Default cache folder: $DETKIT_CACHE/synthetic_shapes, else ~/.cache/detkit/synthetic_shapes."""
    base = os.environ.get("DETKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "detkit")
    return Path(base) / "synthetic_shapes"


# --------------------------------------------------------------------------------------------
# Shape templates (closed contours in unit coordinates, y pointing down like image rows)
# --------------------------------------------------------------------------------------------

def _densify(vertices: np.ndarray, step: float = 0.08) -> np.ndarray:
    """Closed polygon with extra points on its edges (so warps bend the edges), corners kept."""
    ends = np.roll(vertices, -1, axis=0)
    counts = np.maximum(1, np.ceil(np.hypot(*(ends - vertices).T) / step).astype(np.int64))
    edge = np.repeat(np.arange(len(vertices)), counts)
    # Position along each edge: 0, 1/m, ..., (m-1)/m.
    t = (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)) / counts[edge]
    return vertices[edge] + (ends - vertices)[edge] * t[:, None]


def _circle(radius: float, n: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _template(cls: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(outer contours, hole contours) of one instance of class `cls`, with random proportions."""
    if cls == "triangle":
        ang = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.17, 0.17, 3)
        rad = rng.uniform(0.85, 1.0, 3)
        v = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        return [_densify(v)], []
    if cls == "star":
        inner = rng.uniform(0.38, 0.52)
        ang = -math.pi / 2 + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        v = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        return [_densify(v)], []
    if cls == "ring":
        return [_circle(1.0)], [_circle(rng.uniform(0.45, 0.65))]
    if cls == "cross":
        w = rng.uniform(0.2, 0.34)
        v = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                      [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=np.float64)
        return [_densify(v)], []
    if cls == "ellipse":
        c = _circle(1.0)
        c[:, 1] *= rng.uniform(0.55, 1.0)
        return [c], []
    if cls == "arrow":
        shaft = rng.uniform(0.14, 0.24)
        head = rng.uniform(0.5, 0.7)
        neck = rng.uniform(0.05, 0.3)
        v = np.array([[-1, -shaft], [neck, -shaft], [neck, -head], [1, 0], [neck, head],
                      [neck, shaft], [-1, shaft]], dtype=np.float64)
        return [_densify(v)], []
    if cls == "lshape":
        t = rng.uniform(0.35, 0.55)
        foot = rng.uniform(0.6, 1.0)
        v = np.array([[-1, -1], [-1 + t, -1], [-1 + t, 1 - t], [foot, 1 - t], [foot, 1], [-1, 1]],
                     dtype=np.float64)
        return [_densify(v)], []
    if cls == "heart":
        t = np.linspace(0.0, 2 * math.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        v = np.stack([x, y + 2.5], axis=1) / 16.0
        return [v], []
    raise ValueError(f"unknown synthetic class {cls!r}")


def _bend(p: np.ndarray, angle: float, axis: int) -> np.ndarray:
    """Points `p` [N, 2] bent along a circular arc: the line through the origin along `axis`
    (0: x, 1: y) becomes an arc of the same length, subtending `angle` radians over the
    template's length of 2, and each point keeps its signed distance from it (the arc's
    radius is 2 / |angle|; the sign of `angle` says which way it curves)."""
    if angle == 0:
        return p
    radius = 2.0 / angle
    u, v = p[:, axis], p[:, 1 - axis]       # along the bent line, across it
    phi = u / radius
    out = np.empty_like(p)
    out[:, axis] = (radius + v) * np.sin(phi)
    out[:, 1 - axis] = (radius + v) * np.cos(phi) - radius
    return out


def _warp_points(contours: list[np.ndarray], rng: np.random.Generator, cfg: SyntheticConfig) -> list[np.ndarray]:
    """[Bend ->] elastic warp -> perspective -> stretch -> rotation, all in unit coordinates."""
    sizes = [len(p) for p in contours]
    p = np.concatenate(contours, axis=0)
    if cfg.max_bend > 0:  # no draw at all when off, so the default output is unchanged
        angle = math.radians(rng.uniform(-cfg.max_bend, cfg.max_bend))
        p = _bend(p, angle, int(rng.integers(0, 2)))
    # Smooth elastic warp: a sum of three low-frequency sinusoidal displacement waves,
    # wave k moving points by amp_k * sin(freq_k . p + phase_k) along direction_k.
    theta = rng.uniform(0, 2 * math.pi, 3)
    freqs = rng.uniform(1.0, 3.0, 3)[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [3, 2]
    phases = rng.uniform(0, 2 * math.pi, 3)
    phi = rng.uniform(0, 2 * math.pi, 3)
    amps = cfg.deformation * rng.uniform(0.3, 1.0, 3) / np.arange(1, 4)
    disp = amps[:, None] * np.stack([np.cos(phi), np.sin(phi)], axis=1)  # [3, 2]
    g = rng.uniform(-cfg.perspective, cfg.perspective, 2) if cfg.perspective > 0 else np.zeros(2)
    stretch = math.exp(rng.uniform(-math.log(cfg.max_stretch), math.log(cfg.max_stretch)))
    rot = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(rot), math.sin(rot)
    # Stretch (x by sqrt(stretch), y by its inverse) then rotate, as one matrix on row vectors.
    linear = np.diag([math.sqrt(stretch), 1.0 / math.sqrt(stretch)]) @ np.array([[c, s], [-s, c]])
    q = p + np.sin(p @ freqs.T + phases) @ disp
    q = q / (1.0 + q @ g)[:, None]
    q = q @ linear
    return np.split(q, np.cumsum(sizes)[:-1])


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _contrasting_color(rng: np.random.Generator, against: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    """A random RGB colour at least `min_dist` away from `against` (a few tries, then its complement)."""
    for _ in range(12):
        col = _random_color(rng)
        if float(np.linalg.norm(col - against)) >= min_dist:
            return col
    return np.clip(255.0 - against, 0, 255).astype(np.float32)


def _linear_ramp(h: int, w: int, angle: float, period: float | None = None) -> np.ndarray:
    """[h, w] float32: position along direction `angle`, normalised to [0, 1] (or phase/period)."""
    proj = (np.arange(w, dtype=np.float32)[None, :] * math.cos(angle)
            + np.arange(h, dtype=np.float32)[:, None] * math.sin(angle))
    if period is not None:
        return proj / period
    lo, hi = float(proj.min()), float(proj.max())
    return (proj - lo) / max(hi - lo, 1e-6)


def _pattern(rng: np.random.Generator, h: int, w: int, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """[h, w, 3] float32 texture: stripes, a checkerboard or coloured noise."""
    kind = rng.integers(0, 3)
    if kind == 0:
        phase = _linear_ramp(h, w, rng.uniform(0, math.pi), period=rng.uniform(4, 14))
        t = (np.floor(phase) % 2)[..., None]
    elif kind == 1:
        cell = int(rng.integers(4, 12))
        t = (((np.arange(h)[:, None] // cell) + (np.arange(w)[None, :] // cell)) % 2).astype(np.float32)[..., None]
    else:
        t = rng.random((h, w, 1), dtype=np.float32)
    return c1 * (1 - t) + c2 * t


def _background(rng: np.random.Generator, h: int, w: int, clutter: float) -> np.ndarray:
    """[h, w, 3] float32 background: gradient, colour blotches, texture patches, strokes."""
    # The smooth part (a linear two-colour gradient plus low-frequency colour blotches)
    # is built on a grid 8x coarser and upsampled linearly: exact for the gradient,
    # smooth for the blotches (which are cubic-upsampled to that grid first).
    ch, cw = max(h // 8, 2), max(w // 8, 2)
    c1, c2 = _random_color(rng), _random_color(rng)
    angle = rng.uniform(0, 2 * math.pi)
    xs = (np.arange(cw, dtype=np.float32) + 0.5) * (w / cw) - 0.5
    ys = (np.arange(ch, dtype=np.float32) + 0.5) * (h / ch) - 0.5
    proj = xs[None, :] * math.cos(angle) + ys[:, None] * math.sin(angle)
    corners = [x * math.cos(angle) + y * math.sin(angle) for x in (0, w - 1) for y in (0, h - 1)]
    t = ((proj - min(corners)) / max(max(corners) - min(corners), 1e-6))[..., None]
    coarse = c1 + (c2 - c1) * t
    if clutter > 0:
        gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
        low = rng.normal(0, rng.uniform(0, 35) * clutter, (gh, gw, 3)).astype(np.float32)
        coarse += cv2.resize(low, (cw, ch), interpolation=cv2.INTER_CUBIC)
    img = cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    if clutter <= 0:
        return np.clip(img, 0, 255)
    # Texture patches in rotated rectangles.
    for _ in range(int(rng.integers(0, 4 * clutter + 1))):
        pw, ph = rng.uniform(15, 0.45 * w), rng.uniform(15, 0.45 * h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        box = cv2.boxPoints(((cx, cy), (pw, ph), rng.uniform(0, 180)))
        x0, y0 = np.floor(box.min(0)).astype(int)
        x1, y1 = np.ceil(box.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(mask, np.round((box - [x0, y0]) * 16).astype(np.int32), 255, cv2.LINE_AA, 4)
        alpha = (mask.astype(np.float32) / 255.0 * rng.uniform(0.35, 0.9))[..., None]
        pat = _pattern(rng, y1 - y0, x1 - x0, _random_color(rng), _random_color(rng))
        region = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = region * (1 - alpha) + pat * alpha
    # Straight lines and random-walk polylines.
    for _ in range(int(rng.integers(0, 6 * clutter + 1))):
        p0 = rng.uniform([-0.2 * w, -0.2 * h], [1.2 * w, 1.2 * h])
        p1 = rng.uniform([-0.2 * w, -0.2 * h], [1.2 * w, 1.2 * h])
        cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1),
                 _random_color(rng).tolist(), int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 3 * clutter + 1))):
        n = int(rng.integers(4, 10))
        steps = rng.normal(0, rng.uniform(8, 30), (n, 2))
        pts = rng.uniform([0, 0], [w, h]) + np.cumsum(steps, axis=0)
        cv2.polylines(img, [np.round(pts).astype(np.int32)], False, _random_color(rng).tolist(),
                      int(rng.integers(1, 4)))
    return np.clip(img, 0, 255)


def _rasterize(contours: list[np.ndarray], holes: list[np.ndarray], outline: int, origin: np.ndarray,
               shape: tuple[int, int]) -> np.ndarray:
    """uint8 anti-aliased coverage [h, w] of the shape (pixel coords relative to `origin`)."""
    alpha = np.zeros(shape, np.uint8)
    fixed = [np.round((c - origin) * 16).astype(np.int32) for c in contours]
    fixed_holes = [np.round((c - origin) * 16).astype(np.int32) for c in holes]
    if outline > 0:
        cv2.polylines(alpha, fixed + fixed_holes, True, 255, outline, cv2.LINE_AA, 4)
    else:
        cv2.fillPoly(alpha, fixed, 255, cv2.LINE_AA, 4)
        if fixed_holes:
            cv2.fillPoly(alpha, fixed_holes, 0, cv2.LINE_AA, 4)
    return alpha


def visible_annotations(owner: np.ndarray, full_areas: Sequence[int], min_visible_fraction: float,
                        regions: Sequence[tuple[int, int, int, int] | None] | None = None
                        ) -> list[tuple[int, list[float], int]]:
    """Annotations from an ownership map: which object each pixel shows (-1 = none).

    Object k's visible pixels are those with owner == k; it gets an annotation
    when they are at least `min_visible_fraction` of `full_areas[k]` (its whole
    mask, wherever it fell) and their box is at least 2 px on each side.
    `regions[k]` (optional, x0, y0, x1, y1) bounds where object k can be, to
    search less. Returns [(k, [x, y, w, h], visible_pixels)] in object order;
    the box covers the visible pixels (pixel i spans [i, i + 1)).
    """
    out = []
    counts = np.bincount(owner.ravel() + 1, minlength=len(full_areas) + 1)[1:]
    for k, full in enumerate(full_areas):
        visible = int(counts[k])
        if full <= 0 or visible == 0 or visible < min_visible_fraction * full:
            continue
        rx, ry = 0, 0
        window = owner
        if regions is not None and regions[k] is not None:
            rx, ry, rx1, ry1 = regions[k]
            window = owner[ry:ry1, rx:rx1]
        ys, xs = np.nonzero(window == k)
        x0, x1 = int(xs.min()) + rx, int(xs.max()) + 1 + rx
        y0, y1 = int(ys.min()) + ry, int(ys.max()) + 1 + ry
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        out.append((k, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], visible))
    return out


def _size_sampler(cfg: SyntheticConfig, rng: np.random.Generator):
    """A function drawing one object's longer side from `rng` as the config says."""
    forward, inverse = (math.log, math.exp) if cfg.size_distribution == "log" else (math.sqrt, lambda t: t ** 2)
    edges = [forward(e) for e in (cfg.min_object_size, *cfg.size_bands, cfg.max_object_size)]
    if len(edges) == 2:  # one band: a single draw per object (as before size_bands existed)
        return lambda: inverse(rng.uniform(edges[0], edges[1]))

    def draw() -> float:
        band = int(rng.integers(0, len(edges) - 1))
        return inverse(rng.uniform(edges[band], edges[band + 1]))
    return draw


def render_synthetic_image(config: SyntheticConfig, split: str, index: int
                           ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render image `index` of `split`: (RGB uint8 [H, W, 3], [{category_id, bbox, area}]).

    Depends only on (config, split, index): this is what the generator writes.
    """
    cfg = config.normalized()
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), _SPLIT_CODES[split], int(index)]))
    nh, nw = cfg.image_size
    h = max(32, int(round(nh * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter))))
    w = max(32, int(round(nw * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter))))
    img = _background(rng, h, w, cfg.clutter)
    owner = np.full((h, w), -1, np.int32)
    full_areas: list[int] = []
    regions: list[tuple[int, int, int, int] | None] = []
    categories: list[int] = []
    placed: list[tuple[float, float, float, float]] = []
    draw_size = _size_sampler(cfg, rng)

    for k in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        cat = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
        outer, holes = _template(SYNTHETIC_CLASSES[cat], rng)
        warped = _warp_points(outer + holes, rng, cfg)
        outer, holes = warped[:len(outer)], warped[len(outer):]
        size = draw_size()
        pts = np.concatenate(outer, axis=0)
        pmin, pmax = pts.min(0), pts.max(0)
        scale = size / float(max(pmax - pmin))
        bw, bh = (pmax - pmin) * scale
        # A few placement tries, keeping the one that overlaps earlier objects least.
        best, best_overlap = None, math.inf
        for _ in range(4):
            cx = rng.uniform(0.3 * bw, max(w - 0.3 * bw, 0.3 * bw + 1))
            cy = rng.uniform(0.3 * bh, max(h - 0.3 * bh, 0.3 * bh + 1))
            box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
            overlap = max((_intersection(box, b) / max(bw * bh, 1e-6) for b in placed), default=0.0)
            if overlap < best_overlap:
                best, best_overlap = (cx, cy), overlap
            if overlap < 0.3:
                break
        cx, cy = best
        center = (pmin + pmax) / 2
        to_px = lambda c: (c - center) * scale + np.array([cx, cy])  # noqa: E731
        outer, holes = [to_px(c) for c in outer], [to_px(c) for c in holes]
        placed.append((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))

        # Rasterise into a local canvas around the object (it may extend past the image).
        allp = np.concatenate(outer, axis=0)
        ox, oy = int(math.floor(allp[:, 0].min())) - 3, int(math.floor(allp[:, 1].min())) - 3
        lw, lh = int(math.ceil(allp[:, 0].max())) + 4 - ox, int(math.ceil(allp[:, 1].max())) + 4 - oy
        origin = np.array([ox, oy], np.float64)
        outline = 0
        if size >= 20 and rng.random() < 0.2:
            outline = max(2, int(round(size * rng.uniform(0.07, 0.12))))
        alpha = _rasterize(outer, holes, outline, origin, (lh, lw))
        if outline == 0 and size >= 16 and rng.random() < 0.25:
            border = _rasterize(outer, holes, int(rng.integers(1, 3)), origin, (lh, lw))
        else:
            border = None
        mask = alpha >= 128
        if border is not None:
            mask |= border >= 128

        # The part of the local canvas inside the image.
        x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + lw, w), min(oy + lh, h)
        full_areas.append(int(np.count_nonzero(mask)))
        categories.append(cat + 1)
        if x1 <= x0 or y1 <= y0:
            regions.append(None)
            continue
        regions.append((x0, y0, x1, y1))
        sl_local = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
        region = img[y0:y1, x0:x1]
        a = alpha[sl_local].astype(np.float32)[..., None] / 255.0
        below = region[a[..., 0] > 0.5]
        bg_mean = below.mean(0) if len(below) else region.reshape(-1, 3).mean(0)
        c1 = _contrasting_color(rng, bg_mean)
        style = rng.random()
        if style < 0.5 or size < 16:
            layer = np.broadcast_to(c1, region.shape)
        elif style < 0.85:
            c2 = np.clip(c1 + rng.uniform(-70, 70, 3), 0, 255).astype(np.float32)
            t = _linear_ramp(y1 - y0, x1 - x0, rng.uniform(0, 2 * math.pi))[..., None]
            layer = c1 * (1 - t) + c2 * t
        else:
            layer = _pattern(rng, y1 - y0, x1 - x0, c1, _contrasting_color(rng, c1, 60.0))
        region[:] = region * (1 - a) + layer * a
        if border is not None:
            b = border[sl_local].astype(np.float32)[..., None] / 255.0
            region[:] = region * (1 - b) + _contrasting_color(rng, c1, 80.0) * b
        owner[y0:y1, x0:x1][mask[sl_local]] = k

    # Thin lines over everything (not annotated, small enough not to change the boxes).
    for _ in range(int(rng.integers(0, 2 * cfg.clutter + 1))):
        p0 = rng.uniform([0, 0], [w, h])
        p1 = rng.uniform([0, 0], [w, h])
        cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1),
                 _random_color(rng).tolist(), 1)
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.5, 1.0))
    # Uniform pixel noise (standard deviation up to 8; cheaper to draw than Gaussian noise).
    noise = rng.random((h, w, 3), dtype=np.float32)
    noise -= 0.5
    noise *= rng.uniform(0, 8 * math.sqrt(12))
    img += noise
    img += 0.5  # round to nearest below
    np.clip(img, 0, 255, out=img)
    image = img.astype(np.uint8)

    anns = [{"category_id": categories[k], "bbox": bbox, "area": float(vis)}
            for k, bbox, vis in visible_annotations(owner, full_areas, cfg.min_visible_fraction, regions)]
    return image, anns


def _intersection(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    return max(iw, 0.0) * max(ih, 0.0)


# --------------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------------

def _file_name(index: int, fmt: str) -> str:
    return f"{index:06d}.{fmt}"


def _render_and_save(task: tuple[SyntheticConfig, str, int, str]) -> tuple[int, int, int, list[dict[str, Any]]]:
    cfg, split, index, out_dir = task
    image, anns = render_synthetic_image(cfg, split, index)
    path = os.path.join(out_dir, _file_name(index, cfg.image_format))
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if cfg.image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write {path}")
    return index, image.shape[0], image.shape[1], anns


def _pool_context():
    # fork starts workers in milliseconds; elsewhere (macOS, Windows) use spawn.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _write_split(cfg: SyntheticConfig, root: Path, split: str, count: int, workers: int) -> Path:
    """Render and write one split's images and its annotation JSON. Progress: a tqdm bar of the
    images on stderr, on rank 0 only and only when stderr is a terminal (tqdm's disable=None)."""
    image_dir, ann_file = synthetic_paths(root, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tasks = [(cfg, split, i, str(image_dir)) for i in range(count)]
    progress = {"total": count, "desc": f"synthetic {split} images", "unit": "img",
                "disable": None if comm.is_main_process() else True}
    if workers <= 1 or count < 8:
        results = [_render_and_save(t) for t in tqdm(tasks, **progress)]
    else:
        with _pool_context().Pool(min(workers, count)) as pool:
            chunksize = max(1, min(32, count // (4 * workers)))
            results = list(tqdm(pool.imap(_render_and_save, tasks, chunksize=chunksize), **progress))
    images, annotations = [], []
    for index, h, w, anns in sorted(results, key=lambda r: r[0]):
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(index, cfg.image_format), "width": w, "height": h})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": a["category_id"],
                                "bbox": a["bbox"], "area": a["area"], "iscrowd": 0})
    data = {
        "info": {"description": f"detkit synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTHETIC_CLASSES)],
    }
    with open(ann_file, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    return ann_file


def _generate(cfg: SyntheticConfig, root: Path, workers: int | None) -> float:
    start = time.perf_counter()
    workers = _default_workers() if workers is None else max(1, int(workers))
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        _write_split(cfg, root, split, count, workers)
    seconds = time.perf_counter() - start
    manifest = {"generator": "detkit.data.synthetic", "version": GENERATOR_VERSION, "config": cfg.to_json(),
                "class_names": list(SYNTHETIC_CLASSES), "generation_seconds": round(seconds, 3)}
    with open(root / _MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return seconds


def _paths_dict(root: Path) -> dict[str, Path]:
    train_images, train_ann = synthetic_paths(root, "train")
    val_images, val_ann = synthetic_paths(root, "val")
    return {"root": root, "train_images": train_images, "train_annotations": train_ann,
            "val_images": val_images, "val_annotations": val_ann, "manifest": root / _MANIFEST}


def generate_synthetic_coco(root: str | os.PathLike, num_train: int, num_val: int,
                            image_size: tuple[int, int] | int, seed: int, *, workers: int | None = None,
                            **options: Any) -> dict[str, Path]:
    """Write a synthetic shapes dataset into `root` (created; existing files are overwritten).

    `image_size` is the nominal (height, width) or an int for square images;
    other `SyntheticConfig` fields can be passed as keyword options.
    `workers`: processes to render with (None: one per available core; 0/1:
    in this process); the output does not depend on it. The manifest is
    written last. Returns the paths: root, train_images, train_annotations,
    val_images, val_annotations, manifest.
    """
    cfg = SyntheticConfig(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                          **options).normalized()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _generate(cfg, root, workers)
    return _paths_dict(root)


def _manifest_matches(root: Path, cfg: SyntheticConfig) -> bool:
    try:
        with open(root / _MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("config") != cfg.to_json():
        return False
    for split in ("train", "val"):
        image_dir, ann_file = synthetic_paths(root, split)
        if not ann_file.is_file() or not image_dir.is_dir():
            return False
    return True


_OWN_ENTRIES = {"train", "val", "annotations", _MANIFEST}


def ensure_synthetic_dataset(root: str | os.PathLike | None = None, config: SyntheticConfig | None = None, *,
                             workers: int | None = None, verbose: bool = True, **overrides: Any) -> Path:
    """The synthetic dataset folder `root`, generated first if it is missing, incomplete or stale.

    `root` defaults to `default_synthetic_root()`; `config` (default
    `SyntheticConfig()`) with `overrides` applied (field=value) says what to
    generate. The folder is reused when its manifest records the same
    configuration and `GENERATOR_VERSION`; otherwise it is generated into a
    temporary sibling folder that is then renamed to `root` (an existing stale
    or incomplete `root` is replaced: it must contain only what this generator
    writes, else this refuses with a ValueError rather than delete anything).
    A lock file next to `root` (`.<name>.lock`, a filelock.FileLock, no timeout)
    makes concurrent callers wait for one generation, which the others then reuse.
    `verbose`: log the start and the end of a generation (INFO, logger
    "detkit.data.synthetic").
    """
    root = Path(root) if root is not None else default_synthetic_root()
    cfg = dataclasses.replace(config or SyntheticConfig(), **overrides).normalized()
    if _manifest_matches(root, cfg):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if _manifest_matches(root, cfg):  # another process generated it while we waited
            return root
        # Leftovers of killed generations (safe to remove: we hold the lock).
        for stale in root.parent.glob(f".{root.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.parent.glob(f".{root.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():
            foreign = sorted(set(os.listdir(root)) - _OWN_ENTRIES) if root.is_dir() else [root.name]
            if foreign:
                raise ValueError(f"refusing to regenerate the synthetic dataset in {root}: it holds other "
                                 f"files ({', '.join(foreign[:3])}); pass an empty or dedicated folder")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        if verbose:
            logger.info("generating synthetic dataset (%d train / %d val images) into %s", cfg.num_train,
                        cfg.num_val, root)
        try:
            seconds = _generate(cfg, tmp, workers)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
        os.rename(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if verbose:
            logger.info("synthetic dataset ready in %.1f s", seconds)
    return root
