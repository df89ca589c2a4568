"""The options of the synthetic shapes generator: `SyntheticConfig`, one definition for the
generator (`detkit.data.synthetic`, which stores it in a dataset's manifest) and for the
schema of a data config's `generator` node (`detkit.config.schemas`, which types
configs/data/synthetic*.yaml with it).

This module imports nothing but the standard library (no torch, numpy or OpenCV), and the
package face `detkit/data/__init__.py` imports none of detkit.data's modules, so that the
config schemas load without torch (the tools answer a bad command line before torch loads).
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["SyntheticConfig"]


@dataclass
class SyntheticConfig:
    """Everything that determines a synthetic shapes dataset (stored in its manifest): the
    options of the generator (`detkit.data.synthetic`), and the schema of a data config's
    `generator` node (`detkit.config.schemas`), so the field types are ones OmegaConf checks.

    Defaults are sized for the default CPU training run: 2500 training and 250
    validation images of about 256 px.
    """

    num_train: int = 2500
    num_val: int = 250
    #: Nominal (height, width); an int means square (Any: OmegaConf has no type for "an int or a
    #: pair"; `normalized` checks it).
    image_size: Any = 256
    seed: int = 0
    #: Each image side is the nominal one times U(1 - size_jitter, 1 + size_jitter)
    #: (0.25: 192..320 px for 256), giving both wide and tall images.
    size_jitter: float = 0.25
    #: Objects per image, uniform in [min_objects, max_objects].
    min_objects: int = 2
    max_objects: int = 9
    #: Longer side of an object's (unoccluded) box in pixels, drawn in
    #: [min_object_size, max_object_size] as `size_distribution` says.
    min_object_size: float = 8.0
    max_object_size: float = 90.0
    #: Largest anisotropic stretch (aspect ratio factor) applied to a shape.
    max_stretch: float = 1.8
    #: Amplitude of the elastic warp in template units (the template spans ~2).
    deformation: float = 0.12
    #: Largest perspective coefficient (0 disables the perspective warp).
    perspective: float = 0.25
    #: Objects with a smaller visible fraction of their mask are not annotated.
    min_visible_fraction: float = 0.3
    #: Background clutter amount (0 = plain gradient backgrounds, 1 = default).
    clutter: float = 1.0
    #: "jpg" (quality 92) or "png".
    image_format: str = "jpg"
    #: How the longer side is drawn: "sqrt" (sqrt(size) uniform: median about 38 px for
    #: 8..90) or "log" (log(size) uniform: as many objects in each octave of sizes).
    size_distribution: str = "sqrt"
    #: Largest bend in degrees (0: none, at most 90): each object's template is bent along a
    #: circular arc whose angle is uniform in [-max_bend, max_bend], about a random one of its
    #: two axes, before the elastic warp (90: a straight bar becomes a quarter ring).
    max_bend: float = 0.0
    #: Cut points that split [min_object_size, max_object_size] into size bands (empty: one
    #: band). Each object first picks a band uniformly at random, then its size in that band
    #: as `size_distribution` says, so every band gets the same share of the objects
    #: (e.g. (60, 170): as many small, medium and large objects whatever the bands' widths).
    size_bands: tuple[float, ...] = ()

    def normalized(self) -> SyntheticConfig:
        """A copy with image_size as a (height, width) tuple, validated."""
        size = self.image_size
        if isinstance(size, numbers.Integral):
            size = (int(size), int(size))
        size = tuple(int(s) for s in size)
        bands = tuple(float(b) for b in self.size_bands)
        edges = (float(self.min_object_size), *bands, float(self.max_object_size))
        if bands and any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"size_bands must increase strictly between min_object_size and max_object_size; "
                             f"got {list(self.size_bands)} for {self.min_object_size}..{self.max_object_size}")
        if len(size) != 2 or min(size) < 32:
            raise ValueError(f"image_size must be an int or (height, width), each >= 32; got {self.image_size!r}")
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("num_train and num_val must be >= 0")
        if not 0 <= self.size_jitter < 1:
            raise ValueError(f"size_jitter must be in [0, 1); got {self.size_jitter}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects; got {self.min_objects}, {self.max_objects}")
        if not 2 <= self.min_object_size <= self.max_object_size:
            raise ValueError("need 2 <= min_object_size <= max_object_size")
        if self.max_stretch < 1:
            raise ValueError("max_stretch must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png'; got {self.image_format!r}")
        if self.size_distribution not in _SIZE_DISTRIBUTIONS:
            raise ValueError(f"size_distribution must be one of {list(_SIZE_DISTRIBUTIONS)}; "
                             f"got {self.size_distribution!r}")
        if not 0 <= self.max_bend <= 90:
            # Up to 90 degrees the arc's radius (2 / angle >= 1.27) stays above the template's
            # half-width (<= 1), so no shape folds over itself.
            raise ValueError(f"max_bend must be in [0, 90] degrees; got {self.max_bend}")
        return replace(self, image_size=size, size_bands=bands, max_bend=float(self.max_bend))

    def to_json(self) -> dict[str, Any]:
        """The normalised configuration as plain JSON types (what the manifest stores).

        Options added after version 2's datasets were first written are left out while
        they have their default value (which renders exactly what those datasets hold), so
        the manifests of existing caches still match.
        """
        data = json.loads(json.dumps(asdict(self.normalized())))
        for name, default in _LATER_OPTIONS.items():
            if data[name] == default:
                del data[name]
        return data


_SIZE_DISTRIBUTIONS = ("sqrt", "log")
#: Fields added without a GENERATOR_VERSION bump -> the default that renders as before them.
_LATER_OPTIONS: dict[str, Any] = {"size_distribution": "sqrt", "max_bend": 0.0, "size_bands": []}
