"""Cost of a detector: parameters, FLOPs of one inference forward, seconds per training iteration.

What benchmarks/ablation_cost.py reports for each row of the ablation tables (docs/benchmarks.md,
"Ablation cost"), as functions:

- `parameter_counts(model)`: all parameters and those of the offset (and mask) branches by kind,
  counted as train_stats.json counts them (`detkit.engine.hooks.train_stats`).
- `count_flops(fn, ...)` / `inference_flops(model, height, width)`: FLOPs counted with
  `torch.utils.flop_counter.FlopCounterMode`, whose formulas count convolutions and matrix
  products (2 FLOPs per multiply-add; elementwise ops, normalisation and bias additions are not
  counted). detkit's own ops (`torch.ops.detkit.deform_conv2d`, `torch.ops.detkit.deform_roi_pool`)
  get formulas here (`register_flop_formulas`, called by both), so that a deformable layer counts
  its convolution plus its bilinear sampling (`deform_conv2d_flop_count`) and a RoI pooler
  its bilinear samples (`deform_roi_pool_flop_count`). Only the forward ops have formulas: a
  count of a backward pass would leave their backward out.
- `compose_train_config(experiment, data, overrides)`, `check_for_timing(cfg)`,
  `time_training_iterations(cfg, ...)`:
  the training run tools/train.py would make for `experiment=... data=...` (the config composed
  with Hydra's compose API, the parts built by `detkit.engine.trainer.build_training_parts` on
  the real training data stream), timed as the trainer times its steps (data loading
  excluded, `LoopState.step_times`).
- `measure_experiment(cfg, ...)`: all of the above for one composed config (`ExperimentCost`).

Bilinear sampling, the convention of both formulas: a sample of one channel at a fractional
position is the sum of its four neighbours times their weights, 4 multiplies + 3 adds =
`BILINEAR_FLOPS` = 7. The position and the four weights are computed once per sampling point
and shared by every channel of an offset group (RoI pooling: of the map), so they are not
counted (a few FLOPs per point against 7 per channel; the CPU kernels likewise compute them
once per point).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from detkit.config.compose import check_config
from detkit.config.schemas import CheckedTrainConfig, check_train_config
from detkit.engine.hooks import train_stats
from detkit.engine.loop import Trainer
from detkit.engine.trainer import AMP_DTYPES, build_training_parts, build_training_stream, resolve_device
from detkit.ops import require_ops
from detkit.ops.reference import MAX_ADAPTIVE_GRID

__all__ = ["BILINEAR_FLOPS", "register_flop_formulas", "deform_conv2d_flop_count", "deform_roi_pool_flop_count",
           "dcn_core_flop_count",
           "FlopCount", "count_flops", "InferenceFlops", "fixed_proposals", "inference_flops", "parameter_counts",
           "compose_train_config", "check_for_timing", "time_training_iterations", "ExperimentCost",
           "measure_experiment"]

BILINEAR_FLOPS = 7  # one channel's bilinear sample: 4 neighbour x weight products + 3 sums


# ------------------------------------------------------------------ FLOP formulas of detkit's ops

def deform_conv2d_flop_count(input_shape: Sequence[int], weight_shape: Sequence[int],
                             out_shape: Sequence[int], modulated: bool) -> int:
    """FLOPs of one `deform_conv2d` forward.

    input_shape [B, C_in, H, W], weight_shape [C_out, C_in / groups, kh, kw], out_shape
    [B, C_out, H_out, W_out]. The regular convolution's count, as FlopCounterMode counts a conv
    (2 FLOPs per multiply-add, bias not counted): 2 * B * C_out * C_in/groups * kh * kw *
    H_out * W_out; plus the im2col columns it multiplies, B * C_in * kh * kw * H_out * W_out
    bilinear samples of `BILINEAR_FLOPS` each, and with `modulated` (DCNv2) one more multiply
    per column entry (the mask). The offset (and mask) branch is a plain conv, counted as one.
    """
    batch, in_channels = int(input_shape[0]), int(input_shape[1])
    out_channels, group_in, kh, kw = (int(s) for s in weight_shape)
    out_h, out_w = int(out_shape[2]), int(out_shape[3])
    convolution = 2 * batch * out_channels * group_in * kh * kw * out_h * out_w
    columns = batch * in_channels * kh * kw * out_h * out_w
    return convolution + columns * (BILINEAR_FLOPS + (1 if modulated else 0))


def _adaptive_grid(sampling_ratio: int, bin_sizes: torch.Tensor) -> torch.Tensor:
    """Samples per bin side for each bin size [K] (int64 [K]): `sampling_ratio` if > 0, else
    ceil(bin size) clamped to [0, MAX_ADAPTIVE_GRID], 0 for a non-positive or NaN size
    (`detkit.ops.reference`, csrc/roi_checks.h)."""
    if sampling_ratio > 0:
        return torch.full(bin_sizes.shape, int(sampling_ratio), dtype=torch.int64)
    sizes = bin_sizes.double().clamp(max=MAX_ADAPTIVE_GRID)
    return torch.where(sizes > 0, sizes.ceil(), torch.zeros_like(sizes)).long()


def deform_roi_pool_flop_count(input_shape: Sequence[int], rois: torch.Tensor, pooled_height: int,
                               pooled_width: int, spatial_scale: float, sampling_ratio: int,
                               modulated: bool) -> int:
    """FLOPs of one `deform_roi_pool` forward (plain RoIAlign when called without offsets).

    input_shape [B, C, H, W]; rois [K, 5] = (batch_index, x1, y1, x2, y2) in image pixels (their
    sizes set the samples per bin when sampling_ratio = 0). Each of the K * C * ph * pw output
    bins averages n_k = grid_h * grid_w bilinear samples (`BILINEAR_FLOPS` each, plus 1 to add
    it to the bin's sum), then divides by their count (1), and with `modulated` multiplies by
    the bin's mask (1): C * ph * pw * sum_k (8 * n_k + 1 + modulated). The bins' shifts
    (offset x gamma x RoI size) are per bin and shared by the channels: not counted.
    """
    channels = int(input_shape[1])
    if rois.shape[0] == 0:
        return 0
    boxes = rois.detach().to("cpu", torch.float64)
    bin_w = (boxes[:, 3] - boxes[:, 1]) * spatial_scale / pooled_width
    bin_h = (boxes[:, 4] - boxes[:, 2]) * spatial_scale / pooled_height
    samples = _adaptive_grid(sampling_ratio, bin_h) * _adaptive_grid(sampling_ratio, bin_w)
    per_bin = (BILINEAR_FLOPS + 1) * samples + 1 + (1 if modulated else 0)
    return channels * pooled_height * pooled_width * int(per_bin.sum())


def dcn_core_flop_count(out_shape: Sequence[int], points: int) -> int:
    """FLOPs of one `dcnv3_core` / `dcnv4_core` forward: out_shape [N, Ho, Wo, C], `points`
    sampling points (K) per group. Every output channel sums K bilinear samples, each weighted
    by its point's weight: K * (BILINEAR_FLOPS + 2) per output element (a multiply and an add
    per point). The layers' projections and offset heads are Linear / conv layers, counted as
    such."""
    n, ho, wo, c = (int(v) for v in out_shape)
    return n * ho * wo * c * points * (BILINEAR_FLOPS + 2)


def register_flop_formulas() -> None:
    """Register the formulas of `torch.ops.detkit.deform_conv2d`, `deform_roi_pool`, `dcnv3_core`
    and `dcnv4_core` with
    `torch.utils.flop_counter.register_flop_formula` (once; calling again does nothing). A
    FlopCounterMode copies the registry when it is made, so call this before making one
    (`count_flops` does). RuntimeError when detkit's compiled ops are not built."""
    require_ops()
    ops = torch.ops.detkit
    if ops.deform_conv2d not in flop_registry:
        @register_flop_formula(ops.deform_conv2d)
        def _deform_conv2d_flop(input, offset, weight, mask, bias, stride, padding, dilation, *,
                                out_shape=None, **kwargs) -> int:
            # Arguments are shapes here (register_flop_formula's shape wrapper); mask None: DCNv1.
            return deform_conv2d_flop_count(input, weight, out_shape, modulated=mask is not None)

    for name in ("dcnv3_core", "dcnv4_core"):
        op = getattr(ops, name)
        if op not in flop_registry:
            @register_flop_formula(op)
            def _dcn_core_flop(input, *args, out_shape=None, **kwargs) -> int:
                # The last schema arguments: ..., kernel_size, stride, padding, dilation, group,
                # group_channels, offset_scale, remove_center.
                kernel_size, remove_center = args[-8], args[-1]
                return dcn_core_flop_count(out_shape, kernel_size[0] * kernel_size[1] - int(bool(remove_center)))

    if ops.deform_roi_pool not in flop_registry:
        @register_flop_formula(ops.deform_roi_pool, get_raw=True)  # raw: the RoI sizes matter
        def _deform_roi_pool_flop(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                                  sampling_ratio, gamma, *, out_val=None, **kwargs) -> int:
            return deform_roi_pool_flop_count(input.shape, rois, pooled_height, pooled_width, spatial_scale,
                                              sampling_ratio, modulated=mask is not None)


