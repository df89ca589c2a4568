"""detkit.engine.hooks and detkit.vis.hooks in-process (seconds): the progress line and its
window averages / ETA, checkpoints (period, end, refusal of non-finite weights, resume),
evaluation (period, the final one once, detections.json, metrics.json, train_stats.json),
the order of their effects in a loop, and the sampling-picture hook.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detkit.engine.hooks import CheckpointHook, EvalHook, MetricWriter, ResultsHook, TrainingRun
from detkit.engine.loop import LoopState, Trainer, TrainingDiverged
from detkit.engine.state import resume_training_state, rng_state
from detkit.ops import DeformConv2d
from detkit.vis.draw import sampling_figure
from detkit.vis import hooks as vis_hooks
from detkit.vis.hooks import SamplingPictures, sampling_picture_hooks
from tests.engine.test_loop import TinyRegression, batches, constant, sgd
from tests.vis.builders import build_tiny, randomise_offset_branches, smooth_image

ENGINE = Path(__file__).resolve().parents[2] / "detkit" / "engine"


class FakeWriter:
    """Records add_scalar / add_image calls like a TensorBoard SummaryWriter."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, object, int, str]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, picture, step, dataformats="CHW"):
        self.images.append((tag, picture, step, dataformats))


def step(state: LoopState, iteration: int, losses: dict[str, float], lr: float, iter_time: float,
         data_time: float) -> LoopState:
    state.iteration, state.loss_names, state.loss_values = iteration, list(losses), list(losses.values())
    state.lr, state.iter_time, state.data_time = lr, iter_time, data_time
    return state


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "detkit.train"]


# ------------------------------------------------------------------------------ MetricWriter

def test_metric_writer_averages_over_the_window_and_prints_the_eta(caplog):
    writer = FakeWriter()
    hook = MetricWriter(2, writer)
    state = LoopState(start_iter=0, max_iters=5)
    rows = [({"a": 1.0, "b": 0.5}, 0.01, 10.0, 0.5), ({"a": 3.0, "b": 0.25}, 0.02, 12.0, 1.5),
            ({"a": 5.0, "b": 1.0}, 0.03, 20.0, 0.0), ({"a": 7.0, "b": 1.0}, 0.04, 40.0, 2.0),
            ({"a": 2.0, "b": 2.0}, 0.05, 1.0, 0.25)]
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        for i, (losses, lr, t, d) in enumerate(rows, 1):
            hook.after_step(step(state, i, losses, lr, t, d))
    # Windows {1, 2}, {3, 4} and the last iteration alone; ETA = s/it x iterations left.
    assert messages(caplog) == [
        "iter 2/5  a 2.0000  b 0.3750  total 2.3750  lr 0.02  time 11.000 s/it  data 1.000 s  eta 0:00:33",
        "iter 4/5  a 6.0000  b 1.0000  total 7.0000  lr 0.04  time 30.000 s/it  data 1.000 s  eta 0:00:30",
        "iter 5/5  a 2.0000  b 2.0000  total 4.0000  lr 0.05  time 1.000 s/it  data 0.250 s  eta 0:00:00",
    ]
    at_2 = [(tag, value) for tag, value, s in writer.scalars if s == 2]
    assert at_2 == [("train/a", 2.0), ("train/b", 0.375), ("train/total_loss", 2.375), ("train/lr", 0.02),
                    ("train/time_per_iter", 11.0), ("train/data_time", 1.0)]
    assert sorted({s for _, _, s in writer.scalars}) == [2, 4, 5]


