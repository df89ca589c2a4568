"""Synthetic shapes generator: determinism, COCO validity, occlusion filter, cache behaviour."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

import detkit.data.synthetic as synthetic
from detkit.data.synthetic import (
    SYNTHETIC_CLASSES,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    render_synthetic_image,
    synthetic_paths,
    visible_annotations,
)
from detkit.data.synthetic_config import SyntheticConfig

from tests.helpers import FakeTerminal

# Small but complete: every feature of the default generator, on small images.
TINY = dict(image_size=(96, 128), min_object_size=8, max_object_size=56)


def _generate(root: Path, seed: int = 3, workers: int = 1, num_train: int = 16, num_val: int = 4, **kw):
    return generate_synthetic_coco(root, num_train=num_train, num_val=num_val, seed=seed, workers=workers,
                                   **{**TINY, **kw})


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return _generate(tmp_path_factory.mktemp("synthetic") / "ds", seed=3, workers=1, num_train=24, num_val=6)


def test_same_seed_is_byte_identical_whatever_the_worker_count(tiny, tmp_path):
    other = _generate(tmp_path / "again", seed=3, workers=2, num_train=24, num_val=6)
    for key in ("train_annotations", "val_annotations"):
        assert tiny[key].read_bytes() == other[key].read_bytes()
    names = sorted(os.listdir(tiny["train_images"]))
    assert names == sorted(os.listdir(other["train_images"])) and len(names) == 24
    for name in names[:5]:
        np.testing.assert_array_equal(_read_rgb(tiny["train_images"] / name), _read_rgb(other["train_images"] / name))


def test_different_seed_differs(tiny, tmp_path):
    other = _generate(tmp_path / "other", seed=4, num_train=24, num_val=6)
    assert tiny["train_annotations"].read_bytes() != other["train_annotations"].read_bytes()
    a = _read_rgb(tiny["train_images"] / "000000.jpg")
    b = _read_rgb(other["train_images"] / "000000.jpg")
    assert a.shape != b.shape or np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_render_is_a_function_of_config_split_and_index():
    cfg = SyntheticConfig(seed=11, **TINY)
    img1, anns1 = render_synthetic_image(cfg, "train", 5)
    img2, anns2 = render_synthetic_image(cfg, "train", 5)
    np.testing.assert_array_equal(img1, img2)
    assert anns1 == anns2
    img3, _ = render_synthetic_image(cfg, "val", 5)
    assert img1.shape != img3.shape or not np.array_equal(img1, img3)


@pytest.mark.parametrize("split", ["train", "val"])
def test_json_is_valid_coco_with_boxes_inside_images(tiny, split):
    image_dir, ann_file = synthetic_paths(tiny["root"], split)
    coco = COCO(str(ann_file))
    assert sorted(coco.cats) == list(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert [coco.cats[i + 1]["name"] for i in range(len(SYNTHETIC_CLASSES))] == list(SYNTHETIC_CLASSES)
    assert sorted(coco.imgs) == list(range(1, len(coco.imgs) + 1))
    nh, nw = TINY["image_size"]
    for img in coco.imgs.values():
        h, w = img["height"], img["width"]
        assert round(0.75 * nh) <= h <= round(1.25 * nh) and round(0.75 * nw) <= w <= round(1.25 * nw)
        assert _read_rgb(image_dir / img["file_name"]).shape == (h, w, 3)
    anns = coco.dataset["annotations"]
    assert len(anns) >= len(coco.imgs)  # several objects per image, most of them annotated
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        img = coco.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w >= 2 and h >= 2
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert 1 <= a["category_id"] <= len(SYNTHETIC_CLASSES)
        assert a["iscrowd"] == 0
        assert 0 < a["area"] <= w * h


def test_all_classes_occur_and_sizes_vary(tiny):
    coco = COCO(str(tiny["train_annotations"]))
    anns = coco.dataset["annotations"]
    assert {a["category_id"] for a in anns} == set(range(1, len(SYNTHETIC_CLASSES) + 1))
    longer = np.array([max(a["bbox"][2:]) for a in anns])
    assert longer.min() < 20 and longer.max() > 35
    widths = [img["width"] / img["height"] for img in coco.imgs.values()]
    assert min(widths) < 1.0 < max(widths) or len(set(widths)) > 1


def test_visible_annotations_filters_occluded_objects():
    owner = np.full((20, 30), -1, np.int32)
    owner[2:12, 3:13] = 0   # object 0: its whole 100-pixel mask is visible
    owner[5:7, 20:25] = 1   # object 1: 10 of its 100 pixels are visible (the rest covered)
    owner[10:18, 15:20] = 2  # object 2: 40 of its 100 pixels: exactly at a 0.4 threshold
    anns = visible_annotations(owner, [100, 100, 100], min_visible_fraction=0.3)
    assert [k for k, _, _ in anns] == [0, 2]
    assert anns[0][1] == [3.0, 2.0, 10.0, 10.0] and anns[0][2] == 100
    assert anns[1][1] == [15.0, 10.0, 5.0, 8.0] and anns[1][2] == 40
    assert [k for k, _, _ in visible_annotations(owner, [100, 100, 100], 0.41)] == [0]
    # Search windows give the same result.
    regions = [(0, 0, 15, 15), (18, 3, 27, 9), (14, 9, 21, 19)]
    assert visible_annotations(owner, [100, 100, 100], 0.3, regions) == anns
    # A box under 2 px on a side is dropped however visible it is.
    thin = np.full((5, 5), -1, np.int32)
    thin[1:4, 2] = 0
    assert visible_annotations(thin, [3], 0.3) == []


def test_occlusion_filter_in_rendering():
    """The visibility threshold only removes annotations: same pixels, a subset of the boxes."""
    kept_all = removed = 0
    for index in range(12):
        cfg0 = SyntheticConfig(seed=5, min_objects=6, max_objects=9, min_visible_fraction=0.0, **TINY)
        cfg3 = SyntheticConfig(seed=5, min_objects=6, max_objects=9, min_visible_fraction=0.3, **TINY)
        img0, anns0 = render_synthetic_image(cfg0, "train", index)
        img3, anns3 = render_synthetic_image(cfg3, "train", index)
        np.testing.assert_array_equal(img0, img3)
        boxes0 = [tuple(a["bbox"]) for a in anns0]
        assert all(tuple(a["bbox"]) in boxes0 for a in anns3)
        # Fully visible objects survive any threshold up to 1; partly hidden ones are removed there.
        _, anns1 = render_synthetic_image(
            SyntheticConfig(seed=5, min_objects=6, max_objects=9, min_visible_fraction=1.0, **TINY), "train", index)
        assert len(anns1) <= len(anns3) <= len(anns0)
        kept_all += len(anns0)
        removed += len(anns0) - len(anns3)
    assert removed > 0, "no object was ever occluded below 30% in 12 crowded images"
    assert removed < kept_all


def test_config_validation():
    with pytest.raises(ValueError, match=r"image_size must be .* each >= 32; got 16"):
        SyntheticConfig(image_size=16).normalized()
    with pytest.raises(ValueError, match=r"need 1 <= min_objects <= max_objects; got 5, 2"):
        SyntheticConfig(min_objects=5, max_objects=2).normalized()
    with pytest.raises(ValueError, match=r"image_format must be 'jpg' or 'png'; got 'gif'"):
        SyntheticConfig(image_format="gif").normalized()
    assert SyntheticConfig(image_size=200).normalized().image_size == (200, 200)


# ---------------------------------------------------------------------------------- cache

CACHE_CFG = SyntheticConfig(num_train=6, num_val=2, seed=1, **TINY)


def _mtimes(root: Path) -> dict[str, int]:
    return {p: (root / p).stat().st_mtime_ns for p in
            ("manifest.json", "annotations/instances_train.json", "train/000000.jpg")}


def test_cache_reused_then_regenerated_on_change(tmp_path, monkeypatch):
    root = tmp_path / "cache" / "shapes"
    assert ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False) == root
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == synthetic.GENERATOR_VERSION
    assert manifest["config"]["seed"] == 1 and manifest["config"]["image_size"] == [96, 128]
    before = _mtimes(root)
    train_json = (root / "annotations/instances_train.json").read_bytes()

    calls = []
    real_generate = synthetic._generate
    monkeypatch.setattr(synthetic, "_generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    assert ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False) == root
    assert calls == [] and _mtimes(root) == before

    # A changed parameter regenerates (through an override too).
    ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False, seed=2)
    assert len(calls) == 1
    assert json.loads((root / "manifest.json").read_text())["config"]["seed"] == 2
    assert (root / "annotations/instances_train.json").read_bytes() != train_json
    # ... and going back regenerates the original bytes exactly.
    ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)
    assert len(calls) == 2
    assert (root / "annotations/instances_train.json").read_bytes() == train_json
    assert not list(root.parent.glob(".shapes.tmp-*")) and not list(root.parent.glob(".shapes.old-*"))


def test_incomplete_folder_is_regenerated(tmp_path):
    root = tmp_path / "shapes"
    # A folder a killed generation might leave: images and JSON but no manifest.
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text("{")
    # ... and a stale temporary folder from another killed run.
    (tmp_path / ".shapes.tmp-999999").mkdir()
    ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)
    assert (root / "manifest.json").is_file()
    assert COCO(str(root / "annotations" / "instances_train.json")).imgs
    assert len(os.listdir(root / "train")) == CACHE_CFG.num_train
    assert not (tmp_path / ".shapes.tmp-999999").exists()
    # A version bump invalidates the cache as well.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = -1
    (root / "manifest.json").write_text(json.dumps(manifest))
    ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)
    assert json.loads((root / "manifest.json").read_text())["version"] == synthetic.GENERATOR_VERSION


def test_killed_generation_leaves_no_complete_looking_dataset(tmp_path, monkeypatch):
    root = tmp_path / "shapes"

    def dies(cfg, out, workers):
        (out / "train").mkdir()
        (out / "train" / "000000.jpg").write_bytes(b"partial")
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(synthetic, "_generate", dies)
    with pytest.raises(KeyboardInterrupt, match="interrupted while writing"):
        ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)
    assert not root.exists()
    assert not list(tmp_path.glob(".shapes.tmp-*"))
    monkeypatch.undo()
    ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)
    assert (root / "manifest.json").is_file()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)
    assert (root / "notes.txt").read_text() == "keep me"


def test_a_concurrent_caller_waits_for_the_lock_then_reuses_the_dataset(tmp_path, monkeypatch):
    import threading

    from filelock import FileLock

    root = tmp_path / "shapes"
    returned, calls = [], []
    waiter = threading.Thread(target=lambda: returned.append(
        ensure_synthetic_dataset(root, CACHE_CFG, workers=1, verbose=False)))
    with FileLock(str(tmp_path / ".shapes.lock")):          # another process holds the lock ...
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not root.exists()       # ... so this caller waits
        generate_synthetic_coco(root, CACHE_CFG.num_train, CACHE_CFG.num_val, CACHE_CFG.image_size,
                                CACHE_CFG.seed, workers=1, **{k: v for k, v in TINY.items() if k != "image_size"})
        real_generate = synthetic._generate
        monkeypatch.setattr(synthetic, "_generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    waiter.join(60)
    assert not waiter.is_alive() and returned == [root]
    assert calls == []                                        # it reused what the holder generated
    assert (tmp_path / ".shapes.lock").exists()               # the lock file stays (waiters share its inode)


def test_generation_is_logged_not_printed(tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="detkit.data.synthetic"):
        ensure_synthetic_dataset(tmp_path / "shapes", CACHE_CFG, workers=1)
        ensure_synthetic_dataset(tmp_path / "quiet", CACHE_CFG, workers=1, verbose=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "detkit.data.synthetic"]
    assert len(messages) == 2 and messages[0].startswith("generating synthetic dataset (6 train / 2 val images)")
    assert str(tmp_path / "shapes") in messages[0] and messages[1].startswith("synthetic dataset ready in")
    out, err = capsys.readouterr()
    assert out == "" and err == ""                            # stderr is no terminal here: no progress bar


@pytest.mark.parametrize("main_process", [True, False])
def test_progress_bar_on_a_terminal_on_rank_0_only(tmp_path, monkeypatch, main_process):
    import detkit.utils.comm as dist

    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(dist, "is_main_process", lambda: main_process)
    _generate(tmp_path / "shapes", num_train=3, num_val=2)
    if main_process:
        assert "synthetic train images" in terminal.text and "3/3" in terminal.text and "2/2" in terminal.text
    else:
        assert terminal.text == ""
