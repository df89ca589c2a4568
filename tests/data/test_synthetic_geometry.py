"""configs/data/synthetic_geometry.yaml and the generator options it uses (bend, log-uniform
sizes, size bands): the val split's COCO size buckets and scale range for its fixed seed
(the numbers docs/ablations.md gives), what each option does, and that the options at their
defaults leave the default datasets exactly as they were before the options existed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

import detkit.data.synthetic as synthetic
from detkit.config.compose import CONFIG_DIR, check_config
from detkit.data.synthetic import render_synthetic_image
from detkit.data.synthetic_config import SyntheticConfig
from detkit.config.build import build_data_source
from detkit.data.sources import synthetic_generator_config

SMALL, LARGE = 32 ** 2, 96 ** 2        # COCOeval's area ranges: small < 32^2 <= medium <= 96^2 < large
GEOMETRY = CONFIG_DIR / "data" / "synthetic_geometry.yaml"
# The full val split's buckets for seed 0, as docs/ablations.md reports them.
DOCUMENTED_VAL = {"objects": 951, "small": 288, "medium": 342, "large": 321,
                  "longer_min": 17.0, "longer_max": 321.0, "longer_p5": 25.0, "longer_p95": 270.0}


def _geometry_config() -> SyntheticConfig:
    return synthetic_generator_config(OmegaConf.load(GEOMETRY).get("generator"))


def _buckets(areas) -> tuple[int, int, int]:
    a = np.asarray(areas)
    return int((a < SMALL).sum()), int(((a >= SMALL) & (a <= LARGE)).sum()), int((a > LARGE).sum())


@pytest.fixture(scope="module")
def val_split() -> list[tuple[tuple[int, int], list[dict]]]:
    """(image shape, annotations) of every val image of the config (300 renders, ~5 s)."""
    cfg = _geometry_config()
    out = []
    for i in range(cfg.num_val):
        image, anns = render_synthetic_image(cfg, "val", i)
        out.append((image.shape[:2], anns))
    return out


# ------------------------------------------------------------------------------- the config

def test_config_composes_and_is_fixed_by_seed():
    cfg = check_config("train", ["data=synthetic_geometry"])
    assert cfg.data.kind == "synthetic" and cfg.data.num_classes == 9
    gen = synthetic_generator_config(cfg.data.get("generator"))
    assert gen == _geometry_config()
    assert gen.seed == 0 and gen.num_val == 300 and gen.num_train == 3000
    assert gen.size_distribution == "log" and gen.size_bands == (56.0, 180.0) and gen.max_bend > 0
    # Its own cache folder: switching between data=synthetic and this never regenerates either.
    default = OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml")
    assert str(cfg.data.root).endswith("/synthetic_geometry")
    assert str(OmegaConf.to_container(default, resolve=True)["root"]) != str(cfg.data.root)
    # Read at 0.5-0.75x (shorter side 192 of 256-384), the CPU model's own resize: nothing is
    # resized twice, and no image's longer side (at most 1.5x its shorter) reaches max_size.
    model = cfg.model.transform_options
    assert (cfg.data.min_size, cfg.data.max_size) == (model.min_size, model.max_size) == (192, 320)
    assert cfg.data.max_size >= 1.5 * cfg.data.min_size


def test_val_split_fills_all_three_coco_size_buckets(val_split):
    areas = [a["area"] for _, anns in val_split for a in anns]
    small, medium, large = _buckets(areas)
    n = len(areas)
    for name, count in (("small", small), ("medium", medium), ("large", large)):
        assert count >= 0.2 * n, f"{name}: {count} of {n} val objects"
    # A subset already holds every bucket (the balance is not an accident of the total).
    sub = _buckets([a["area"] for _, anns in val_split[:100] for a in anns])
    assert min(sub) >= 0.15 * sum(sub), sub
    # Exactly the documented numbers for the fixed seed.
    assert {"objects": n, "small": small, "medium": medium, "large": large} == \
        {k: DOCUMENTED_VAL[k] for k in ("objects", "small", "medium", "large")}


def test_val_split_spans_8x_in_scale_and_stays_in_its_images(val_split):
    longer = np.array([max(a["bbox"][2:]) for _, anns in val_split for a in anns])
    p5, p95 = np.percentile(longer, [5, 95])
    assert longer.max() / longer.min() >= 8 and p95 / p5 >= 8
    assert (longer.min(), longer.max(), p5, p95) == tuple(
        DOCUMENTED_VAL[k] for k in ("longer_min", "longer_max", "longer_p5", "longer_p95"))
    for (h, w), anns in val_split:
        assert 256 <= min(h, w) and max(h, w) <= 384
        for a in anns:
            x, y, bw, bh = a["bbox"]
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
            assert 0 < a["area"] <= bw * bh


def test_config_builds_a_dataset(tmp_path):
    data = OmegaConf.load(GEOMETRY)
    data.root = str(tmp_path / "synthetic_geometry")
    data.generator.num_train, data.generator.num_val = 2, 3
    source = build_data_source(data)
    source.prepare()
    dataset = source.dataset("val", train=False)
    assert len(dataset) == 3
    image, target = dataset[0]
    assert min(image.shape[-2:]) == data.min_size and len(target["boxes"]) > 0


# ---------------------------------------------------------------------------------- bend

def _bar(half_width: float = 0.25) -> np.ndarray:
    return synthetic._densify(np.array([[-1, -half_width], [1, -half_width], [1, half_width], [-1, half_width]],
                                       dtype=np.float64))


def _mask(points: np.ndarray, scale: float = 40.0, size: int = 140) -> np.ndarray:
    return synthetic._rasterize([points * scale + size / 2], [], 0, np.zeros(2), (size, size)) >= 128


def test_bend_maps_the_axis_onto_an_arc():
    u = np.linspace(-1, 1, 41)
    line = np.stack([u, np.zeros_like(u)], axis=1)
    angle = math.radians(70)
    radius = 2 / angle
    bent = synthetic._bend(line, angle, 0)
    # On a circle of radius 2 / angle around (0, -radius), spanning the angle, same length.
    np.testing.assert_allclose(np.hypot(bent[:, 0], bent[:, 1] + radius), radius)
    ends = np.arctan2(bent[[0, -1], 0], bent[[0, -1], 1] + radius)
    assert ends[1] - ends[0] == pytest.approx(angle)
    assert np.hypot(*np.diff(bent, axis=0).T).sum() == pytest.approx(2.0, rel=1e-3)
    # Points off the axis keep their distance from it; the other sign curves the other way;
    # axis 1 is the same bend with x and y swapped; no angle, no change.
    p = _bar()
    np.testing.assert_allclose(np.hypot(*(synthetic._bend(p, angle, 0) + [0, radius]).T),
                               radius + p[:, 1])
    np.testing.assert_allclose(synthetic._bend(p, -angle, 0), synthetic._bend(p * [1, -1], angle, 0) * [1, -1])
    np.testing.assert_allclose(synthetic._bend(p[:, ::-1], angle, 1), synthetic._bend(p, angle, 0)[:, ::-1])
    assert synthetic._bend(p, 0.0, 0) is p


def test_a_bent_shape_differs_from_the_straight_one_and_keeps_its_area():
    straight = _mask(_bar())
    bent = _mask(synthetic._bend(_bar(), math.radians(90), 0))
    assert not bent[0].any() and not bent[-1].any() and not bent[:, 0].any() and not bent[:, -1].any()
    iou = (straight & bent).sum() / (straight | bent).sum()
    assert iou < 0.7
    assert bent.sum() / straight.sum() == pytest.approx(1.0, abs=0.05)   # bending preserves area
    ys, xs = np.nonzero(bent)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    assert straight.sum() / straight.any(0).sum() / straight.any(1).sum() > 0.9
    assert bent.sum() / box < 0.7      # a quarter ring fills much less of its box than a bar


def test_warp_points_bends_first_then_moves_rigidly():
    """With the other warps off, the warped bar is the bent bar moved rigidly, bent by the
    angle and axis drawn first."""
    cfg = SyntheticConfig(max_bend=90, deformation=0.0, perspective=0.0, max_stretch=1.0).normalized()
    bar = _bar()

    def distances(p):
        return np.hypot(*(p[:, None] - p[None]).transpose(2, 0, 1))
    changes = []
    for seed in range(6):
        (warped,) = synthetic._warp_points([bar], np.random.default_rng(seed), cfg)
        twin = np.random.default_rng(seed)
        angle, axis = math.radians(twin.uniform(-90, 90)), int(twin.integers(0, 2))
        expected = synthetic._bend(bar, angle, axis)
        np.testing.assert_allclose(distances(warped), distances(expected), atol=1e-9)
        changes.append(np.abs(distances(warped) - distances(bar)).max())
    # Not rigid as a whole: some draws bend the bar a lot (the end-to-end distance of 2 shrinks).
    assert max(changes) > 0.2, changes


def test_bend_is_validated_and_changes_rendering():
    for bad in (-1, 91):
        with pytest.raises(ValueError, match="max_bend"):
            SyntheticConfig(max_bend=bad).normalized()
    plain = SyntheticConfig(seed=2, image_size=128, max_object_size=60)
    bent = dataclasses.replace(plain, max_bend=90)
    image0, anns0 = render_synthetic_image(plain, "train", 0)
    image1, anns1 = render_synthetic_image(bent, "train", 0)
    assert image0.shape == image1.shape and len(anns1) > 0
    assert not np.array_equal(image0, image1) and anns0 != anns1


# ---------------------------------------------------------------------------------- sizes

def _draws(cfg: SyntheticConfig, n: int = 20000, seed: int = 0) -> np.ndarray:
    draw = synthetic._size_sampler(cfg.normalized(), np.random.default_rng(seed))
    return np.array([draw() for _ in range(n)])


def test_log_sizes_put_half_below_the_geometric_mean():
    lo, hi = 20.0, 320.0
    mid = math.sqrt(lo * hi)    # 80
    log = _draws(SyntheticConfig(min_object_size=lo, max_object_size=hi, size_distribution="log"))
    sqrt = _draws(SyntheticConfig(min_object_size=lo, max_object_size=hi))
    assert lo <= log.min() and log.max() <= hi and lo <= sqrt.min() and sqrt.max() <= hi
    assert (log < mid).mean() == pytest.approx(0.5, abs=0.015)
    # sqrt-uniform: P(size < 80) = (sqrt(80) - sqrt(20)) / (sqrt(320) - sqrt(20)) = 1/3.
    assert (sqrt < mid).mean() == pytest.approx(1 / 3, abs=0.015)
    # Each octave gets the same share under "log" (4 octaves in 20..320).
    octaves = np.histogram(np.log2(log / lo), bins=4, range=(0, 4))[0] / len(log)
    np.testing.assert_allclose(octaves, 0.25, atol=0.015)


def test_size_bands_share_objects_equally():
    cfg = SyntheticConfig(min_object_size=20, max_object_size=320, size_distribution="log", size_bands=(56, 180))
    sizes = _draws(cfg)
    shares = np.histogram(sizes, bins=[20, 56, 180, 320])[0] / len(sizes)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.015)
    # Log-uniform inside a band: half below its geometric mean.
    middle = sizes[(sizes >= 56) & (sizes < 180)]
    assert (middle < math.sqrt(56 * 180)).mean() == pytest.approx(0.5, abs=0.03)
    for bad in ((10, 100), (56, 400), (180, 56), (56, 56)):
        with pytest.raises(ValueError, match="size_bands"):
            dataclasses.replace(cfg, size_bands=bad).normalized()
    with pytest.raises(ValueError, match="size_distribution"):
        SyntheticConfig(size_distribution="uniform").normalized()


def test_log_sizes_shift_the_rendered_buckets_towards_small():
    """Rendered, the same size range gives more small objects log-uniform than sqrt-uniform."""
    base = dataclasses.replace(_geometry_config(), size_bands=())
    shares = {}
    for dist in ("sqrt", "log"):
        cfg = dataclasses.replace(base, size_distribution=dist)
        areas = [a["area"] for i in range(40) for a in render_synthetic_image(cfg, "val", i)[1]]
        small, _, large = _buckets(areas)
        shares[dist] = (small / len(areas), large / len(areas))
    assert shares["log"][0] > shares["sqrt"][0] + 0.08
    assert shares["log"][1] < shares["sqrt"][1]


# ------------------------------------------------------------------- defaults unchanged

def test_default_size_draws_are_the_original_ones():
    """One draw per object, the same value as before size_distribution/size_bands existed."""
    cfg = SyntheticConfig(min_object_size=16, max_object_size=80).normalized()
    draw = synthetic._size_sampler(cfg, np.random.default_rng(7))
    twin = np.random.default_rng(7)
    for _ in range(50):
        assert draw() == twin.uniform(math.sqrt(16), math.sqrt(80)) ** 2
    rng = np.random.default_rng(7)
    draw = synthetic._size_sampler(cfg, rng)
    for _ in range(50):
        draw()
    assert rng.random() == twin.random()


def test_defaults_never_bend(monkeypatch):
    def no_bend(*args):
        raise AssertionError("bend called with max_bend=0")
    monkeypatch.setattr(synthetic, "_bend", no_bend)
    render_synthetic_image(SyntheticConfig(), "train", 0)
    with pytest.raises(AssertionError, match="bend called"):
        render_synthetic_image(SyntheticConfig(max_bend=10), "train", 0)


VERSION_2_KEYS = ["clutter", "deformation", "image_format", "image_size", "max_object_size", "max_objects",
                  "max_stretch", "min_object_size", "min_objects", "min_visible_fraction", "num_train", "num_val",
                  "perspective", "seed", "size_jitter"]


def test_manifest_of_default_configs_is_unchanged():
    """Options at their defaults are not in the manifest, so existing caches stay valid."""
    assert sorted(SyntheticConfig().to_json()) == VERSION_2_KEYS
    default_data = synthetic_generator_config(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml").get("generator"))
    assert sorted(default_data.to_json()) == VERSION_2_KEYS
    explicit = SyntheticConfig(size_distribution="sqrt", max_bend=0, size_bands=[])
    assert explicit.to_json() == SyntheticConfig().to_json()
    geometry = _geometry_config().to_json()
    assert geometry["size_distribution"] == "log" and geometry["size_bands"] == [56.0, 180.0]
    assert geometry["max_bend"] == 90


# Rendered with the generator as it was before the new options (git HEAD of 2026-12-01):
# (config, split, index) -> annotations, sha256 of the RGB array's bytes.
_DATA = dict(num_train=2500, num_val=250, image_size=192, seed=0, max_objects=6, min_object_size=16,
             max_object_size=80, clutter=0.5)   # configs/data/synthetic.yaml's generator
REFERENCE = [
    (_DATA, "train", 0, [(2, [83, 112, 29, 22], 316), (4, [7, 154, 80, 51], 2153), (6, [110, 51, 48, 80], 1393),
                         (8, [66, 139, 58, 45], 1516)],
     "8181f1b0ba2b00347b8c72fe99b72114e78e5fe20e85d05d3121d6b36c49863c"),
    (_DATA, "val", 3, [(8, [22, 193, 41, 33], 818), (1, [22, 100, 47, 50], 1186), (8, [192, 173, 16, 22], 262)],
     "c602eb31918bb2f29f821779b2cfe573c7d37401b6c17b09931c0859d7750692"),
    ({}, "train", 0, [(6, [12, 95, 47, 38], 591), (4, [163, 118, 58, 77], 2107), (6, [23, 109, 80, 84], 2632),
                      (7, [75, 52, 34, 35], 400), (2, [212, 64, 15, 26], 185), (7, [97, 221, 58, 48], 978),
                      (8, [124, 154, 27, 25], 442), (2, [1, 112, 13, 16], 105)],
     "d3177d3659b7a3d5b8c63ad9c9920b391ae2649244cf9e691a92d77c0f2cdcd9"),
    ({}, "val", 3, [(1, [223, 72, 6, 11], 37), (5, [185, 194, 48, 70], 2639), (1, [125, 113, 13, 12], 81),
                    (2, [0, 79, 53, 80], 1841), (4, [240, 215, 16, 11], 91), (5, [4, 209, 50, 59], 1557),
                    (7, [137, 114, 14, 12], 89), (3, [7, 242, 65, 64], 1971)],
     "35b11d31ff2cff68a68c83db89a64766fa2212d70579400f2c9e6bdb177567b4"),
]
# The pixel hashes hold with these (numpy, OpenCV) versions (checked 2026-12-07 with both):
# other builds of OpenCV's float kernels (resize, blur) may round a pixel differently.
HASH_VERSIONS = {("2.4.6", "5.0.0"), ("2.4.6", "5.1.0")}
# With any version, the 8 x 8 grid of per-channel block means of each image
# (tests/data/synthetic_pixel_fingerprints.json, taken from the hashed images) must agree to
# 1 grey level: every pixel rounded differently by 1 moves a block mean by at most 1 (measured:
# 0.2 for random +-1 noise), while the image shifted by one pixel moves one by 5.8-8.4.
FINGERPRINTS = Path(__file__).with_name("synthetic_pixel_fingerprints.json")
FINGERPRINT_TOLERANCE = 1.0


def _block_means(image: np.ndarray, grid: int = 8) -> np.ndarray:
    h, w, _ = image.shape
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    return np.array([[image[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].reshape(-1, 3).astype(np.float64).mean(0)
                      for j in range(grid)] for i in range(grid)])


def test_default_pixels_are_unchanged():
    """Runs with every OpenCV: the block means always, the exact hash where it is known to hold."""
    fingerprints = json.loads(FINGERPRINTS.read_text())
    assert len(fingerprints) == len(REFERENCE)
    exact = (np.__version__, cv2.__version__) in HASH_VERSIONS
    for (options, split, index, _, digest), stored in zip(REFERENCE, fingerprints):
        assert (stored["split"], stored["index"], stored["sha256"]) == (split, index, digest)
        image, _ = render_synthetic_image(SyntheticConfig(**options), split, index)
        assert list(image.shape) == stored["shape"], (options, split, index)
        difference = np.abs(_block_means(image) - np.array(stored["block_means"])).max()
        assert difference <= FINGERPRINT_TOLERANCE, (options, split, index, difference)
        if exact:
            assert hashlib.sha256(image.tobytes()).hexdigest() == digest, (options, split, index)
