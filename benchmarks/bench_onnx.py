"""Speed of the ONNX deployment path against PyTorch, on the CPU, in one process.

    python benchmarks/bench_onnx.py                 # both tables
    python benchmarks/bench_onnx.py --only ops      # or --only detector

Op level (the three shapes of bench_ops.py, 3x3, padding 1, with mask): detkit's
deform_conv2d forward vs onnxruntime's DeformConv (the op exported alone) vs dense conv
(PyTorch's F.conv2d and onnxruntime's Conv), same inputs, same thread count, timed
round-robin (bench_ops.timer). Goal: detkit's forward at or below onnxruntime's
DeformConv on every shape.

Whole detector, batch 1: the default run's model (configs/model/faster_rcnn_r18_fpn_cpu.yaml,
offset branches given trained-like non-zero weights) in PyTorch eager vs its exported files in
onnxruntime (the default dynamic-batch one and the fixed-batch one), on one synthetic val
image; median of --detector-repeats runs after warm-up, and images/s.
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ops import CONV_SHAPES, timer  # noqa: E402
from detkit.ops import deform_conv2d  # noqa: E402
from detkit.ops.onnx import register_symbolics  # noqa: E402


class _DeformOp(torch.nn.Module):
    def forward(self, x, offset, weight, mask):
        return deform_conv2d(x, offset, weight, padding=1, mask=mask)


class _DenseOp(torch.nn.Module):
    def forward(self, x, weight):
        return F.conv2d(x, weight, padding=1)


def _session(module, args, names, threads, spinning=False):
    """An onnxruntime session of `module` exported alone. Its intra-op threads do not spin
    after a run by default (session.intra_op.allow_spinning = 0): spinning threads would take
    the cores from the torch runs timed in the same rounds."""
    register_symbolics()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=19, input_names=names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def bench_ops(repeats: int, threads: int) -> None:
    measure = timer(torch.device("cpu"), repeats)
    print("\n### deform_conv2d forward, 3x3, padding 1, with mask (DCNv2), C_in = C_out, float32\n")
    print("| shape | PyTorch dense conv | onnxruntime Conv | detkit deform_conv2d | onnxruntime DeformConv "
          "| detkit / ORT DeformConv | ORT DeformConv / ORT Conv | detkit / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for b, c, h, w in CONV_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, c, h, w, generator=g)
        weight = torch.randn(c, c, 3, 3, generator=g) * 0.02
        offset = torch.randn(b, 18, h, w, generator=g) * 2.0
        mask = torch.rand(b, 9, h, w, generator=g)
        deform = _session(_DeformOp(), (x, offset, weight, mask), ["x", "offset", "weight", "mask"], threads)
        dense = _session(_DenseOp(), (x, weight), ["x", "weight"], threads)
        feeds = {"x": x.numpy(), "offset": offset.numpy(), "weight": weight.numpy(), "mask": mask.numpy()}
        dense_feeds = {"x": feeds["x"], "weight": feeds["weight"]}
        ours = deform_conv2d(x, offset, weight, padding=1, mask=mask)
        np.testing.assert_allclose(deform.run(None, feeds)[0], ours.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(ours.abs().max()))
        with torch.no_grad():
            t = measure({
                "dense": lambda: F.conv2d(x, weight, padding=1),
                "ort_dense": lambda: dense.run(None, dense_feeds),
                "ours": lambda: deform_conv2d(x, offset, weight, padding=1, mask=mask),
                "ort": lambda: deform.run(None, feeds),
            })
        print(f"| {b}x{c}x{h}x{w} | {t['dense']:.1f} | {t['ort_dense']:.1f} | {t['ours']:.1f} | {t['ort']:.1f} "
              f"| {t['ours'] / t['ort']:.2f}x | {t['ort'] / t['ort_dense']:.2f}x | {t['ours'] / t['dense']:.2f}x |",
              flush=True)


def bench_detector(repeats: int, threads: int) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from detkit.data.synthetic import render_synthetic_image
    from detkit.data.synthetic_config import SyntheticConfig
    from detkit.export import OnnxDetector, export_onnx
    from detkit.ops import DeformConv2d, DeformRoIPool

    repo = Path(__file__).resolve().parents[1]
    config = OmegaConf.load(repo / "configs/model/faster_rcnn_r18_fpn_cpu.yaml")
    config.num_classes = 9
    torch.manual_seed(0)
    model = instantiate(config, _convert_="all").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like offsets (a fresh model's are zero)
        for m in model.modules():
            if isinstance(m, DeformConv2d):
                m.offset_branch.weight.normal_(0, 0.5 / m.offset_branch.weight[0].numel() ** 0.5, generator=gen)
                m.offset_branch.bias.normal_(0, 0.7, generator=gen)
            elif isinstance(m, DeformRoIPool):
                m.offset_branch[-1].weight.normal_(0, 0.05, generator=gen)
                m.offset_branch[-1].bias.normal_(0, 0.5, generator=gen)
    data = OmegaConf.load(repo / "configs/data/synthetic.yaml")
    rgb = render_synthetic_image(SyntheticConfig(**OmegaConf.to_container(data.generator)), "val", 0)[0]
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "dynamic.onnx")                       # the default: dynamic batch
        export_onnx(model, Path(tmp) / "fixed.onnx", dynamic_batch=False)   # per-image forward, batch 1
        dynamic = OnnxDetector(Path(tmp) / "dynamic.onnx", intra_op_threads=threads)
        fixed = OnnxDetector(Path(tmp) / "fixed.onnx", intra_op_threads=threads)
        batch = image[None].numpy()
        with torch.no_grad():
            count = len(model([image])[0]["scores"])
        measure = timer(torch.device("cpu"), repeats)
        with torch.inference_mode():
            t = measure({"eager": lambda: model([image]), "ort": lambda: dynamic.run(batch),
                         "ort_fixed": lambda: fixed.run(batch)})
    print(f"\n### Whole detector, batch 1, default run's model, one {image.shape[1]}x{image.shape[2]} synthetic val "
          f"image ({count} detections), median of {repeats}\n")
    print("| backend | latency ms | images/s | vs eager |")
    print("|---|---|---|---|")
    for name, key in (("PyTorch eager", "eager"), ("onnxruntime, exported file (dynamic batch, the default)", "ort"),
                      ("onnxruntime, exported file (dynamic_batch=false)", "ort_fixed")):
        print(f"| {name} | {t[key]:.1f} | {1000 / t[key]:.1f} | {t[key] / t['eager']:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["ops", "detector"])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the op table")
    parser.add_argument("--detector-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"device: cpu ({platform.processor() or platform.machine()}), threads: {threads} (torch and onnxruntime), "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, times in ms")
    if args.only in (None, "ops"):
        bench_ops(args.repeats, threads)
    if args.only in (None, "detector"):
        bench_detector(args.detector_repeats, threads)


if __name__ == "__main__":
    main()