# ------------------------------------------------------------------ counting

@dataclass(frozen=True)
class FlopCount:
    """FLOPs of the ops that ran inside `count_flops`.

    total: all of them. by_module: per module that ran (FlopCounterMode's names: the root
    module's class name, then the dotted path, e.g. "FasterRCNN.backbone"), the FLOPs inside
    it. by_op: per op ("aten.convolution", "detkit.deform_conv2d", ...)."""
    total: int
    by_module: dict[str, int]
    by_op: dict[str, int]


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Run `fn(*args, **kwargs)` under FlopCounterMode, with detkit's op formulas registered,
    and return what it counted. The call really runs (wrap it in torch.no_grad() for inference)."""
    register_flop_formulas()
    with FlopCounterMode(display=False) as mode:
        fn(*args, **kwargs)
    counts = mode.get_flop_counts()
    by_op: dict[str, int] = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    by_module = {name: int(sum(ops.values())) for name, ops in counts.items() if name != "Global"}
    return FlopCount(int(mode.get_total_flops()), by_module, by_op)


@dataclass(frozen=True)
class InferenceFlops:
    """FLOPs of one inference forward of one image (`inference_flops`).

    total: the whole detector. parts: per top-level child of the detector that counted any
    (backbone, neck, rpn, roi_heads; they add up to total). by_op: per op.
    image_size: (height, width) of the image given; network_input: (height, width) of the
    tensor the backbone saw (the image, zero-padded to the transform's size multiple).
    proposals: the boxes the box head ran on (the RPN's test-time budget, post_nms_top_n_test)."""
    total: int
    parts: dict[str, int]
    by_op: dict[str, int]
    image_size: tuple[int, int]
    network_input: tuple[int, int]
    proposals: int


def fixed_proposals(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """`count` boxes [count, 4] (x1, y1, x2, y2, pixels) inside a height x width image, the same
    for the same arguments: centres uniform over the image, sides log-uniform between 8 px and
    the image's shorter side (RoIs of every FPN level), clipped to the image."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(count, 2, generator=gen) * torch.tensor([width, height])
    low, high = math.log(8.0), math.log(max(min(height, width), 8.0))
    sides = torch.exp(low + (high - low) * torch.rand(count, 2, generator=gen))
    boxes = torch.cat([centre - sides / 2, centre + sides / 2], dim=1)
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limits)


def inference_flops(model: nn.Module, height: int, width: int, seed: int = 0) -> InferenceFlops:
    """FLOPs of `model`'s inference forward (eval mode, no gradient) on one `height` x `width`
    RGB image of uniform noise (generator seeded with `seed`), on the model's device.

    Two things are fixed for the count only (and restored afterwards), so that models differ
    in it only by their layers:

    - the input size: the model's transform resizes to a shorter side of min(height, width)
      and a longer side of at most max(height, width) (scale 1), so the network runs at that
      size whatever the model's own transform_options;
    - the box head's proposals: its FLOPs grow with the RoIs it runs on, and how many an
      untrained RPN keeps after NMS and dropping degenerate boxes is chance (as few as 52 of
      the budget of 300 among the ablation models at initialisation). The RPN runs
      (and counts) as usual, but the box head is given `fixed_proposals` of the RPN's
      test-time budget (post_nms_top_n_test), the most a trained RPN passes on.

    model: a detkit FasterRCNN (`transform`, `backbone`, `rpn`, `roi_heads`)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive; got {height}x{width}")
    for part in ("transform", "backbone", "rpn", "roi_heads"):
        if not hasattr(model, part):
            raise TypeError(f"inference_flops needs a detkit FasterRCNN (with .{part}); got {type(model).__name__}")
    device = next(model.parameters()).device
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)).to(device)
    transform = model.transform
    saved_sizes, was_training = (transform.min_size, transform.max_size), model.training
    seen: dict[str, Any] = {}

    def see_input(module, args):
        seen["network_input"] = tuple(int(s) for s in args[0].shape[-2:])

    def give_proposals(module, args):
        features, proposals, image_sizes, *rest = args
        budget = model.rpn.post_nms_top_n()
        boxes = [fixed_proposals(budget, h, w, seed).to(p) for p, (h, w) in zip(proposals, image_sizes)]
        seen["proposals"] = sum(len(b) for b in boxes)
        return (features, boxes, image_sizes, *rest)

    hooks = [model.backbone.register_forward_pre_hook(see_input),
             model.roi_heads.register_forward_pre_hook(give_proposals)]
    try:
        transform.min_size, transform.max_size = (min(height, width),), max(height, width)
        model.eval()
        with torch.no_grad():
            counted = count_flops(model, [image])
    finally:
        transform.min_size, transform.max_size = saved_sizes
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    root = type(model).__name__
    parts = {name: counted.by_module[f"{root}.{name}"] for name, _ in model.named_children()
             if f"{root}.{name}" in counted.by_module}
    return InferenceFlops(counted.total, parts, counted.by_op, (height, width), seen["network_input"],
                          seen["proposals"])


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """{"parameters": all of `model`'s parameters (each tensor once), "trainable": those that
    require a gradient, "offset_parameters": {kind: count} of the offset/mask branches
    ("deform_conv", "deform_roi_pool"; absent kinds left out)}: the counts of
    train_stats.json (`detkit.engine.hooks.train_stats`), plus the trainable ones."""
    stats = train_stats(model, [], world_size=1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": stats["parameters"], "trainable": trainable,
            "offset_parameters": dict(stats["offset_parameters"])}


# ------------------------------------------------------------------ training time

def compose_train_config(experiment: str | None, data: str | None = None, overrides: Sequence[str] = ()) -> Any:
    """configs/train.yaml composed with `experiment=<experiment>` and `data=<data>` (either may be
    None: the config's default) and further `overrides`, as tools/train.py composes it
    (`detkit.config.compose.check_config`: Hydra's compose API, the schemas registered, every value
    resolvable). Returns the config without its `hydra` node, as the training job receives it.
    ValueError (one line) for an unknown experiment, data config or key."""
    choices = ([f"experiment={experiment}"] if experiment is not None else []) + \
              ([f"data={data}"] if data is not None else [])
    cfg = check_config("train", [*choices, *overrides])
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


def check_for_timing(cfg: Any) -> CheckedTrainConfig:
    """`check_train_config` for one process, except its refusal of frozen layers without
    backbone.weights: the weights decide what training learns, not what an iteration costs
    (frozen layers cost the same with random weights). A `CheckedTrainConfig` (checked so
    already) is returned as it is."""
    if isinstance(cfg, CheckedTrainConfig):
        return cfg
    # resume=true is that rule's one exemption (a checkpoint would bring the weights); a copy.
    return check_train_config(OmegaConf.merge(cfg, {"resume": True}), world_size=1)


def time_training_iterations(cfg: Any, iters: int, warmup: int, parts: Any = None) -> list[float]:
    """Seconds of each of `iters` training iterations after `warmup` untimed ones, of the run
    tools/train.py would make for the composed config `cfg` (`compose_train_config`; or the
    `CheckedTrainConfig` of one), in this process, on one device (its device), with the threads
    torch has now.

    The parts are `detkit.engine.trainer.build_training_parts` (dataset prepared, model,
    optimizer and schedule as configured, global RNGs seeded with the config's seed), or
    `parts` when given (built from the same config); the batches come from its training
    stream (`build_training_stream`: num_workers loader processes); the steps are the trainer's
    (`detkit.engine.loop.Trainer.run_step`, without hooks: no logging, checkpoints or
    evaluation). A step's time excludes waiting for its batch, as train_stats.json's
    sec_per_iter does. The model ends in the state those iterations leave it in.

    On CUDA the steps are timed as the trainer times them (no synchronisation at their end)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")
    run = check_for_timing(cfg)
    config = run.plain
    device = resolve_device(config["device"])
    amp_dtype = AMP_DTYPES[config["amp"]]
    if amp_dtype is not None and device.type != "cuda":
        raise ValueError(f"amp={config['amp']} needs a CUDA device (device is {device}); use amp=null on CPU")
    if parts is None:
        parts = build_training_parts(run, device, rank=0, world=1)
    stream = build_training_stream(run, parts, 0, device)
    grad_clip = config["schedule"]["grad_clip"]
    trainer = Trainer(parts.model, parts.optimizer, parts.scheduler, stream, device, scaler=parts.scaler,
                      amp_dtype=amp_dtype, grad_clip=None if grad_clip is None else float(grad_clip))
    state = trainer.train(0, warmup + iters)
    return list(state.step_times[warmup:])


# ------------------------------------------------------------------ one experiment

@dataclass
class ExperimentCost:
    """What `measure_experiment` measured for one composed config (JSON-ready with `to_dict`)."""
    parameters: int
    trainable: int
    offset_parameters: dict[str, int]
    flops: InferenceFlops
    step_seconds: list[float]
    threads: int
    device: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def offset_total(self) -> int:
        return sum(self.offset_parameters.values())

    @property
    def sec_per_iter(self) -> float:
        """Median of the timed iterations' seconds."""
        return statistics.median(self.step_seconds)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sec_per_iter_median"] = self.sec_per_iter
        return out


def measure_experiment(cfg: Any, height: int, width: int, iters: int, warmup: int) -> ExperimentCost:
    """Parameters, inference FLOPs at `height` x `width` and training seconds per iteration of
    the training run of the composed config `cfg` (`compose_train_config`): the parts are built
    once (`build_training_parts`); parameters and FLOPs are counted on the freshly initialised
    model (offset branches at zero; the FLOPs do not depend on the weights), then
    `time_training_iterations` trains it for warmup + iters."""
    run = check_for_timing(cfg)
    config = run.plain
    device = resolve_device(config["device"])
    parts = build_training_parts(run, device, rank=0, world=1)
    counts = parameter_counts(parts.model)
    flops = inference_flops(parts.model, height, width, seed=int(config["seed"]))
    steps = time_training_iterations(run, iters, warmup, parts=parts)
    if not all(math.isfinite(s) and s > 0 for s in steps):
        raise RuntimeError(f"non-positive or non-finite step times {steps}")
    return ExperimentCost(counts["parameters"], counts["trainable"], counts["offset_parameters"], flops, steps,
                          torch.get_num_threads(), str(device),
                          notes={"batch_size": int(config["schedule"]["batch_size"]),
                                 "num_workers": int(config["num_workers"]), "warmup_iterations": warmup})