def test_metric_writer_eta_in_hours_and_without_period(caplog):
    hook = MetricWriter(None)  # no writer: the log line only; no period: only the last iteration
    state = LoopState(start_iter=0, max_iters=41)
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        hook.after_step(step(state, 1, {"a": 1.0}, 0.1, 100.0, 0.0))
        assert messages(caplog) == []
        hook.after_step(step(state, 41, {"a": 3.0}, 0.1, 100.0, 0.0))
    assert messages(caplog) == ["iter 41/41  a 2.0000  total 2.0000  lr 0.1  time 100.000 s/it  data 0.000 s  "
                                "eta 0:00:00"]
    hook = MetricWriter(1)
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        hook.after_step(step(LoopState(0, 41), 1, {"a": 1.0}, 0.1, 100.0, 0.0))
    assert messages(caplog)[-1].endswith("eta 1:06:40")  # 40 iterations x 100 s


# ------------------------------------------------------------------------------ CheckpointHook

def checkpoint_setup(tmp_path):
    model = TinyRegression()
    optimizer = sgd(model, momentum=0.9)
    scheduler = constant(optimizer)
    data_state = {"seed": 3, "world_size": 1}
    hook = CheckpointHook(tmp_path / "checkpoints" / "last.pth", 2, model, optimizer, scheduler,
                          data_state=data_state, extra={"class_names": {1: "thing"}})
    return model, optimizer, scheduler, hook


def test_checkpoints_at_the_period_and_at_the_end(tmp_path, caplog):
    model, optimizer, scheduler, hook = checkpoint_setup(tmp_path)
    state = LoopState(start_iter=0, max_iters=5)
    hook.before_train(state)
    saved = []
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        for i in range(1, 6):
            with torch.no_grad():
                model.w += 1.0
            hook.after_step(step(state, i, {"a": 1.0}, 0.1, 0.0, 0.0))
            saved.append(torch.load(hook.path, weights_only=True)["iteration"] if hook.path.exists() else None)
            assert state.last_saved == saved[-1]
    assert saved == [None, 2, 2, 4, 5]
    assert [m for m in messages(caplog) if m.startswith("saved")] == [
        f"saved checkpoint {hook.path} (iteration {i})" for i in (2, 4, 5)]
    checkpoint = torch.load(hook.path, weights_only=True)
    assert torch.equal(checkpoint["model"]["w"], model.w.detach())
    assert checkpoint["data"] == {"seed": 3, "world_size": 1, "next_iteration": 5}
    assert checkpoint["class_names"] == {1: "thing"} and len(checkpoint["rng"]) == 1


def test_checkpoint_hook_refuses_non_finite_weights_and_keeps_the_last_good_file(tmp_path, caplog):
    model, optimizer, scheduler, hook = checkpoint_setup(tmp_path)
    state = LoopState(start_iter=0, max_iters=6)
    hook.before_train(state)
    hook.after_step(step(state, 2, {"loss_a": 1.5}, 0.1, 0.0, 0.0))
    with torch.no_grad():
        model.w[0] = math.nan
    with caplog.at_level(logging.ERROR, logger="detkit.train"), pytest.raises(TrainingDiverged, match=r"^weights are not finite at iteration 4 ") as excinfo:
        hook.after_step(step(state, 4, {"loss_a": 1.25}, 0.1, 0.0, 0.0))
    assert str(excinfo.value).startswith("weights are not finite at iteration 4 (loss_a=1.25)")
    assert f"the last good checkpoint {hook.path} (iteration 2) is kept" in str(excinfo.value)
    assert str(excinfo.value) in messages(caplog)
    checkpoint = torch.load(hook.path, weights_only=True)
    assert checkpoint["iteration"] == 2 and bool(torch.isfinite(checkpoint["model"]["w"]).all())


def test_a_resumed_run_counts_its_checkpoint_as_saved(tmp_path):
    *_, hook = checkpoint_setup(tmp_path)
    state = LoopState(start_iter=3, max_iters=6, iteration=3)
    hook.before_train(state)
    assert (state.checkpoint_path, state.last_saved) == (hook.path, 3)
    fresh = LoopState(start_iter=0, max_iters=6)
    hook.before_train(fresh)
    assert fresh.last_saved is None


