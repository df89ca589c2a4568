"""detkit.engine.loop.Trainer in-process, on a two-parameter regression model (milliseconds).

The step is checked against SGD computed by hand; non-finite losses and gradients stop
training before anything is stepped; clipping, the fp16 GradScaler path (on CPU), the
schedule, the recorded lr / losses / times and the hook protocol are each checked.
"""
from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from torch import nn

from detkit.engine.hooks import CheckpointHook
from detkit.engine.loop import Hook
from detkit.engine.loop import LoopState, Trainer, TrainingDiverged

X = [torch.tensor([1.0, 2.0]), torch.tensor([-1.5, 0.5]), torch.tensor([0.5, -2.0]), torch.tensor([2.0, 1.0])]
Y = [3.0, -1.0, 0.5, 2.5]
W0, B0 = [0.5, -1.0], 0.25


class TinyRegression(nn.Module):
    """Losses of one sample x [2], target y: loss_fit = (w . x + b - y)^2, loss_reg = 0.5 |w|^2.

    Takes what detkit's detectors take: a list of image tensors (here one [2] vector) and
    a list of target dicts (here {"y": scalar tensor}); returns the loss dict."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(W0, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(B0, dtype=dtype))

    def forward(self, images, targets):
        x, y = images[0].to(self.w.dtype), targets[0]["y"].to(self.w.dtype)
        return {"loss_fit": (x @ self.w + self.b - y) ** 2, "loss_reg": 0.5 * (self.w ** 2).sum()}


def batches(ys=Y):
    """One (images, targets) batch per sample."""
    return [([x], [{"y": torch.tensor(y)}]) for x, y in zip(X, ys)]


def hand_gradient(w: torch.Tensor, b: float, x: torch.Tensor, y: float) -> tuple[torch.Tensor, float]:
    """d(loss_fit + loss_reg)/dw and /db, by hand."""
    r = float(w @ x.double()) + b - y
    return 2 * r * x.double() + w, 2 * r


def sgd(model: nn.Module, lr: float = 0.05, momentum: float = 0.0, groups=None) -> torch.optim.SGD:
    return torch.optim.SGD(groups or model.parameters(), lr=lr, momentum=momentum)


def constant(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class Recorder(Hook):
    """Appends (name, event, iteration, lr) to a shared list."""

    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events

    def before_train(self, state: LoopState) -> None:
        self.events.append((self.name, "before", state.iteration, None))

    def after_step(self, state: LoopState) -> None:
        self.events.append((self.name, "step", state.iteration, state.lr))

    def after_train(self, state: LoopState) -> None:
        self.events.append((self.name, "after", state.iteration, None))


def test_two_steps_are_sgd_with_momentum_and_the_schedule_by_hand():
    model = TinyRegression()
    optimizer = sgd(model, lr=0.05, momentum=0.9)
    factors = [1.0, 0.5, 0.25]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factors[min(step, 2)])
    Trainer(model, optimizer, scheduler, batches(), "cpu").train(0, 2)

    w, b = torch.tensor(W0, dtype=torch.float64), B0
    gw, gb = hand_gradient(w, b, X[0], Y[0])
    buf_w, buf_b = gw, gb
    w, b = w - 0.05 * buf_w, b - 0.05 * buf_b
    gw, gb = hand_gradient(w, b, X[1], Y[1])
    buf_w, buf_b = 0.9 * buf_w + gw, 0.9 * buf_b + gb
    w, b = w - 0.025 * buf_w, b - 0.025 * buf_b      # the second step uses lr 0.05 * 0.5
    torch.testing.assert_close(model.w.detach(), w)
    torch.testing.assert_close(model.b.item(), b)


def test_scheduler_steps_once_per_iteration_and_the_logged_lr_is_the_one_used():
    model = TinyRegression()
    optimizer = sgd(model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    events: list = []
    Trainer(model, optimizer, scheduler, batches(), "cpu", hooks=[Recorder("r", events)]).train(0, 3)
    assert scheduler.last_epoch == 3
    logged = [lr for _, event, _, lr in events if event == "step"]
    assert logged == pytest.approx([0.1, 0.1 / 2, 0.1 / 3])          # before each step's scheduler.step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 4)  # after the third


def test_the_logged_lr_is_the_default_groups():
    model = TinyRegression()
    optimizer = sgd(model, groups=[{"params": [model.b], "lr": 0.5, "name": "bias"},
                                   {"params": [model.w], "lr": 0.05, "name": "default"}])
    trainer = Trainer(model, optimizer, constant(optimizer), batches(), "cpu")
    state = trainer.train(0, 1)
    assert state.lr == 0.05


def test_the_state_records_this_steps_losses_and_times():
    def slow_batches():
        for batch in batches():
            time.sleep(0.02)
            yield batch

    model = TinyRegression()
    optimizer = sgd(model)
    state = Trainer(model, optimizer, constant(optimizer), slow_batches(), "cpu").train(0, 2)
    assert state.iteration == 2 and state.loss_names == ["loss_fit", "loss_reg"]
    # The second step's losses, at the weights after the first step (by hand).
    gw, gb = hand_gradient(torch.tensor(W0, dtype=torch.float64), B0, X[0], Y[0])
    w, b = torch.tensor(W0, dtype=torch.float64) - 0.05 * gw, B0 - 0.05 * gb
    expected = [(float(w @ X[1].double()) + b - Y[1]) ** 2, 0.5 * float((w ** 2).sum())]
    assert state.loss_values == pytest.approx(expected, rel=1e-6)
    assert state.data_time >= 0.02 and state.iter_time >= state.data_time
    assert len(state.step_times) == 2
    assert state.step_times[-1] == pytest.approx(state.iter_time - state.data_time)


def test_gradient_clipping_scales_the_step_to_the_max_norm():
    model = TinyRegression()
    optimizer = sgd(model, lr=0.05)
    Trainer(model, optimizer, constant(optimizer), batches(), "cpu", grad_clip=0.1).train(0, 1)
    gw, gb = hand_gradient(torch.tensor(W0, dtype=torch.float64), B0, X[0], Y[0])
    norm = math.sqrt(float((gw ** 2).sum()) + gb ** 2)
    assert norm > 0.1  # clipping is active
    scale = 0.1 / (norm + 1e-6)
    torch.testing.assert_close(model.w.detach(), torch.tensor(W0, dtype=torch.float64) - 0.05 * scale * gw)
    torch.testing.assert_close(model.b.item(), B0 - 0.05 * scale * gb)


def test_non_finite_loss_raises_naming_the_loss_and_the_kept_checkpoint(tmp_path, caplog):
    model = TinyRegression()
    optimizer = sgd(model)
    scheduler = constant(optimizer)
    path = tmp_path / "last.pth"
    events: list = []
    hooks = [CheckpointHook(path, 1, model, optimizer, scheduler), Recorder("r", events)]
    trainer = Trainer(model, optimizer, scheduler, batches([Y[0], math.inf, *Y[2:]]), "cpu", hooks=hooks)
    after_first = {}

    class Snapshot(Hook):
        def after_step(self, state):
            after_first.update({k: v.detach().clone() for k, v in model.named_parameters()})

    trainer.hooks.append(Snapshot())
    with caplog.at_level(logging.ERROR, logger="detkit.train"), pytest.raises(TrainingDiverged, match=r"^loss is not finite at iteration 2 ") as excinfo:
        trainer.train(0, 4)
    message = str(excinfo.value)
    assert message.startswith("loss is not finite at iteration 2 (loss_fit=inf, loss_reg=")
    assert f"the last good checkpoint {path} (iteration 1) is kept" in message
    assert message in caplog.text
    for name, param in model.named_parameters():  # nothing was stepped at iteration 2
        assert torch.equal(param.detach(), after_first[name]), name
    assert scheduler.last_epoch == 1
    assert torch.load(path, weights_only=True)["iteration"] == 1
    assert [e[1] for e in events] == ["before", "step"]  # no after_train


def test_non_finite_loss_without_a_checkpoint_says_none_was_written():
    model = TinyRegression()
    optimizer = sgd(model)
    with pytest.raises(TrainingDiverged, match=r"loss is not finite at iteration 1 .*no checkpoint was written"):
        Trainer(model, optimizer, constant(optimizer), batches([math.nan]), "cpu").train(0, 1)


def test_non_finite_gradient_raises_before_the_optimizer_steps():
    model = TinyRegression()
    model.w.register_hook(lambda grad: grad * math.inf)
    optimizer = sgd(model)
    scheduler = constant(optimizer)
    with pytest.raises(TrainingDiverged, match=r"^gradients are not finite at iteration 1 \(loss_fit="):
        Trainer(model, optimizer, scheduler, batches(), "cpu").train(0, 2)
    assert model.w.tolist() == W0 and model.b.item() == B0
    assert scheduler.last_epoch == 0


def test_fp16_grad_scaler_path_steps_as_sgd_and_skips_inf_gradients():
    model, reference = TinyRegression(torch.float32), TinyRegression(torch.float32)
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    Trainer(model, optimizer, constant(optimizer), batches(), "cpu", scaler=scaler).train(0, 1)
    Trainer(reference, ref_optimizer, constant(ref_optimizer), batches(), "cpu").train(0, 1)
    torch.testing.assert_close(model.w.detach(), reference.w.detach())
    torch.testing.assert_close(model.b.detach(), reference.b.detach())

    model.w.register_hook(lambda grad: grad * math.inf)  # the scaler skips the step, no error
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model, optimizer, constant(optimizer), batches(), "cpu", scaler=scaler).train(0, 1)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 512.0


def test_hooks_are_called_in_list_order_around_each_step():
    model = TinyRegression()
    optimizer = sgd(model)
    events: list = []
    hooks = [Recorder("a", events), Recorder("b", events)]
    Trainer(model, optimizer, constant(optimizer), batches(), "cpu", hooks=hooks).train(0, 2)
    assert [e[:3] for e in events] == [("a", "before", 0), ("b", "before", 0), ("a", "step", 1), ("b", "step", 1),
                                       ("a", "step", 2), ("b", "step", 2), ("a", "after", 2), ("b", "after", 2)]


def test_a_resumed_loop_runs_the_remaining_iterations():
    model = TinyRegression()
    optimizer = sgd(model)
    events: list = []
    trainer = Trainer(model, optimizer, constant(optimizer), batches(), "cpu", hooks=[Recorder("r", events)])
    state = trainer.train(2, 4)
    assert [e[1:3] for e in events] == [("before", 2), ("step", 3), ("step", 4), ("after", 4)]
    assert state.start_iter == 2 and len(state.step_times) == 2
    events.clear()
    trainer.train(4, 4)  # nothing left: no step, the hooks still run
    assert [e[1:3] for e in events] == [("before", 4), ("after", 4)]


def test_the_model_trains_in_training_mode():
    model = TinyRegression().eval()
    optimizer = sgd(model)
    Trainer(model, optimizer, constant(optimizer), batches(), "cpu").train(0, 1)
    assert model.training


def test_training_diverged_is_importable_where_tools_import_it():
    from detkit.engine import trainer

    assert trainer.TrainingDiverged is TrainingDiverged and issubclass(TrainingDiverged, FloatingPointError)
