"""What the pure-PyTorch path costs: detkit's ops on the compiled kernels, on the pure path
(DETKIT_OPS=pure / `use_pure_ops`), and torchvision's deform_conv2d, at bench_ops.py's shapes;
dcnv3_core / dcnv4_core at InternImage-T's four stage shapes (bench_dcnv3.py's).

Prints Markdown tables: median times (all variants of a shape timed round-robin in one
process, so that they see the same machine load) and the peak memory of one forward+backward,
each variant measured in a fresh child process (on CPU the growth of its resident set's high-water
mark, VmHWM, reset just before the call through /proc/self/clear_refs, Linux only;
`torch.cuda.max_memory_allocated` on a GPU):

    python benchmarks/bench_pure.py                 # CPU, float32
    python benchmarks/bench_pure.py --device cuda   # with the CUDA kernels built
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dcnv3 import SHAPES as DCN_SHAPES  # noqa: E402
from bench_dcnv3 import geometry as dcn_geometry  # noqa: E402
from bench_dcnv3 import problem as dcn_problem  # noqa: E402
from bench_ops import CONV_SHAPES, forward_backward, timer  # noqa: E402

from detkit.ops import _dispatch, dcnv3_core, dcnv4_core, deform_conv2d, deform_roi_pool  # noqa: E402
from detkit.ops.pure.dcnv3 import dcnv3_core_grid_sample, dcnv4_core_grid_sample  # noqa: E402

VARIANTS = ("kernels", "pure", "torchvision")
DCN_VARIANTS = ("kernels", "pure", "grid_sample")


def conv_inputs(shape, device, dtype):
    b, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    x, weight = make(b, c, h, w), make(c, c, 3, 3, scale=0.02)
    offset, mask = make(b, 18, h, w, scale=2.0), torch.rand(b, 9, h, w, generator=g).to(device, dtype)
    return x, weight, offset, mask, make(b, c, h, w)


def pool_inputs(device, dtype, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 256, 50, 76, generator=g).to(device, dtype)
    num = 512
    size = torch.rand(num, 2, generator=g) * 368 + 32
    corner = torch.rand(num, 2, generator=g) * (torch.tensor([1216.0, 800.0]) - size)
    rois = torch.cat([torch.randint(0, 2, (num, 1), generator=g).float(), corner, corner + size], 1).to(device, dtype)
    offset = (torch.randn(num, 2, 7, 7, generator=g) * 0.5).to(device, dtype)
    mask = torch.rand(num, 1, 7, 7, generator=g).to(device, dtype)
    grad = torch.randn(num, 256, 7, 7, generator=g).to(device, dtype)
    return feature, rois, offset, mask, grad


def conv_call(variant, x, weight, offset, mask):
    if variant == "torchvision":
        return torchvision.ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
    with _dispatch.set_mode(variant):
        return deform_conv2d(x, offset, weight, padding=1, mask=mask)


def pool_call(variant, feature, rois, offset, mask, sampling_ratio):
    with _dispatch.set_mode(variant):
        return deform_roi_pool(feature, rois, offset, mask, 7, 1 / 16, sampling_ratio)


def dcn_inputs(index, device, dtype, op):
    """(leaf tensors, grad, geometry) of dcnv3_core (input, offset, mask) or dcnv4_core
    (input, offset_mask) at InternImage-T's stage `index`."""
    size, channels, group = DCN_SHAPES[index]
    t = {k: v.to(device, dtype) for k, v in dcn_problem(size, channels, group).items()}
    names = ("x", "offset", "mask") if op == "dcnv3" else ("x", "offset_mask")
    return [t[n] for n in names], t["grad"], dcn_geometry(group, channels)


