"""Speed of detkit's deformable ops against torchvision and dense convolution.

Prints Markdown tables of median times and ratios, all measured in this one
process on the same inputs (never zeros), after warm-up:

    python benchmarks/bench_ops.py                     # CPU, float32
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16

Targets (issue 2): on CPU detkit deform_conv2d forward <= 2x dense conv2d,
forward+backward <= 3x; deform_roi_pool forward+backward <= 1.5x roi_align.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from detkit.ops import deform_conv2d, deform_roi_pool

CONV_SHAPES = [(2, 512, 25, 38), (2, 256, 50, 76), (2, 128, 100, 152)]


def timer(device: torch.device, repeats: int) -> Callable[[dict[str, Callable[[], object]]], dict[str, float]]:
    """Median wall time in ms of each fn in a dict, timed round-robin.

    Every round times each function once, so all of them see the same machine load
    and their ratios stay meaningful on a busy machine. CUDA events on a GPU.
    """
    def elapsed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    def measure(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        for fn in fns.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(elapsed(fn))
        return {name: statistics.median(t) for name, t in times.items()}
    return measure


def forward_backward(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        fn().backward(grad)
    return run


def conv_contenders(x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                    grad: torch.Tensor, with_torchvision: bool = False) -> dict[str, Callable[[], object]]:
    """The timed calls of one deform_conv2d row (3x3, padding 1, with mask): the dense conv and
    detkit's op forward ("dense", "ours") and forward+backward ("dense_fb", "ours_fb", on leaf
    copies of the inputs whose grads each call clears), and torchvision's ("tv", "tv_fb")."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, offset, mask)]
    xl, wl, ol, ml = leaves

    def clear() -> None:
        for t in leaves:
            t.grad = None

    fns = {
        "dense": lambda: F.conv2d(x, weight, padding=1),
        "ours": lambda: deform_conv2d(x, offset, weight, padding=1, mask=mask),
        "dense_fb": lambda: (clear(), forward_backward(lambda: F.conv2d(xl, wl, padding=1), grad)()),
        "ours_fb": lambda: (clear(), forward_backward(
            lambda: deform_conv2d(xl, ol, wl, padding=1, mask=ml), grad)()),
    }
    if with_torchvision:
        fns["tv"] = lambda: torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
        fns["tv_fb"] = lambda: (clear(), forward_backward(
            lambda: torchvision.ops.deform_conv2d(xl, ol, wl, padding=1, mask=ml), grad)())
    return fns


def bench_conv(measure, device, dtype, with_torchvision: bool) -> None:
    print("\n### deform_conv2d, 3x3, padding 1, with mask (DCNv2), C_in = C_out\n")
    head = "| shape | dense fwd | detkit fwd | ratio | dense fwd+bwd | detkit fwd+bwd | ratio |"
    sep = "|---|---|---|---|---|---|---|"
    if with_torchvision:
        head += " torchvision fwd | torchvision fwd+bwd | detkit speed-up fwd / fwd+bwd |"
        sep += "---|---|---|"
    print(head)
    print(sep)
    for b, c, h, w in CONV_SHAPES:
        g = torch.Generator().manual_seed(0)
        make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)
        x, weight = make(b, c, h, w), make(c, c, 3, 3, scale=0.02)
        offset, mask = make(b, 18, h, w, scale=2.0), torch.rand(b, 9, h, w, generator=g).to(device, dtype)
        grad = make(b, c, h, w)
        fns = conv_contenders(x, weight, offset, mask, grad, with_torchvision)
        t = measure(fns)
        row = (f"| {b}x{c}x{h}x{w} | {t['dense']:.1f} | {t['ours']:.1f} | {t['ours'] / t['dense']:.2f}x "
               f"| {t['dense_fb']:.1f} | {t['ours_fb']:.1f} | {t['ours_fb'] / t['dense_fb']:.2f}x |")
        if with_torchvision:
            row += (f" {t['tv']:.1f} | {t['tv_fb']:.1f} | {t['tv'] / t['ours']:.1f}x / "
                    f"{t['tv_fb'] / t['ours_fb']:.1f}x |")
        print(row, flush=True)


