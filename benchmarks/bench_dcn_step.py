"""The default detector's training step with and without deformable layers, and where the difference goes.

    python benchmarks/bench_dcn_step.py --threads 2                 # timings and profiles
    python benchmarks/bench_dcn_step.py --threads 2 --no-profile

Models: `experiment=control/deformable` (the default model, configs/model/faster_rcnn_r18_fpn_cpu.yaml:
modulated deformable convs in res3-res5 and mdpool) and `experiment=control/plain` (the same model
with plain convs and RoIAlign v2), as tools/train.py composes them with `data=<--data>`, built
once each (detkit.engine.cost: the trainer's steps, data loading excluded). The two are timed in
alternating rounds of --iters iterations (after --warmup untimed ones each), so both see the same
machine; the median step of all rounds is quoted.

The profile (torch.profiler, --profile-iters steps of each model after the timing) sums self CPU
time per op into groups: detkit's deformable conv and RoI pooling (forward, backward), dense
convolutions (the offset/mask branches are dense 3x3 convs: the deformable model's extra dense
conv time is theirs; mdpool's offset branch is fc layers), matrix products (the box head's fc
layers), NMS, batch norm, in-place elementwise ops (optimizer, gradient accumulation), the rest.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# First match wins (the backward op's name extends the forward's).
GROUPS = [
    ("deform_conv2d backward", ("detkit::deform_conv2d_backward",)),
    ("deform_conv2d forward", ("detkit::deform_conv2d",)),
    ("detkit RoI pooling fwd+bwd (mdpool; RoIAlign v2 in the plain model)", ("detkit::deform_roi_pool",)),
    ("torchvision roi_align fwd+bwd", ("torchvision::roi_align", "torchvision::_roi_align_backward")),
    ("dense conv forward", ("aten::mkldnn_convolution", "aten::_convolution", "aten::thnn_conv2d",
                            "aten::_slow_conv2d_forward")),
    ("dense conv backward", ("aten::convolution_backward", "aten::mkldnn_convolution_backward",
                             "aten::_slow_conv2d_backward")),
    ("matrix products (fc layers)", ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear")),
    ("nms", ("torchvision::nms",)),
    ("batch norm fwd+bwd", ("aten::native_batch_norm", "aten::_batch_norm", "aten::batch_norm")),
    ("in-place elementwise (optimizer, gradient accumulation)", ("Optimizer.step", "aten::_foreach",
                                                                  "aten::add_", "aten::mul_",
                                                                  "aten::addcmul_", "aten::lerp_")),
]

def group_of(name: str) -> str:
    for group, prefixes in GROUPS:
        if any(name.startswith(p) for p in prefixes):
            return group
    return "rest"


def profile(cfg, parts, iters: int) -> tuple[dict[str, float], dict[str, float], float]:
    """Self CPU ms per step, per group and per op, and the profiled steps' median.

    An op called inside one of detkit's ops (the matrix products inside deform_conv2d, its
    allocations) counts towards that detkit op's group: its time is the op's inclusive time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from detkit.study.cost import time_training_iterations

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        steps = time_training_iterations(cfg, iters=iters, warmup=0, parts=parts)
    groups: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.events():
        name, parent = event.name, event.cpu_parent
        while parent is not None:
            if parent.name.startswith("detkit::"):
                name = parent.name
            parent = parent.cpu_parent
        ms = event.self_cpu_time_total / 1000 / iters
        groups[group_of(name)] += ms
        ops[name] += ms
    return dict(groups), dict(ops), statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="synthetic_geometry")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per round and model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-iters", type=int, default=8)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value Hydra overrides for both models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from detkit.engine.trainer import build_training_parts, resolve_device
    from detkit.study.cost import check_for_timing, compose_train_config, time_training_iterations

    names = {"plain": "control/plain", "deformable": "control/deformable"}
    cfgs = {k: check_for_timing(compose_train_config(e, args.data, ["num_workers=1", *args.overrides]))
            for k, e in names.items()}
    parts = {k: build_training_parts(c, resolve_device(c.plain["device"]), rank=0, world=1) for k, c in cfgs.items()}
    steps: dict[str, list[float]] = {k: [] for k in names}
    for k in names:
        time_training_iterations(cfgs[k], iters=1, warmup=args.warmup, parts=parts[k])
    for _ in range(args.rounds):
        for k in names:
            steps[k] += time_training_iterations(cfgs[k], iters=args.iters, warmup=0, parts=parts[k])
    med = {k: statistics.median(v) for k, v in steps.items()}
    print(f"\n### Training step, {args.threads} threads, data={args.data} "
          f"({args.rounds} rounds x {args.iters} iterations per model, data loading excluded)\n")
    print("| model | s/iter (median) | vs plain |")
    print("|---|---|---|")
    for k, e in names.items():
        print(f"| `{e}` | {med[k]:.3f} | {med[k] / med['plain']:.2f}x |")
    if args.no_profile:
        return
    prof = {k: profile(cfgs[k], parts[k], args.profile_iters) for k in names}
    print(f"\n### Profile: self CPU ms per step ({args.profile_iters} profiled steps per model; "
          f"profiled step medians: plain {prof['plain'][2]:.3f} s, deformable {prof['deformable'][2]:.3f} s)\n")
    print("| group | plain | deformable | difference |")
    print("|---|---|---|---|")
    order = [g for g, _ in GROUPS] + ["rest"]
    total = {k: sum(prof[k][0].values()) for k in names}
    for g in order:
        p, d = prof["plain"][0].get(g, 0.0), prof["deformable"][0].get(g, 0.0)
        print(f"| {g} | {p:.1f} | {d:.1f} | {d - p:+.1f} |")
    print(f"| total | {total['plain']:.1f} | {total['deformable']:.1f} | "
          f"{total['deformable'] - total['plain']:+.1f} |")
    rest = {name for k in names for name in prof[k][1] if group_of(name) == "rest"}
    diff = sorted(rest, key=lambda n: prof["deformable"][1].get(n, 0.0) - prof["plain"][1].get(n, 0.0), reverse=True)
    print("\nLargest differences among the rest (self CPU ms per step, plain -> deformable): " + "; ".join(
        f"{n} {prof['plain'][1].get(n, 0.0):.1f} -> {prof['deformable'][1].get(n, 0.0):.1f}" for n in diff[:8]))


if __name__ == "__main__":
    main()