def test_a_checkpoint_resumes_weights_optimizer_schedule_and_rng(tmp_path):
    model, optimizer, scheduler, hook = checkpoint_setup(tmp_path)
    Trainer(model, optimizer, scheduler, batches(), "cpu").train(0, 2)  # momentum buffers exist
    state = LoopState(start_iter=0, max_iters=2)
    hook.after_step(step(state, 2, {"a": 1.0}, 0.1, 0.0, 0.0))
    next_draw = torch.rand(3)  # what the RNG gives right after the save
    other = TinyRegression()
    other_optimizer = sgd(other, momentum=0.9)
    other_scheduler = constant(other_optimizer)
    start = resume_training_state(hook.path, other, other_optimizer, other_scheduler, None, hook.data_state)
    assert start == 2
    assert torch.equal(other.w, model.w) and torch.equal(other.b, model.b)
    assert torch.equal(other_optimizer.state[other.w]["momentum_buffer"], optimizer.state[model.w]["momentum_buffer"])
    assert other_scheduler.last_epoch == scheduler.last_epoch == 2
    assert torch.equal(torch.rand(3), next_draw)
    assert torch.equal(rng_state()["torch"], torch.get_rng_state())


# ------------------------------------------------------------------------------ EvalHook / ResultsHook

class FakeEvaluator:
    coco_eval = None  # coco_stats_table: "(no detections to evaluate)"

    def results(self):
        return [{"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]


def fake_evaluation(calls: list, rank0: bool = True):
    def evaluate():
        calls.append(len(calls))
        metrics = {"bbox/AP": 10.0 + len(calls), "bbox/APs": math.nan, "bbox/AP-thing": 5.0}
        return (metrics if rank0 else None), FakeEvaluator()
    return evaluate


def run_eval_hook(tmp_path, period, start_iter, max_iters, rank0=True):
    calls, writer = [], FakeWriter()
    hook = EvalHook(period, fake_evaluation(calls, rank0), num_images=3, writer=writer,
                    detections_path=tmp_path / "detections.json")
    state = LoopState(start_iter=start_iter, max_iters=max_iters, iteration=start_iter)
    at = []
    for i in range(start_iter + 1, max_iters + 1):
        before = len(calls)
        hook.after_step(step(state, i, {"a": 1.0}, 0.1, 0.0, 0.0))
        at += [i] * (len(calls) - before)
        assert not hook.detections_path.exists()  # only the final evaluation writes detections
    hook.after_train(state)
    return at, calls, writer, state


def test_evaluation_at_the_period_and_once_at_the_end(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        at, calls, writer, state = run_eval_hook(tmp_path, 2, 0, 4)
    assert at == [2] and len(calls) == 2  # the last iteration is evaluated once, after training
    assert [m.split(":")[0] for m in messages(caplog)] == ["evaluation at iteration 2 (3 images, 0.0 s)",
                                                           "evaluation at iteration 4 (3 images, 0.0 s)"]
    assert "box AP 11.00" in messages(caplog)[0] and "(no detections to evaluate)" in messages(caplog)[0]
    assert "thing    5.00" in messages(caplog)[1]
    assert writer.scalars == [("eval/bbox/AP", 11.0, 2), ("eval/bbox/AP-thing", 5.0, 2),  # NaN skipped
                              ("eval/bbox/AP", 12.0, 4), ("eval/bbox/AP-thing", 5.0, 4)]
    assert json.loads((tmp_path / "detections.json").read_text()) == FakeEvaluator().results()
    assert (state.evaluations, state.evaluated_at, state.metrics["bbox/AP"]) == (2, 4, 12.0)


def test_evaluation_without_period_and_after_a_resume_past_the_end(tmp_path):
    at, calls, _, state = run_eval_hook(tmp_path, 0, 0, 3)
    assert at == [] and len(calls) == 1 and state.evaluated_at == 3
    at, calls, _, state = run_eval_hook(tmp_path, 2, 7, 5)  # resumed at 7 with max_iters=5: no step
    assert at == [] and len(calls) == 1 and state.evaluated_at == 7


def test_evaluation_on_other_ranks_logs_and_writes_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        at, calls, writer, state = run_eval_hook(tmp_path, 1, 0, 2, rank0=False)
    assert at == [1] and len(calls) == 2  # collective: every rank evaluates
    assert messages(caplog) == [] and writer.scalars == [] and not (tmp_path / "detections.json").exists()
    assert state.metrics is None and state.evaluations == 2


def test_results_hook_writes_metrics_and_train_stats(tmp_path):
    model = TinyRegression()
    state = LoopState(start_iter=0, max_iters=4, iteration=4, metrics={"bbox/AP": 12.5, "bbox/APs": math.nan},
                      step_times=[9.0, 1.0, 3.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 11.0])
    ResultsHook(tmp_path, model, world_size=1).after_train(state)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"iteration": 4, "bbox/AP": 12.5, "bbox/APs": None}
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["parameters"] == 3 and stats["offset_parameters"] == {} and stats["world_size"] == 1
    assert stats["timed_iterations"] == 10 and stats["sec_per_iter"] == statistics.median(state.step_times[1:])
    (tmp_path / "metrics.json").unlink()
    ResultsHook(tmp_path, model, world_size=2).after_train(LoopState(0, 4, iteration=4))  # rank > 0: no metrics
    assert not (tmp_path / "metrics.json").exists()


def test_the_hooks_effects_come_in_todays_order(tmp_path, caplog):
    """Each iteration: progress line, then checkpoint, then periodic evaluation; after the
    loop the final evaluation, then metrics.json; the last iteration is evaluated once."""
    model = TinyRegression()
    optimizer = sgd(model)
    scheduler = constant(optimizer)
    path = tmp_path / "checkpoints" / "last.pth"
    calls: list = []
    hooks = [MetricWriter(2), CheckpointHook(path, 2, model, optimizer, scheduler),
             EvalHook(2, fake_evaluation(calls), num_images=3, detections_path=tmp_path / "detections.json"),
             ResultsHook(tmp_path, model, 1)]
    with caplog.at_level(logging.INFO, logger="detkit.train"):
        state = Trainer(model, optimizer, scheduler, batches(), "cpu", hooks=hooks).train(0, 4)
    expected = ["iter 2/4 ", f"saved checkpoint {path} (iteration 2)", "evaluation at iteration 2 ",
                "iter 4/4 ", f"saved checkpoint {path} (iteration 4)", "evaluation at iteration 4 ",
                f"wrote {tmp_path / 'metrics.json'} "]
    logged = messages(caplog)
    assert len(logged) == len(expected) and all(m.startswith(e) for m, e in zip(logged, expected)), logged
    assert json.loads((tmp_path / "metrics.json").read_text())["iteration"] == 4
    assert state.metrics is not None and len(calls) == 2


def test_the_engine_does_not_import_detkit_vis():
    for source in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "detkit.vis" or n.startswith("detkit.vis.") for n in names), source.name


# ------------------------------------------------------------------------------ detkit.vis.hooks

def evaluated(state: LoopState, iteration: int, metrics=None) -> LoopState:
    state.evaluations += 1
    state.evaluated_at, state.metrics = iteration, metrics
    return state


@pytest.fixture(scope="module")
def deformable_model():
    model = build_tiny()
    randomise_offset_branches(model, std=0.02, seed=1)
    return model.train()


VAL = [(smooth_image(80, 100, seed=s), {}) for s in range(3)]


def test_sampling_pictures_after_each_evaluation_once(deformable_model, monkeypatch):
    drawn = []

    def figure(model, image, class_names=None):  # records what the hook passes to sampling_figure
        drawn.append((model, image, class_names))
        return np.full((2, 3, 3), len(drawn), np.uint8)

    monkeypatch.setattr(vis_hooks, "sampling_figure", figure)
    writer = FakeWriter()
    run = TrainingRun(Path("."), deformable_model, VAL[:2], {1: "a", 2: "b"}, writer)
    [hook] = sampling_picture_hooks({"tensorboard_sampling_images": 5}, run)  # 5 > the 2 images
    state = LoopState(start_iter=0, max_iters=4)
    hook.after_step(step(state, 1, {"a": 1.0}, 0.1, 0.0, 0.0))  # no evaluation yet
    assert writer.images == []
    hook.after_step(evaluated(step(state, 2, {"a": 1.0}, 0.1, 0.0, 0.0), 2, {"bbox/AP": 1.0}))
    hook.after_step(step(state, 3, {"a": 1.0}, 0.1, 0.0, 0.0))  # the same evaluation: not drawn again
    hook.after_train(evaluated(step(state, 4, {"a": 1.0}, 0.1, 0.0, 0.0), 4, {"bbox/AP": 2.0}))
    assert [(tag, int(picture[0, 0, 0]), s, fmt) for tag, picture, s, fmt in writer.images] == [
        ("sampling/val_0", 1, 2, "HWC"), ("sampling/val_1", 2, 2, "HWC"), ("sampling/val_0", 3, 4, "HWC"),
        ("sampling/val_1", 4, 4, "HWC")]
    assert [(m, img, names) for m, img, names in drawn[:2]] == [(deformable_model, VAL[0][0], {1: "a", 2: "b"}),
                                                                (deformable_model, VAL[1][0], {1: "a", 2: "b"})]


def test_the_logged_sampling_picture_is_sampling_figures(deformable_model):
    images = []
    hook = SamplingPictures(lambda tag, picture, it: images.append((tag, picture, it)), deformable_model, VAL,
                            {1: "a", 2: "b"}, 1)
    hook.after_train(evaluated(LoopState(0, 3, iteration=3), 3, {"bbox/AP": 1.0}))
    expected = sampling_figure(deformable_model, VAL[0][0], class_names={1: "a", 2: "b"})
    [(tag, picture, iteration)] = images
    assert (tag, iteration, picture.shape) == ("sampling/val_0", 3, (80, 100, 3))
    assert np.array_equal(picture, expected) and deformable_model.training


def test_no_sampling_pictures_without_metrics_count_or_deformable_layers(deformable_model):
    images = []

    def add_image(tag, picture, iteration):
        images.append(tag)

    for hook in (SamplingPictures(add_image, deformable_model, VAL, None, 0),
                 SamplingPictures(add_image, nn.Sequential(nn.Conv2d(3, 3, 1)), VAL, None, 2)):
        hook.after_train(evaluated(LoopState(0, 1, iteration=1), 1, {"bbox/AP": 1.0}))
    SamplingPictures(add_image, deformable_model, VAL, None, 2).after_train(
        evaluated(LoopState(0, 1, iteration=1), 1, None))  # ranks > 0 have no metrics
    assert images == []
    assert sampling_picture_hooks({"tensorboard_sampling_images": 2},
                                  TrainingRun(Path("."), deformable_model, VAL, {}, None)) == []


def test_a_model_the_figure_refuses_gets_a_warning_and_no_picture(caplog):
    images = []
    model = nn.Sequential(DeformConv2d(3, 4, 3, padding=1))  # one layer; the figure follows three
    hook = SamplingPictures(lambda tag, picture, it: images.append(tag), model, VAL, None, 2)
    with caplog.at_level(logging.WARNING, logger="detkit.train"):
        hook.after_train(evaluated(LoopState(0, 1, iteration=1), 1, {"bbox/AP": 1.0}))
    assert images == []
    assert [m for m in messages(caplog) if m.startswith("no sampling picture: ")] != []
    assert len(messages(caplog)) == 1  # one warning, not one per image
