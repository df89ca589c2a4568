"""Speed of detkit's dcnv3_core / dcnv4_core on CPU, at InternImage-T's four stage shapes.

Prints Markdown tables of median times (ms) and ratios, all measured in this one process on
the same inputs (never zeros), after warm-up, timed round-robin (every round runs each
contender once, so all see the same machine load):

    python benchmarks/bench_dcnv3.py                 # 2 threads, batch 2, float32, wall clock
    python benchmarks/bench_dcnv3.py --threads 1 --clock cpu

`--clock cpu` times with the process's CPU time instead of the wall clock: on a shared,
overloaded machine (load average far above the core count) wall times measure the
scheduler, while CPU time still measures the work. With one thread it is the fair
comparison of the kernels' cost; with more threads it adds up all threads' time.

Contenders, at each shape (batch 2, 3x3, padding 1, offset_scale 1, group_channels 16):
- detkit `dcnv3_core` (input [N, H, W, C] channels-last) and `dcnv4_core` (packed offsets);
- the grid_sample formulation (`detkit.ops.pure.dcnv3.dcnv3_core_grid_sample`, the shape of
  the official `dcnv3_core_pytorch`): goal, detkit at least 5x faster forward+backward;
- a depthwise 3x3 `F.conv2d` on the same tensor (an NCHW view of the channels-last input,
  with a learnable weight): goal, detkit forward within 3x, forward+backward within 4x;
- detkit `deform_conv2d` doing the same computation as a depthwise call (groups = C, unit
  weights, offsets in its layout; the layout changes are not timed);
- the ONNX exports in onnxruntime (forward; `session.intra_op.allow_spinning=0`, so its
  threads do not steal the CPU from torch between runs): detkit's DeformConv translation and
  a GridSample composition (the pure version exported), against torch's dcnv3_core.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from detkit.ops import dcnv3_core, dcnv4_core, deform_conv2d
from detkit.ops.dcnv3 import dcnv4_packed_width
from detkit.ops.pure.dcnv3 import dcnv3_core_grid_sample

# (H = W, channels, groups) of InternImage-T's four stages at 224x224 input.
SHAPES = [(56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32)]
BATCH, KERNEL = 2, 3
POINTS = KERNEL * KERNEL


CLOCK = time.perf_counter


def measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time in ms (CLOCK) of each fn, timed round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[name].append((CLOCK() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def geometry(group: int, channels: int) -> tuple:
    return (KERNEL, KERNEL, 1, 1, 1, 1, 1, 1, group, channels // group, 1.0)


def problem(size: int, channels: int, group: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size * 1000 + channels)
    n, k = BATCH, POINTS
    x = torch.randn(n, size, size, channels, generator=gen)
    offset = torch.randn(n, size, size, group * k * 2, generator=gen) * 2.0   # a few pixels
    mask = torch.randn(n, size, size, group, k, generator=gen).softmax(-1).flatten(-2)  # DCNv3's softmax
    packed = torch.cat([offset.unflatten(-1, (group, -1)), mask.unflatten(-1, (group, -1))], -1).flatten(-2)
    pad = dcnv4_packed_width(group, k) - packed.shape[-1]
    packed = torch.cat([packed, torch.zeros(n, size, size, pad)], -1)
    return {"x": x, "offset": offset, "mask": mask, "offset_mask": packed,
            "grad": torch.randn(n, size, size, channels, generator=gen),
            "weight": torch.randn(channels, 1, KERNEL, KERNEL, generator=gen) / KERNEL}


def as_deform_conv2d(t: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """The same computation in deform_conv2d's layouts (offset_scale 1, 3x3: DCNv3's point
    (i, j) is tap (j, i), offsets (x, y) -> (dy, dx))."""
    n, h, w, c = t["x"].shape
    off = t["offset"].view(n, h, w, group, KERNEL, KERNEL, 2)           # [.., i, j, (x, y)]
    off = off.permute(0, 3, 5, 4, 6, 1, 2).flip(4)                        # [n, g, j, i, (y, x), h, w]
    msk = t["mask"].view(n, h, w, group, KERNEL, KERNEL).permute(0, 3, 5, 4, 1, 2)
    return {"x": t["x"].permute(0, 3, 1, 2).contiguous(), "offset": off.reshape(n, -1, h, w).contiguous(),
            "mask": msk.reshape(n, -1, h, w).contiguous(), "weight": torch.ones(c, 1, KERNEL, KERNEL),
            "grad": t["grad"].permute(0, 3, 1, 2).contiguous()}


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_(True) for t in tensors]


def fwd_bwd(fn: Callable[..., torch.Tensor], params: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        fn(*params).backward(grad)
    return run


def machine_line(threads: int) -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; {model}, {os.cpu_count()} CPUs, {threads} threads; load average {load}; "
            f"torch {torch.__version__}")


def bench_torch(repeats: int) -> None:
    rows = []
    for size, channels, group in SHAPES:
        t = problem(size, channels, group)
        geo = geometry(group, channels)
        dc = as_deform_conv2d(t, group)
        x_nchw = t["x"].permute(0, 3, 1, 2)                       # channels-last memory, NCHW view
        grad_nchw = t["grad"].permute(0, 3, 1, 2)

        v3 = leaves(t["x"], t["offset"], t["mask"])
        v4 = leaves(t["x"], t["offset_mask"])
        pure = leaves(t["x"], t["offset"], t["mask"])
        conv = leaves(x_nchw, t["weight"])
        dconv = leaves(dc["x"], dc["offset"], dc["mask"])
        ones = dc["weight"]

        def call_v3(x, o, m):
            return dcnv3_core(x, o, m, *geo)

        def call_v4(x, om):
            return dcnv4_core(x, om, *geo)

        def call_pure(x, o, m):
            return dcnv3_core_grid_sample(x, o, m, *geo)

        def call_conv(x, w):
            return F.conv2d(x, w, padding=1, groups=channels)

        def call_dconv(x, o, m):
            return deform_conv2d(x, o, ones, None, 1, 1, 1, m)

        with torch.no_grad():
            forward = measure({
                "v3": lambda: call_v3(t["x"], t["offset"], t["mask"]),
                "v4": lambda: call_v4(t["x"], t["offset_mask"]),
                "pure": lambda: call_pure(t["x"], t["offset"], t["mask"]),
                "conv": lambda: call_conv(x_nchw, t["weight"]),
                "dconv": lambda: call_dconv(dc["x"], dc["offset"], dc["mask"]),
            }, repeats)
        both = measure({
            "v3": fwd_bwd(call_v3, v3, t["grad"]),
            "v4": fwd_bwd(call_v4, v4, t["grad"]),
            "pure": fwd_bwd(call_pure, pure, t["grad"]),
            "conv": fwd_bwd(call_conv, conv, grad_nchw),
            "dconv": fwd_bwd(call_dconv, dconv, dc["grad"]),
        }, repeats)
        rows.append((size, channels, group, forward, both))

    print("\n### dcnv3_core against the grid_sample formulation and a depthwise 3x3 conv (ms, ratios)\n")
    print("| shape (N=2) | dcnv3 fwd | grid_sample fwd | speed-up | dw conv fwd | dcnv3 / conv | "
          "dcnv3 fwd+bwd | grid_sample fwd+bwd | speed-up (goal >= 5) | dw conv fwd+bwd | "
          "dcnv3 / conv (goal <= 4) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, channels, group, f, b in rows:
        print(f"| {size}x{size} C{channels} G{group} | {f['v3']:.2f} | {f['pure']:.2f} | "
              f"{f['pure'] / f['v3']:.1f}x | {f['conv']:.2f} | {f['v3'] / f['conv']:.2f} "
              f"(goal <= 3) | {b['v3']:.2f} | {b['pure']:.2f} | {b['pure'] / b['v3']:.1f}x | "
              f"{b['conv']:.2f} | {b['v3'] / b['conv']:.2f} |")

    print("\n### dcnv3_core against deform_conv2d as a depthwise call, and dcnv4_core (ms, ratios)\n")
    print("| shape (N=2) | dcnv3 fwd | deform_conv2d fwd | speed-up | dcnv4 fwd | dcnv4 / dcnv3 | "
          "dcnv3 fwd+bwd | deform_conv2d fwd+bwd | speed-up | dcnv4 fwd+bwd | dcnv4 / dcnv3 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, channels, group, f, b in rows:
        print(f"| {size}x{size} C{channels} G{group} | {f['v3']:.2f} | {f['dconv']:.2f} | "
              f"{f['dconv'] / f['v3']:.1f}x | {f['v4']:.2f} | {f['v4'] / f['v3']:.2f} | {b['v3']:.2f} | "
              f"{b['dconv']:.2f} | {b['dconv'] / b['v3']:.1f}x | {b['v4']:.2f} | {b['v4'] / b['v3']:.2f} |")


class _Op(torch.nn.Module):
    def __init__(self, fn, geo) -> None:
        super().__init__()
        self.fn, self.geo = fn, geo

    def forward(self, x, offset, mask):
        return self.fn(x, offset, mask, *self.geo)


def _session(module: torch.nn.Module, args: tuple, threads: int):
    import onnxruntime as ort

    from detkit.ops.onnx import register_symbolics

    register_symbolics()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=19,
                          input_names=["x", "offset", "mask"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def bench_onnx(repeats: int, threads: int) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("\n(onnxruntime is not installed: no ONNX table)")
        return
    print(f"\n### Exported forward in onnxruntime {ort.__version__} against torch (ms, ratios)\n")
    print("| shape (N=2) | torch dcnv3_core | ORT DeformConv export | ratio | ORT GridSample composition | "
          "ratio | max abs diff DeformConv / GridSample |")
    print("|---|---|---|---|---|---|---|")
    for size, channels, group in SHAPES:
        t = problem(size, channels, group)
        geo = geometry(group, channels)
        args = (t["x"], t["offset"], t["mask"])
        deform = _session(_Op(dcnv3_core, geo), args, threads)
        grid = _session(_Op(dcnv3_core_grid_sample, geo), args, threads)
        feeds = {"x": t["x"].numpy(), "offset": t["offset"].numpy(), "mask": t["mask"].numpy()}
        with torch.no_grad():
            expected = dcnv3_core(*args, *geo)
            times = measure({
                "torch": lambda: dcnv3_core(*args, *geo),
                "deform": lambda: deform.run(None, feeds),
                "grid": lambda: grid.run(None, feeds),
            }, repeats)
        err_d = (torch.from_numpy(deform.run(None, feeds)[0]) - expected).abs().max().item()
        err_g = (torch.from_numpy(grid.run(None, feeds)[0]) - expected).abs().max().item()
        print(f"| {size}x{size} C{channels} G{group} | {times['torch']:.2f} | {times['deform']:.2f} | "
              f"{times['deform'] / times['torch']:.2f} | {times['grid']:.2f} | "
              f"{times['grid'] / times['torch']:.2f} | {err_d:.1e} / {err_g:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock (default) or the process's CPU time")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine_line(args.threads)}; clock: {args.clock}")
    bench_torch(args.repeats)
    if not args.no_onnx:
        bench_onnx(args.repeats, args.threads)
    print(f"\nLoad average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
