"""COCOEvaluator: AP of perfect / rescaled / empty / wrong predictions, per-class AP, gather."""
from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from pycocotools.coco import COCO

from detkit.evaluation import COCOEvaluator, predictions_to_coco
from detkit.evaluation.coco_eval import coco_records
from detkit.evaluation.inference import to_coco_results

CATEGORIES = [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "zebra"}]  # no zebra GT
LABEL_TO_CAT = {1: 2, 2: 5, 3: 9}
CAT_TO_LABEL = {v: k for k, v in LABEL_TO_CAT.items()}


def _make_gt(seed: int = 0, num_images: int = 5) -> COCO:
    """Images 640x480 with 2-5 boxes each of cats and dogs, in all three COCO area ranges."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for k in range(int(rng.integers(2, 6))):
            lo, hi = [(8, 30), (40, 90), (110, 250)][(image_id + k) % 3]  # small, medium, large
            w, h = (float(v) for v in rng.uniform(lo, hi, 2))
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice([2, 5])),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def gt() -> COCO:
    return _make_gt()


def _perfect(gt: COCO, image_id: int, scale: float | tuple[float, float] = 1.0):
    """GT boxes of an image as a model output at `scale` (resized pixels per original pixel)."""
    sx, sy = (scale, scale) if isinstance(scale, float) else scale
    anns = gt.imgToAnns[image_id]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes *= torch.tensor([sx, sy, sx, sy])
    prediction = {"boxes": boxes, "scores": torch.ones(len(anns)),
                  "labels": torch.tensor([CAT_TO_LABEL[a["category_id"]] for a in anns], dtype=torch.int64)}
    target = {"image_id": image_id, "scale": scale, "orig_size": (480, 640)}
    return prediction, target


def _evaluate(gt, pairs, **kw):
    ev = COCOEvaluator(gt, LABEL_TO_CAT, verbose=kw.pop("verbose", False))
    for prediction, target in pairs:
        ev.update([prediction], [target])
    return ev, ev.evaluate()


def test_ground_truth_spans_all_area_ranges(gt):
    areas = [a["area"] for a in gt.dataset["annotations"]]
    assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2 and any(32 ** 2 <= a < 96 ** 2 for a in areas)


def test_perfect_predictions_give_ap_100(gt, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="detkit.evaluation.coco_eval"):
        ev, m = _evaluate(gt, [_perfect(gt, i) for i in gt.imgs], verbose=True)
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl"):
        assert m[key] == pytest.approx(100.0), key
    assert m["bbox/AP-cat"] == pytest.approx(100.0) and m["bbox/AP-dog"] == pytest.approx(100.0)
    assert "bbox/AP-zebra" in m and math.isnan(m["bbox/AP-zebra"])  # no ground truth -> NaN
    # The COCOeval summary is logged (verbose) and kept in `summary`, not printed.
    summary = caplog.text
    assert summary.count("Average Precision") == 6 and summary.count("Average Recall") == 6
    assert ev.summary.count("Average Precision") == 6 and ev.summary.count("Average Recall") == 6
    assert capsys.readouterr().out == ""
    with caplog.at_level(logging.INFO, logger="detkit.evaluation.coco_eval"):
        quiet, _ = _evaluate(gt, [_perfect(gt, i) for i in gt.imgs])
    assert quiet.summary == ev.summary and caplog.text.count("Average Precision") == 6   # verbose=False: not logged


@pytest.mark.parametrize("scale", [0.5, 1.7, (0.5, 0.8)])
def test_boxes_in_resized_pixels_are_mapped_back(gt, scale):
    _, m = _evaluate(gt, [_perfect(gt, i, scale) for i in gt.imgs])
    assert m["bbox/AP"] == pytest.approx(100.0)


def test_ignoring_the_scale_would_fail(gt):
    pairs = []
    for i in gt.imgs:
        prediction, target = _perfect(gt, i, 0.5)
        target["scale"] = 1.0  # claims the boxes are in original pixels
        pairs.append((prediction, target))
    _, m = _evaluate(gt, pairs)
    assert m["bbox/AP"] < 50


def test_empty_predictions_give_zero_not_a_crash(gt):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev, m = _evaluate(gt, [(empty, {"image_id": i, "scale": 0.5}) for i in gt.imgs])
    assert ev.results() == []
    assert m["bbox/AP"] == 0.0 and m["bbox/AP50"] == 0.0
    assert m["bbox/AP-cat"] == 0.0 and m["bbox/AP-dog"] == 0.0


def test_nothing_seen_gives_nan(gt):
    m = COCOEvaluator(gt, LABEL_TO_CAT, verbose=False).evaluate()
    assert set(m) >= {"bbox/AP", "bbox/AP-cat", "bbox/AP-dog", "bbox/AP-zebra"}
    assert all(math.isnan(v) for v in m.values())


def test_wrong_class_lowers_ap(gt):
    pairs = [_perfect(gt, i) for i in gt.imgs]
    _, perfect = _evaluate(gt, pairs)
    prediction, target = pairs[0]
    swapped = dict(prediction, labels=torch.where(prediction["labels"] == 1, 2, 1))
    _, m = _evaluate(gt, [(swapped, target)] + pairs[1:])
    assert m["bbox/AP"] < perfect["bbox/AP"] - 1
    assert m["bbox/AP-cat"] < 100 or m["bbox/AP-dog"] < 100


def test_only_seen_images_are_evaluated(gt):
    _, m = _evaluate(gt, [_perfect(gt, 2), _perfect(gt, 4)])
    assert m["bbox/AP"] == pytest.approx(100.0)


def test_results_format_and_conversion(gt):
    prediction = {"boxes": torch.tensor([[20.0, 10, 60, 50], [1200, 900, 1400, 1000]]),
                  "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([2, 1])}
    ev = COCOEvaluator(gt, LABEL_TO_CAT, verbose=False)
    ev.update([prediction], [{"image_id": 3, "scale": 2.0, "orig_size": (480, 640)}])
    results = ev.results()
    assert [set(r) for r in results] == [{"image_id", "category_id", "bbox", "score"}] * 2
    assert results[0] == {"image_id": 3, "category_id": 5, "bbox": [10.0, 5.0, 20.0, 20.0], "score": 0.9}
    # Divided by the scale, then clipped to the 640x480 original image.
    assert results[1]["bbox"] == [600.0, 450.0, 40.0, 30.0] and results[1]["category_id"] == 2
    entries = predictions_to_coco(prediction, {"image_id": torch.tensor(3)}, LABEL_TO_CAT)
    assert entries[1]["bbox"] == [1200.0, 900.0, 200.0, 100.0]  # no scale, no orig_size: untouched


def test_coco_records_convert_and_round_only_when_asked():
    boxes = np.array([[10.123456, 20.5, 30.0004, 60.25], [0.0, 0.0, 1.0 / 3, 2.0 / 3]])
    scores, labels = np.array([0.123456789, 0.5]), np.array([2, 1])
    exact = coco_records(boxes, scores, labels, LABEL_TO_CAT, file_name="a.jpg")
    assert [list(r) for r in exact] == [["file_name", "category_id", "bbox", "score"]] * 2
    assert exact[0] == {"file_name": "a.jpg", "category_id": 5, "score": 0.123456789,
                        "bbox": [10.123456, 20.5, 30.0004 - 10.123456, 60.25 - 20.5]}
    assert exact[1]["bbox"] == [0.0, 0.0, 1.0 / 3, 2.0 / 3] and exact[1]["category_id"] == 2
    rounded = coco_records(boxes, scores, labels, LABEL_TO_CAT, bbox_digits=3, score_digits=5, image_id=7)
    assert [list(r) for r in rounded] == [["image_id", "category_id", "bbox", "score"]] * 2
    assert rounded[0]["bbox"] == [10.123, 20.5, 19.877, 39.75] and rounded[0]["score"] == 0.12346
    assert rounded[1]["bbox"] == [0.0, 0.0, 0.333, 0.667]
    with pytest.raises(KeyError, match=r"^99$"):
        coco_records(boxes, scores, np.array([2, 99]), LABEL_TO_CAT)
    assert coco_records(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), LABEL_TO_CAT) == []


def test_predictions_json_is_unrounded_and_evaluation_rounded():
    prediction = {"boxes": torch.tensor([[10.1234567, 20.5, 30.0004, 60.25]]),
                  "scores": torch.tensor([0.123456789]), "labels": torch.tensor([2])}
    x1, y1, x2, y2 = prediction["boxes"].double()[0].tolist()
    score = prediction["scores"].tolist()[0]
    [for_json] = to_coco_results(prediction, LABEL_TO_CAT, file_name="a.jpg")
    assert list(for_json) == ["file_name", "category_id", "bbox", "score"]
    assert for_json == {"file_name": "a.jpg", "category_id": 5, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
    [for_eval] = predictions_to_coco(prediction, {"image_id": 3}, LABEL_TO_CAT)
    assert list(for_eval) == ["image_id", "category_id", "bbox", "score"]
    assert for_eval["bbox"] == [round(v, 3) for v in for_json["bbox"]] and for_eval["score"] == round(score, 5)
    assert for_eval["bbox"] != for_json["bbox"] and for_eval["score"] != for_json["score"]


def test_updates_replace_an_image_and_bad_inputs_raise(gt):
    ev = COCOEvaluator(gt, LABEL_TO_CAT, verbose=False)
    wrong = {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "scores": torch.ones(1), "labels": torch.tensor([1])}
    ev.update([wrong], [{"image_id": 1}])
    ev.update([_perfect(gt, 1)[0]], [{"image_id": 1}])  # e.g. a padding duplicate: the last one counts
    assert ev.image_ids == [1] and ev.evaluate()["bbox/AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="image id 999"):
        ev.update([wrong], [{"image_id": 999}])
    with pytest.raises(ValueError, match=r"labels \[0\]"):
        ev.update([dict(wrong, labels=torch.tensor([0]))], [{"image_id": 1}])
    with pytest.raises(ValueError, match=r"category ids \[12345\] are not in the ground truth"):
        COCOEvaluator(gt, {1: 12345})


def _gather_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt = _make_gt()
        ev = COCOEvaluator(gt, LABEL_TO_CAT, verbose=False)
        for image_id in sorted(gt.imgs)[rank::world]:  # disjoint halves of the images
            ev.update(*zip(_perfect(gt, image_id, 0.5)))
        ev.gather()
        m = ev.evaluate()
        torch.save({"ids": ev.image_ids, "ap": m["bbox/AP"], "n": len(ev.results())}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_merges_ranks(gt, tmp_path):
    out = str(tmp_path / "out")
    tmp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["ids"] == sorted(gt.imgs)
        assert r["n"] == len(gt.dataset["annotations"])
        assert r["ap"] == pytest.approx(100.0)


def test_gather_without_process_group_is_a_noop(gt):
    assert not (dist.is_available() and dist.is_initialized())
    ev = COCOEvaluator(gt, LABEL_TO_CAT, verbose=False)
    ev.update(*zip(_perfect(gt, 1)))
    ev.gather()
    assert ev.image_ids == [1]