def dcn_call(variant, op, tensors, geometry):
    """variant: "kernels", "pure", or "grid_sample" (the official one-grid_sample formulation,
    for reference: not a path detkit runs)."""
    if variant == "grid_sample":
        return (dcnv3_core_grid_sample if op == "dcnv3" else dcnv4_core_grid_sample)(*tensors, *geometry)
    with _dispatch.set_mode(variant):
        return (dcnv3_core if op == "dcnv3" else dcnv4_core)(*tensors, *geometry)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(args) -> None:
    """In a child process: one forward+backward of one variant; prints the peak memory it added."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.op == "conv":
        x, weight, offset, mask, grad = conv_inputs(CONV_SHAPES[args.index], device, dtype)
        leaves = [t.requires_grad_() for t in (x, weight, offset, mask)]
        run = lambda: conv_call(args.variant, *leaves).backward(grad)  # noqa: E731
    elif args.op in ("dcnv3", "dcnv4"):
        tensors, grad, geo = dcn_inputs(args.index, device, dtype, args.op)
        leaves = [t.requires_grad_() for t in tensors]
        run = lambda: dcn_call(args.variant, args.op, leaves, geo).backward(grad)  # noqa: E731
    else:
        feature, rois, offset, mask, grad = pool_inputs(device, dtype, args.sampling_ratio)
        leaves = [t.requires_grad_() for t in (feature, offset, mask)]
        run = lambda: pool_call(args.variant, leaves[0], rois, leaves[1], leaves[2],  # noqa: E731
                                args.sampling_ratio).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark VmHWM to the current resident set
        base = _status_bytes("VmRSS")
        run()
        peak = _status_bytes("VmHWM") - base
    print(json.dumps({"peak": peak}))


def peak_of(args, op, variant, index=0, sampling_ratio=0) -> float:
    """MiB one forward+backward adds to the peak, measured in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--op", op, "--variant", variant,
           "--index", str(index), "--sampling-ratio", str(sampling_ratio), "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"] / 2**20


