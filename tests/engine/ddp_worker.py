"""A few steps of detkit's training loop on a tiny deformable model, for
tests/engine/test_ddp_equivalence.py.

    python tests/engine/ddp_worker.py OUT.pt                                  # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/engine/ddp_worker.py OUT.pt                                     # two, gloo

Every step uses the same global batch of GLOBAL_BATCH images; with N processes rank r
trains on its contiguous share (GLOBAL_BATCH / N images). The model is set up as
detkit.engine.trainer.train sets it up (detkit's process group, DistributedDataParallel
when N > 1, detkit's optimizer with the offset-branch learning-rate multipliers, its
warm-up / step schedule, gradient clipping, the Trainer loop). Its losses are means over
images of per-image means and its only normalisation is GroupNorm, so neither depends on
how the batch is split: N processes must end where one process ends. Everything runs in
float64, so the comparison can be tight. Rank 0 saves the final weights and each step's
losses (as the loop reports them: averaged over processes) to OUT.pt.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F

from detkit.utils import comm as dist
from detkit.engine.loop import Hook, Trainer
from detkit.solver.optim import build_optimizer, build_scheduler
from detkit.ops import DeformConv2d, DeformRoIPool

GLOBAL_BATCH = 4
STEPS = 5
NUM_CLASSES = 3


class TinyDeformableDetector(nn.Module):
    """A modulated deformable conv, GroupNorm and modulated deformable RoI pooling over the
    targets' boxes, then a classifier and a box regressor: `model(images, targets)` returns
    a loss dict like detkit's detectors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = DeformConv2d(3, 8, 3, padding=1, modulated=True)
        self.norm = nn.GroupNorm(2, 8)
        self.pool = DeformRoIPool(8, output_size=2, spatial_scale=1.0, sampling_ratio=2, modulated=True,
                                  hidden_dim=16, num_hidden=1)
        self.cls = nn.Linear(8 * 4, NUM_CLASSES)
        self.box = nn.Linear(8 * 4, 4)

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        features = F.relu(self.norm(self.conv(torch.stack(images))))
        rois = torch.cat([torch.cat([torch.full((len(t["boxes"]), 1), float(i), dtype=t["boxes"].dtype),
                                     t["boxes"]], dim=1) for i, t in enumerate(targets)])
        pooled = self.pool(features, rois).flatten(1)
        logits, deltas = self.cls(pooled), self.box(pooled)
        cls_losses, box_losses, start = [], [], 0
        for t in targets:  # per-image means: independent of how many images a process holds
            n = len(t["boxes"])
            cls_losses.append(F.cross_entropy(logits[start:start + n], t["labels"]))
            box_losses.append(F.smooth_l1_loss(deltas[start:start + n], t["deltas"], beta=0.5))
            start += n
        return {"loss_cls": torch.stack(cls_losses).mean(), "loss_box": torch.stack(box_losses).mean()}


def global_batch(step: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The GLOBAL_BATCH images and targets of `step` (the same in every process)."""
    gen = torch.Generator().manual_seed(1000 + step)
    images, targets = [], []
    for _ in range(GLOBAL_BATCH):
        images.append(torch.randn(3, 12, 14, generator=gen, dtype=torch.float64))
        xy = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 6
        wh = 3 + torch.rand(3, 2, generator=gen, dtype=torch.float64) * 5
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                        "labels": torch.randint(0, NUM_CLASSES, (3,), generator=gen),
                        "deltas": torch.randn(3, 4, generator=gen, dtype=torch.float64)})
    return images, targets


def this_process_batches(rank: int, world: int):
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        images, targets = global_batch(step)
        yield images[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share]


class RecordLosses(Hook):
    def __init__(self) -> None:
        self.losses: list[list[float]] = []

    def after_step(self, state) -> None:
        self.losses.append(list(state.loss_values))


def main(out: str) -> None:
    dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert GLOBAL_BATCH % world == 0
    torch.manual_seed(0)
    model = TinyDeformableDetector().double()
    with torch.no_grad():  # non-zero offset branches, so the deformable paths matter from step 1
        model.conv.offset_branch.weight.normal_(0, 0.3)
        model.pool.offset_branch[-1].weight.normal_(0, 0.3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, base_lr=0.05, momentum=0.9, weight_decay=1e-3,
                                lr_mult={"deform_conv": 0.5, "deform_roi_pool": 2.0})
    scheduler = build_scheduler(optimizer, warmup_iters=2, warmup_factor=0.25, steps=[3], gamma=0.5,
                                max_iters=STEPS)
    train_model: nn.Module = model
    if world > 1:  # as detkit.engine.trainer.train wraps it on CPU
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=None)
    record = RecordLosses()
    trainer = Trainer(train_model, optimizer, scheduler, this_process_batches(rank, world), "cpu",
                      grad_clip=2.0, hooks=[record])
    trainer.train(0, STEPS)
    if rank == 0:
        torch.save({"world": world, "initial": initial, "final": model.state_dict(), "losses": record.losses}, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
