"""build_optimizer's parameter groups and build_scheduler's warm-up + step schedule."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detkit.solver.optim import build_optimizer, build_scheduler
from detkit.ops import DeformConv2d, DeformRoIPool, offset_branch_parameters

SCHEDULES = Path(__file__).resolve().parents[2] / "configs" / "schedule"


def schedule(name: str):
    return OmegaConf.load(SCHEDULES / f"{name}.yaml")


class Tiny(nn.Module):
    """Every kind of parameter the optimizer distinguishes, plus a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dconv = DeformConv2d(8, 8, 3, padding=1, modulated=True)
        self.pool = DeformRoIPool(8, output_size=2, hidden_dim=16)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(32, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("name", ["dcnv1_coco", "dcnv2_coco", "synthetic_cpu"])
def test_param_groups_and_lr_multipliers(name):
    cfg = schedule(name)
    model = Tiny()
    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay,
                                OmegaConf.to_container(cfg.lr_mult), weight_decay_norm=cfg.weight_decay_norm)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"default", "norm", "deform_conv", "deform_roi_pool"}

    # Every trainable parameter exactly once; frozen ones not at all.
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}

    # Offset branches by kind, with base_lr * their multiplier and the normal weight decay.
    for kind in ("deform_conv", "deform_roi_pool"):
        expected = {id(p) for k, _, p in offset_branch_parameters(model) if k == kind}
        assert {id(p) for p in groups[kind]["params"]} == expected
        assert groups[kind]["lr"] == pytest.approx(cfg.base_lr * cfg.lr_mult[kind])
        assert groups[kind]["weight_decay"] == cfg.weight_decay
    # Norm layers' scale and shift: weight_decay_norm; everything else (biases too): weight_decay.
    norm = {id(p) for m in (model.bn, model.gn) for p in m.parameters()}
    assert {id(p) for p in groups["norm"]["params"]} == norm
    assert groups["norm"]["weight_decay"] == cfg.weight_decay_norm
    default = {id(p) for p in [model.conv.weight, model.conv.bias, model.dconv.weight, model.dconv.bias,
                               model.fc.weight, model.fc.bias]}
    assert {id(p) for p in groups["default"]["params"]} == default
    assert groups["default"]["lr"] == cfg.base_lr and groups["default"]["weight_decay"] == cfg.weight_decay
    assert all(g["momentum"] == cfg.momentum for g in optimizer.param_groups)


def test_missing_kind_gets_multiplier_one_and_unknown_kind_is_an_error():
    optimizer = build_optimizer(Tiny(), 0.1, 0.9, 1e-4, {"deform_conv": 0.5})
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["deform_conv"] == pytest.approx(0.05) and lrs["deform_roi_pool"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="deform_convs"):
        build_optimizer(Tiny(), 0.1, 0.9, 1e-4, {"deform_convs": 0.1})


def expected_lr(cfg, iteration: int, mult: float = 1.0) -> float:
    """The schedule written out from the config: linear warm-up from warmup_factor, then
    x gamma at every step reached."""
    lr = cfg.base_lr * mult * cfg.gamma ** sum(iteration >= s for s in cfg.steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def probe_iterations(cfg) -> list[int]:
    """Iterations around every change of the schedule."""
    points = {0, 1, cfg.max_iters - 1}
    if cfg.warmup_iters:
        points |= {cfg.warmup_iters // 2, cfg.warmup_iters - 1, cfg.warmup_iters}
    for s in cfg.steps:
        points |= {s - 1, s, s + 1}
    return sorted(p for p in points if 0 <= p < cfg.max_iters)


@pytest.mark.parametrize("name", ["synthetic_cpu", "coco_1x", "dcnv2_coco", "dcnv1_coco"])
def test_schedule_values(name):
    cfg = schedule(name)
    assert cfg.steps and all(0 < s < cfg.max_iters for s in cfg.steps)
    model = Tiny()
    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay,
                                OmegaConf.to_container(cfg.lr_mult))
    scheduler = build_scheduler(optimizer, cfg.warmup_iters, cfg.warmup_factor, cfg.steps, cfg.gamma,
                                cfg.max_iters)
    probes = probe_iterations(cfg)
    optimizer.step()
    seen = {}
    if cfg.max_iters <= 5000:
        # Step the scheduler as training does, once per iteration: during iteration i the
        # optimizer holds the lr that update i uses.
        for iteration in range(probes[-1] + 1):
            if iteration in probes:
                seen[iteration] = {g["name"]: g["lr"] for g in optimizer.param_groups}
            scheduler.step()
    else:
        # Hundreds of thousands of steps take seconds: jump the scheduler to each probe
        # (LambdaLR.step sets every group's lr from last_epoch).
        for iteration in probes:
            scheduler.last_epoch = iteration - 1
            scheduler.step()
            seen[iteration] = {g["name"]: g["lr"] for g in optimizer.param_groups}
    for iteration in probes:
        assert seen[iteration]["default"] == pytest.approx(expected_lr(cfg, iteration), rel=1e-9), iteration
        for kind in ("deform_conv", "deform_roi_pool"):
            assert seen[iteration][kind] == pytest.approx(expected_lr(cfg, iteration, cfg.lr_mult[kind]),
                                                          rel=1e-9), (iteration, kind)


def test_scheduler_state_round_trip_is_weights_only_safe(tmp_path):
    cfg = schedule("synthetic_cpu")
    optimizer = build_optimizer(Tiny(), cfg.base_lr, cfg.momentum, cfg.weight_decay, None)
    scheduler = build_scheduler(optimizer, cfg.warmup_iters, cfg.warmup_factor, cfg.steps, cfg.gamma,
                                cfg.max_iters)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "s.pth")
    state = torch.load(tmp_path / "s.pth", weights_only=True)
    optimizer2 = build_optimizer(Tiny(), cfg.base_lr, cfg.momentum, cfg.weight_decay, None)
    scheduler2 = build_scheduler(optimizer2, 0, 1.0, [1], 0.5, 10)  # restored from the state below
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    for _ in range(cfg.warmup_iters):
        optimizer.step(); scheduler.step()  # noqa: E702
        optimizer2.step(); scheduler2.step()  # noqa: E702
        assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_bad_schedules_are_rejected():
    optimizer = build_optimizer(Tiny(), 0.1, 0.9, 0.0, None)
    with pytest.raises(ValueError, match="increasing"):
        build_scheduler(optimizer, 10, 0.001, [20, 10], 0.1, 30)
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(optimizer, 10, 0.0, [20], 0.1, 30)