def bench_conv(args, measure, device, dtype) -> None:
    print("\n### deform_conv2d, 3x3, padding 1, with mask (DCNv2), C_in = C_out: times (ms)\n")
    print("| shape | kernels fwd | pure fwd | torchvision fwd | kernels fwd+bwd | pure fwd+bwd | "
          "torchvision fwd+bwd | pure / kernels fwd, fwd+bwd | pure / torchvision fwd, fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in CONV_SHAPES:
        x, weight, offset, mask, grad = conv_inputs(shape, device, dtype)
        leaves = [t.clone().requires_grad_() for t in (x, weight, offset, mask)]

        def fb(variant):
            def run():
                for t in leaves:
                    t.grad = None
                forward_backward(lambda: conv_call(variant, *leaves), grad)()
            return run

        fns = {}
        for variant in VARIANTS:
            fns[variant] = lambda v=variant: conv_call(v, x, weight, offset, mask)
            fns[variant + " fb"] = fb(variant)
        t = measure(fns)
        print(f"| {'x'.join(map(str, shape))} | {t['kernels']:.1f} | {t['pure']:.1f} | {t['torchvision']:.1f} "
              f"| {t['kernels fb']:.1f} | {t['pure fb']:.1f} | {t['torchvision fb']:.1f} "
              f"| {t['pure'] / t['kernels']:.1f}x, {t['pure fb'] / t['kernels fb']:.1f}x "
              f"| {t['pure'] / t['torchvision']:.2f}x, {t['pure fb'] / t['torchvision fb']:.2f}x |", flush=True)
    if args.no_memory:
        return
    print("\nPeak memory one forward+backward adds (MiB; inputs excluded):\n")
    print("| shape | kernels | pure | torchvision |")
    print("|---|---|---|---|")
    for index, shape in enumerate(CONV_SHAPES):
        peaks = [peak_of(args, "conv", v, index=index) for v in VARIANTS]
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{p:.0f}" for p in peaks) + " |", flush=True)


def bench_roi_pool(args, measure, device, dtype) -> None:
    print("\n### deform_roi_pool, 512 RoIs, 7x7, from 2x256x50x76 (stride 16), offset + mask: times (ms)\n")
    print("| sampling_ratio | kernels fwd | pure fwd | kernels fwd+bwd | pure fwd+bwd | pure / kernels fwd, fwd+bwd |"
          + ("" if args.no_memory else " peak MiB kernels | peak MiB pure |"))
    print("|---|---|---|---|---|---|" + ("" if args.no_memory else "---|---|"))
    for ratio in (0, 2):
        feature, rois, offset, mask, grad = pool_inputs(device, dtype, ratio)
        leaves = [t.clone().requires_grad_() for t in (feature, offset, mask)]

        def fb(variant):
            def run():
                for t in leaves:
                    t.grad = None
                forward_backward(lambda: pool_call(variant, leaves[0], rois, leaves[1], leaves[2], ratio), grad)()
            return run

        fns = {}
        for variant in ("kernels", "pure"):
            fns[variant] = lambda v=variant: pool_call(v, feature, rois, offset, mask, ratio)
            fns[variant + " fb"] = fb(variant)
        t = measure(fns)
        row = (f"| {ratio} | {t['kernels']:.1f} | {t['pure']:.1f} | {t['kernels fb']:.1f} | {t['pure fb']:.1f} "
               f"| {t['pure'] / t['kernels']:.1f}x, {t['pure fb'] / t['kernels fb']:.1f}x |")
        if not args.no_memory:
            row += "".join(f" {peak_of(args, 'pool', v, sampling_ratio=ratio):.0f} |" for v in ("kernels", "pure"))
        print(row, flush=True)


def bench_dcn(args, measure, device, dtype) -> None:
    print("\n### dcnv3_core / dcnv4_core, InternImage-T stages (batch 2, 3x3, padding 1, group_channels 16): "
          "times (ms)\n")
    print("| op | H=W, C, groups | kernels fwd | pure fwd | grid_sample fwd | kernels fwd+bwd | pure fwd+bwd | "
          "grid_sample fwd+bwd | pure / kernels fwd, fwd+bwd |"
          + ("" if args.no_memory else " peak MiB kernels | peak MiB pure | peak MiB grid_sample |"))
    print("|---|---|---|---|---|---|---|---|---|" + ("" if args.no_memory else "---|---|---|"))
    for op in ("dcnv3", "dcnv4"):
        for index, shape in enumerate(DCN_SHAPES):
            tensors, grad, geo = dcn_inputs(index, device, dtype, op)
            leaves = [t.clone().requires_grad_() for t in tensors]

            def fb(variant, op=op, leaves=leaves, grad=grad, geo=geo):
                def run():
                    for t in leaves:
                        t.grad = None
                    forward_backward(lambda: dcn_call(variant, op, leaves, geo), grad)()
                return run

            fns = {}
            for variant in DCN_VARIANTS:
                fns[variant] = lambda v=variant, op=op, tensors=tensors, geo=geo: dcn_call(v, op, tensors, geo)
                fns[variant + " fb"] = fb(variant)
            t = measure(fns)
            row = (f"| {op}_core | {shape[0]}, {shape[1]}, {shape[2]} | {t['kernels']:.1f} | {t['pure']:.1f} "
                   f"| {t['grid_sample']:.1f} | {t['kernels fb']:.1f} | {t['pure fb']:.1f} | {t['grid_sample fb']:.1f} "
                   f"| {t['pure'] / t['kernels']:.1f}x, {t['pure fb'] / t['kernels fb']:.1f}x |")
            if not args.no_memory:
                row += "".join(f" {peak_of(args, op, v, index=index):.0f} |" for v in DCN_VARIANTS)
            print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 keeps timings steady on a shared machine")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ops", default="conv,pool,dcn",
                        help="comma-separated subset of conv, pool, dcn (dcnv3_core and dcnv4_core)")
    parser.add_argument("--op", choices=["conv", "pool", "dcnv3", "dcnv4"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS + DCN_VARIANTS[2:], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sampling-ratio", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        peak_child(args)
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.device == "cuda" and not _dispatch.has_kernel("deform_conv2d", "cuda"):
        raise SystemExit("detkit's CUDA kernels are not built (DETKIT_WITH_CUDA=1, README.md)")
    measure = timer(device, args.repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {args.device} ({name}), dtype: {args.dtype}, threads: {torch.get_num_threads()}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, median of {args.repeats}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    chosen = set(args.ops.split(","))
    if "conv" in chosen:
        bench_conv(args, measure, device, dtype)
    if "pool" in chosen:
        bench_roi_pool(args, measure, device, dtype)
    if "dcn" in chosen:
        bench_dcn(args, measure, device, dtype)


if __name__ == "__main__":
    main()
