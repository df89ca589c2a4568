"""deform_conv2d on the CPU against dense convolution, torchvision and onnxruntime (issue 33).

    python benchmarks/bench_dcn_cpu.py                       # 1 and 2 threads
    python benchmarks/bench_dcn_cpu.py --threads 2 --repeats 9

For each thread count and each shape of bench_ops.py (3x3, padding 1, with mask, float32, same
random inputs): dense `F.conv2d` (oneDNN), detkit `deform_conv2d` and onnxruntime's `DeformConv`
(the op exported alone, bench_onnx.py; forward only) are timed round-robin in one process, each
once per round, forward and forward+backward, --repeats rounds after a warm-up; the medians are
quoted with their ratio to the dense conv of the same rounds. onnxruntime's intra-op threads do
not spin after a run (session.intra_op.allow_spinning = 0), so they leave the cores to the torch
runs of the round. torchvision's `deform_conv2d` (seconds per call) runs in rounds of its own
(--tv-repeats, forward and forward+backward; --no-torchvision skips it); its ratios are to the
dense medians of the main rounds.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ops import CONV_SHAPES, conv_contenders, timer  # noqa: E402


def inputs(b: int, c: int, h: int, w: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) * 0.02
    offset = torch.randn(b, 18, h, w, generator=g) * 2.0
    mask = torch.rand(b, 9, h, w, generator=g)
    grad = torch.randn(b, c, h, w, generator=g)
    return x, weight, offset, mask, grad


def bench(threads: int, repeats: int, tv_repeats: int, with_ort: bool) -> None:
    torch.set_num_threads(threads)
    measure = timer(torch.device("cpu"), repeats)
    print(f"\n### {threads} thread{'s' if threads > 1 else ''}\n")
    print("| shape | dense fwd | detkit fwd | ratio | ORT DeformConv fwd | ratio | detkit / ORT "
          "| torchvision fwd | ratio | dense fwd+bwd | detkit fwd+bwd | ratio | torchvision fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b, c, h, w in CONV_SHAPES:
        x, weight, offset, mask, grad = inputs(b, c, h, w)
        fns = conv_contenders(x, weight, offset, mask, grad, with_torchvision=bool(tv_repeats))
        tv_fns = {k: fns.pop(k) for k in ("tv", "tv_fb") if k in fns}   # timed apart, fewer rounds
        if with_ort:
            from benchmarks.bench_onnx import _DeformOp, _session
            session = _session(_DeformOp(), (x, offset, weight, mask), ["x", "offset", "weight", "mask"], threads)
            feeds = {"x": x.numpy(), "offset": offset.numpy(), "weight": weight.numpy(), "mask": mask.numpy()}
            fns["ort"] = lambda: session.run(None, feeds)
        # Forward-only runs without autograd, as inference runs them.
        t = measure({k: (f if k.endswith("_fb") else torch.no_grad()(f)) for k, f in fns.items()})
        tv = {"tv": float("nan"), "tv_fb": float("nan")}
        if tv_repeats:
            tv = timer(torch.device("cpu"), tv_repeats)({"tv": torch.no_grad()(tv_fns["tv"]), "tv_fb": tv_fns["tv_fb"]})
        ort = t.get("ort", float("nan"))
        print(f"| {b}x{c}x{h}x{w} | {t['dense']:.1f} | {t['ours']:.1f} | {t['ours'] / t['dense']:.2f}x "
              f"| {ort:.1f} | {ort / t['dense']:.2f}x | {t['ours'] / ort:.2f}x "
              f"| {tv['tv']:.0f} | {tv['tv'] / t['dense']:.1f}x "
              f"| {t['dense_fb']:.1f} | {t['ours_fb']:.1f} | {t['ours_fb'] / t['dense_fb']:.2f}x "
              f"| {tv['tv_fb']:.0f} | {tv['tv_fb'] / t['dense_fb']:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7, help="rounds of dense / detkit / onnxruntime")
    parser.add_argument("--tv-repeats", type=int, default=2, help="rounds of torchvision (0: skip)")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--no-onnxruntime", action="store_true")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"deform_conv2d, 3x3, padding 1, with mask (DCNv2), C_in = C_out, float32; times in ms (medians); "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}; started {started}, load average {os.getloadavg()[0]:.2f}")
    if not args.no_onnxruntime:
        import onnxruntime
        print(f"onnxruntime {onnxruntime.__version__}, intra-op threads = torch threads, no spinning")
    for threads in args.threads:
        bench(threads, args.repeats, 0 if args.no_torchvision else args.tv_repeats, not args.no_onnxruntime)
    print(f"\nfinished {time.strftime('%H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