# ---------------------------------------------------------------------------- from the schedule config

ALL_SCHEDULES = sorted(str(p.relative_to(SCHEDULES))[:-5] for p in SCHEDULES.rglob("*.yaml"))


def composed_schedule(name: str):
    from hydra import compose, initialize_config_dir

    from detkit.config.schemas import register_configs

    register_configs()  # what the CLI does before composing
    with initialize_config_dir(config_dir=str(SCHEDULES.parent), version_base="1.3"):
        return compose("train", overrides=[f"schedule={name}"]).schedule


def legacy_build(sched, model):
    """The trainer's call before schedule.optimizer / schedule.scheduler existed."""
    optimizer = build_optimizer(model, float(sched.base_lr), float(sched.momentum), float(sched.weight_decay),
                                OmegaConf.to_container(sched.lr_mult) if sched.lr_mult else None,
                                weight_decay_norm=float(sched.weight_decay_norm))
    scheduler = build_scheduler(optimizer, int(sched.warmup_iters), float(sched.warmup_factor),
                                list(sched.steps), float(sched.gamma), int(sched.max_iters))
    return optimizer, scheduler


def assert_same(a, b, sched) -> None:
    (opt_a, sched_a), (opt_b, sched_b) = a, b
    assert type(opt_a) is type(opt_b) and opt_a.defaults == opt_b.defaults
    assert len(opt_a.param_groups) == len(opt_b.param_groups)
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):   # same order, names, lr, wd
        assert group_a.keys() == group_b.keys()
        assert [id(p) for p in group_a["params"]] == [id(p) for p in group_b["params"]]
        settings_a, settings_b = ({k: v for k, v in g.items() if k != "params"} for g in (group_a, group_b))
        assert settings_a == settings_b
    assert type(sched_a) is type(sched_b) and sched_a.state_dict() == sched_b.state_dict()
    fa, fb = sched_a.lr_lambdas[0], sched_b.lr_lambdas[0]
    assert vars(fa) == vars(fb) and all(fa(i) == fb(i) for i in probe_iterations(sched))


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_build_from_config_is_the_trainers_optimizer_and_schedule(name):
    from hydra.utils import instantiate

    from detkit.config.build import build_from_config

    sched = composed_schedule(name)
    model = Tiny()
    ours = build_from_config(sched, model)
    assert_same(ours, legacy_build(sched, model), sched)
    # ... and what Hydra makes of the same nodes.
    optimizer = instantiate(sched.optimizer)(model)
    assert_same(ours, (optimizer, instantiate(sched.scheduler)(optimizer)), sched)
    # The nodes follow the flat keys users override.
    sched.base_lr, sched.lr_mult.deform_conv, sched.steps = 0.5, 0.25, [7]
    optimizer, scheduler = build_from_config(sched, model)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["default"]["initial_lr"] == 0.5 and groups["deform_conv"]["initial_lr"] == 0.125
    assert scheduler.lr_lambdas[0].steps == [7]


def test_build_from_config_refuses_what_is_not_a_partial_detkit_builder():
    from detkit.config.build import build_from_config
    from detkit.config.stored import CheckpointError

    sched = OmegaConf.to_container(composed_schedule("synthetic_cpu"), resolve=True)
    bad = {**sched, "optimizer": {**sched["optimizer"], "_target_": "torch.optim.Adam"}}
    with pytest.raises(CheckpointError, match=r"refused schedule.optimizer._target_: _target_ 'torch.optim.Adam'"):
        build_from_config(bad, Tiny())
    whole = {**sched, "scheduler": {k: v for k, v in sched["scheduler"].items() if k != "_partial_"}}
    with pytest.raises(CheckpointError, match=r"refused schedule.scheduler: .*_partial_: true"):
        build_from_config(whole, Tiny())
    with pytest.raises(CheckpointError, match=r"cannot build schedule.optimizer with "
                                              r"detkit.solver.optim.build_optimizer: .*deform_convs"):
        build_from_config({**sched, "optimizer": {**sched["optimizer"], "lr_mult": {"deform_convs": 1.0}}}, Tiny())