def bench_roi_pool(measure, device, dtype) -> None:
    print("\n### deform_roi_pool, 512 RoIs, 7x7, sampling_ratio 0, from 2x256x50x76 (stride 16)\n")
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 256, 50, 76, generator=g).to(device, dtype)
    num = 512
    size = torch.rand(num, 2, generator=g) * 368 + 32  # boxes of 32 to 400 image pixels
    corner = torch.rand(num, 2, generator=g) * (torch.tensor([1216.0, 800.0]) - size)
    rois = torch.cat([torch.randint(0, 2, (num, 1), generator=g).float(), corner, corner + size], 1)
    rois = rois.to(device, dtype)
    offset = (torch.randn(num, 2, 7, 7, generator=g) * 0.5).to(device, dtype)
    mask = torch.rand(num, 1, 7, 7, generator=g).to(device, dtype)
    grad = torch.randn(num, 256, 7, 7, generator=g).to(device, dtype)
    f = feature.clone().requires_grad_()
    o, m = offset.clone().requires_grad_(), mask.clone().requires_grad_()
    scale = 1 / 16

    def clear() -> None:
        f.grad = o.grad = m.grad = None

    cases = {
        "torchvision roi_align (aligned)": lambda: torchvision.ops.roi_align(f, rois, 7, scale, 0, aligned=True),
        "detkit, no offset": lambda: deform_roi_pool(f, rois, None, None, 7, scale, 0),
        "detkit, offset + mask": lambda: deform_roi_pool(f, rois, o, m, 7, scale, 0),
    }
    fns = {}
    for name, fn in cases.items():
        fns[name] = lambda fn=fn: fn().detach()
        fns[name + " fb"] = lambda fn=fn: (clear(), forward_backward(fn, grad)())
    t = measure(fns)
    base = t["torchvision roi_align (aligned) fb"]
    print("| op | fwd ms | fwd+bwd ms | fwd+bwd vs roi_align |")
    print("|---|---|---|---|")
    for name in cases:
        print(f"| {name} | {t[name]:.1f} | {t[name + ' fb']:.1f} | {t[name + ' fb'] / base:.2f}x |", flush=True)


def bench_autocast(measure) -> None:
    """CUDA: what detkit's autocast policy (deformable ops in float32) costs against calling
    the op with bfloat16 tensors directly (offsets rounded to bfloat16), forward+backward."""
    print("\n### deform_conv2d under autocast (runs in float32) vs a direct bfloat16 call, fwd+bwd\n")
    print("| shape | float32 | autocast bf16 | direct bf16 | direct bf16 speed-up | dense conv, autocast bf16 |")
    print("|---|---|---|---|---|---|")
    device = torch.device("cuda")
    for b, c, h, w in CONV_SHAPES:
        g = torch.Generator().manual_seed(0)
        make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)
        x, weight = make(b, c, h, w), make(c, c, 3, 3, scale=0.02)
        offset, mask = make(b, 18, h, w, scale=2.0), torch.rand(b, 9, h, w, generator=g).to(device)
        grad = make(b, c, h, w)
        f32 = [t.clone().requires_grad_() for t in (x, weight, offset, mask)]
        bf16 = [t.to(torch.bfloat16).requires_grad_() for t in (x, weight, offset, mask)]

        def run(leaves, autocast: bool, dense: bool = False) -> None:
            for t in leaves:
                t.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                xl, wl, ol, ml = leaves
                out = F.conv2d(xl, wl, padding=1) if dense else deform_conv2d(xl, ol, wl, padding=1, mask=ml)
            out.backward(grad.to(out.dtype))

        t = measure({"f32": lambda: run(f32, False), "autocast": lambda: run(f32, True),
                     "bf16": lambda: run(bf16, False), "dense": lambda: run(f32, True, dense=True)})
        print(f"| {b}x{c}x{h}x{w} | {t['f32']:.2f} | {t['autocast']:.2f} | {t['bf16']:.2f} | "
              f"{t['autocast'] / t['bf16']:.2f}x | {t['dense']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torchvision", action="store_true",
                        help="skip torchvision's deform_conv2d (slow on CPU: seconds per call)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    measure = timer(device, args.repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {args.device} ({name}), dtype: {args.dtype}, threads: {torch.get_num_threads()}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, median of {args.repeats}, "
          f"times in ms")
    bench_conv(measure, device, dtype, not args.no_torchvision)
    bench_roi_pool(measure, device, dtype)
    if device.type == "cuda" and dtype == torch.bfloat16:
        bench_autocast(measure)


if __name__ == "__main__":
    main()
