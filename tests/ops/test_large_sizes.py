"""The CPU kernels' parallel and tiled paths against the float64 references.

The other op tests stay below every `at::parallel_for` grain and below one column tile,
where the kernels run one serial chunk; a bug that only shows when work is split (a wrong
stride on the last, shorter tile; two threads' channel ranges that overlap; a chunk
boundary inside a conv group) passes them. Here every size is chosen just above the
thresholds of csrc/cpu/deform_conv2d_cpu.cpp and csrc/cpu/deform_roi_pool_cpu.cpp:

- deform_conv2d: several column tiles with an uneven last one, more positions per tile than
  the im2col / offset-gradient grain, more channels than the col2im channel grain (also on
  the last tile), more rows than the grain of the layout copies;
- deform_roi_pool: more RoIs than the RoI grain (forward, offset and mask gradients) and more
  channels than the input gradient's channel grain;

at 1 and at 2 threads, forward and every gradient. The thresholds are computed from the
constants in the C++ sources, read here with regular expressions, and each test asserts
that its sizes exceed them: changing a constant re-derives the thresholds, and changing the
formulas makes `test_thresholds_are_read_from_the_sources` fail until the model below is
updated, so coverage cannot shrink silently.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from detkit.ops import deform_conv2d, deform_roi_pool
from detkit.ops.reference import deform_conv2d_reference, deform_roi_pool_reference
from tests.helpers import (
    assert_results_match,
    forward_backward,
    generator,
    normal,
    random_rois,
    uniform,
)

CPU_SOURCES = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
THREAD_COUNTS = (1, 2)


# ---------------------------------------------------------------- constants of the C++ sources

def _find(pattern: str, text: str, what: str) -> tuple[int, ...]:
    match = re.search(pattern, text, flags=re.S)
    assert match is not None, (
        f"{what}: its formula in csrc/cpu changed; update the threshold model in "
        f"tests/ops/test_large_sizes.py (pattern {pattern!r})")
    return tuple(int(g) for g in match.groups())


@cache
def conv_constants() -> dict[str, int]:
    """The work constants of csrc/cpu/deform_conv2d_cpu.cpp."""
    text = (CPU_SOURCES / "deform_conv2d_cpu.cpp").read_text()
    ws = r"\s*"
    (position_work,) = _find(
        r"position_grain\(const DeformConvShape& s\)\s*\{\s*return std::max<int64_t>\(1,"
        + ws + r"(\d+)" + ws + r"/" + ws + r"std::max<int64_t>\(1, s\.taps\(\) \* s\.in_channels\)\);",
        text, "position_grain")
    tile_min, tile_bytes_base, tile_bytes_shift = _find(
        r"tile_positions\(.*?std::min\(s\.positions\(\),\s*std::max<int64_t>\((\d+),\s*"
        r"\(int64_t\{(\d+)\} << (\d+)\) / row_bytes\)\);", text, "tile_positions")
    assert re.search(r"row_bytes = s\.taps\(\) \* s\.in_channels \* static_cast<int64_t>\(element_size\)",
                     text), "tile_positions: row_bytes changed; update tests/ops/test_large_sizes.py"
    col2im_min, col2im_work = _find(
        r"work_per_channel = tile\.size \* s\.taps\(\);\s*const int64_t channel_grain = "
        r"std::max<int64_t>\((\d+), (\d+) / std::max<int64_t>\(1, work_per_channel\)\);",
        text, "deformable_col2im channel_grain")
    (pad_rows_work,) = _find(
        r"row_grain = std::max<int64_t>\(1, (\d+) / \(padded_w \* channels\)\);\s*"
        r"at::parallel_for\(0, batch \* padded_h,", text, "padded_channels_last row_grain")
    (crop_rows_work,) = _find(
        r"row_grain = std::max<int64_t>\(1, (\d+) / (?:std::max<int64_t>\(1, )?\(?width \* channels\)\)?;\s*"
        r"at::parallel_for\(0, height,", text, "crop_to_channels_first row_grain")
    return {
        "position_work": position_work, "tile_min": tile_min,
        "tile_bytes": tile_bytes_base << tile_bytes_shift, "col2im_min": col2im_min,
        "col2im_work": col2im_work, "pad_rows_work": pad_rows_work, "crop_rows_work": crop_rows_work,
    }


@cache
def roi_pool_constants() -> dict[str, int]:
    """The work constants of csrc/cpu/deform_roi_pool_cpu.cpp."""
    text = (CPU_SOURCES / "deform_roi_pool_cpu.cpp").read_text()
    (roi_work,) = _find(
        r"roi_grain\(const RoiPoolShape& s\)\s*\{\s*return std::max<int64_t>\(1, (\d+) / "
        r"std::max<int64_t>\(1, s\.bins\(\) \* s\.channels\)\);", text, "roi_grain")
    channel_min, channel_work = _find(
        r"channel_grain =\s*std::max<int64_t>\((\d+), (\d+) / std::max<int64_t>\(1, s\.rois \* "
        r"s\.bins\(\)\)\);", text, "deform_roi_pool backward channel_grain")
    # Both RoI loops and the channel loop must still use these grains.
    assert len(re.findall(r"at::parallel_for\(0, s\.rois, roi_grain\(s\)", text)) == 2, \
        "deform_roi_pool_cpu.cpp: the RoI loops changed; update tests/ops/test_large_sizes.py"
    assert re.search(r"at::parallel_for\(0, C, channel_grain", text), \
        "deform_roi_pool_cpu.cpp: the channel loop changed; update tests/ops/test_large_sizes.py"
    return {"roi_work": roi_work, "channel_min": channel_min, "channel_work": channel_work}


def test_thresholds_are_read_from_the_sources():
    """The parsed constants are the ones the formulas name (and parsing works at all)."""
    conv, pool = conv_constants(), roi_pool_constants()
    assert all(v > 0 for v in conv.values()) and all(v > 0 for v in pool.values())
    # The parallel loops of deform_conv2d_cpu.cpp this file knows of; a new one must be added here.
    text = (CPU_SOURCES / "deform_conv2d_cpu.cpp").read_text()
    loops = re.findall(r"at::parallel_for\(([^,]+), ([^,]+), ([^,]+),", text)
    assert sorted(grain.strip() for _, _, grain in loops) == sorted(
        ["position_grain(s)", "channel_grain", "position_grain(s)", "row_grain", "row_grain"]), loops


def _split_exercised(name: str, count: int, grain: int) -> None:
    """`count` items with `grain` run as two chunks of more than one item at 2 threads.

    at::parallel_for runs serially unless count > grain; then each of the n threads gets
    ceil(count / n) items. Asking for count > 2 * grain also makes every chunk longer than
    one grain and leaves more items than threads.
    """
    assert count > 2 * grain, f"{name}: {count} items do not exceed twice the grain {grain}"
    assert count > max(THREAD_COUNTS), f"{name}: {count} items, not more than the threads"


@pytest.fixture(params=THREAD_COUNTS, ids=lambda n: f"threads{n}")
def num_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        assert torch.get_num_threads() == request.param
        yield request.param
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- deform_conv2d

@dataclass(frozen=True)
class LargeConv:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    mask: bool
    bias: bool
    seed: int

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def output_size(self) -> tuple[int, int]:
        return tuple((size + 2 * p - (d * (k - 1) + 1)) // s + 1 for size, k, s, p, d in zip(
            (self.height, self.width), self.kernel, self.stride, self.padding, self.dilation))

    def positions(self) -> int:
        ho, wo = self.output_size()
        return ho * wo

    def tile(self, element_size: int) -> int:
        c = conv_constants()
        row_bytes = self.taps * self.in_channels * element_size
        return min(self.positions(), max(c["tile_min"], c["tile_bytes"] // row_bytes))

    def tensors(self, dtype=torch.float64) -> dict:
        gen = generator(self.seed)
        ho, wo = self.output_size()
        sampled = self.offset_groups * self.taps
        fan_in = self.in_channels // self.groups * self.taps
        return {
            "input": normal((self.batch, self.in_channels, self.height, self.width), gen, dtype=dtype),
            # Up to 3.5 px: many samples cross pixel cells and the border.
            "offset": uniform((self.batch, 2 * sampled, ho, wo), gen, -3.5, 3.5, dtype=dtype),
            "weight": normal((self.out_channels, self.in_channels // self.groups, *self.kernel), gen,
                             std=1 / math.sqrt(fan_in), dtype=dtype),
            "mask": uniform((self.batch, sampled, ho, wo), gen, 0.0, 1.0, dtype=dtype) if self.mask else None,
            "bias": normal((self.out_channels,), gen, dtype=dtype) if self.bias else None,
        }

    def conv_args(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def check_covers_the_parallel_paths(self, element_size: int) -> None:
        """Several tiles, the last one shorter, and every loop split at 2 threads."""
        c = conv_constants()
        positions, tile = self.positions(), self.tile(element_size)
        tiles = [min(tile, positions - begin) for begin in range(0, positions, tile)]
        assert len(tiles) >= 3, f"{self.name}: {len(tiles)} tiles of {tile} positions"
        assert tiles[-1] < tile, f"{self.name}: the last tile is not shorter ({tiles})"
        position_grain = max(1, c["position_work"] // (self.taps * self.in_channels))
        for size in (tile, tiles[-1]):
            _split_exercised(f"{self.name} im2col / offset grad, tile {size}", size, position_grain)
            channel_grain = max(c["col2im_min"], c["col2im_work"] // (size * self.taps))
            _split_exercised(f"{self.name} col2im, tile {size}", self.in_channels, channel_grain)
        _split_exercised(f"{self.name} padded copy rows", self.batch * (self.height + 2),
                         max(1, c["pad_rows_work"] // ((self.width + 2) * self.in_channels)))
        _split_exercised(f"{self.name} crop rows", self.height,
                         max(1, c["crop_rows_work"] // max(1, self.width * self.in_channels)))
        # At 2 threads the col2im channel split falls inside a conv group or an offset group.
        half = math.ceil(self.in_channels / 2)
        assert half % (self.in_channels // self.groups) or half % (self.in_channels // self.offset_groups), \
            f"{self.name}: the two threads' channel ranges align with every group"
        assert self.groups > 1 and self.offset_groups > 1


CONV_CASES = [
    # Many channels: the minimum tile of positions; five tiles in float64 (4 x 128 + 38), three
    # in float32 (242, 242, 66).
    LargeConv("wide", batch=2, in_channels=240, out_channels=32, height=22, width=25, kernel=(3, 3),
              stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4, offset_groups=3, mask=True,
              bias=True, seed=1),
    # Few channels, many positions, stride and dilation that differ per axis, DCNv1.
    LargeConv("strided", batch=1, in_channels=36, out_channels=12, height=90, width=45, kernel=(3, 3),
              stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3, offset_groups=2, mask=False,
              bias=True, seed=2),
    # Depthwise (groups = channels, as DCNv3 written with deform_conv2d), a 2x3 kernel, no bias.
    LargeConv("depthwise", batch=1, in_channels=66, out_channels=66, height=45, width=37, kernel=(2, 3),
              stride=(1, 1), padding=(0, 1), dilation=(1, 1), groups=66, offset_groups=3, mask=True,
              bias=False, seed=3),
]


def _conv_detkit(input, offset, weight, bias=None, mask=None, **conv):
    return deform_conv2d(input, offset, weight, bias, mask=mask, **conv)


def _conv_reference(input, offset, weight, bias=None, mask=None, **conv):
    return deform_conv2d_reference(input, offset, weight, bias, mask=mask, **conv)


@cache
def _conv_expected(case: LargeConv):
    return forward_backward(_conv_reference, case.tensors(), grad_seed=case.seed + 100, **case.conv_args())


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
def test_deform_conv2d_large_float64(case: LargeConv, num_threads: int):
    case.check_covers_the_parallel_paths(element_size=8)
    ours = forward_backward(_conv_detkit, case.tensors(), grad_seed=case.seed + 100, **case.conv_args())
    expected = _conv_expected(case)
    assert set(ours[1]) == {"input", "offset", "weight"} | {n for n in ("mask", "bias") if getattr(case, n)}
    assert_results_match(ours, expected, rel=1e-10)


@pytest.mark.parametrize("case", CONV_CASES[:1], ids=lambda c: c.name)
def test_deform_conv2d_large_float32(case: LargeConv, num_threads: int):
    """float32 has its own tile size (twice as many positions per tile)."""
    case.check_covers_the_parallel_paths(element_size=4)
    ours = forward_backward(_conv_detkit, case.tensors(torch.float32), grad_seed=case.seed + 100,
                            **case.conv_args())
    assert ours[0].dtype == torch.float32
    assert_results_match(ours, _conv_expected(case), rel=1e-4)


# ---------------------------------------------------------------- deform_roi_pool

@dataclass(frozen=True)
class LargePool:
    kind: str  # plain, deformable, modulated
    batch: int = 2
    channels: int = 256
    height: int = 12
    width: int = 14
    output_size: tuple[int, int] = (3, 3)
    spatial_scale: float = 0.25
    sampling_ratio: int = 2
    num_rois: int = 30
    seed: int = 10

    @property
    def bins(self) -> int:
        return self.output_size[0] * self.output_size[1]

    def tensors(self, dtype=torch.float64) -> dict:
        gen = generator(self.seed)
        k, (ph, pw) = self.num_rois, self.output_size
        image_h, image_w = self.height / self.spatial_scale, self.width / self.spatial_scale
        rois = random_rois(gen, k, self.batch, image_h, image_w, 4.0, 40.0, dtype=dtype)
        offset = uniform((k, 2, ph, pw), gen, -1.5, 1.5, dtype=dtype)
        mask = uniform((k, 1, ph, pw), gen, 0.0, 1.0, dtype=dtype)
        return {
            "input": normal((self.batch, self.channels, self.height, self.width), gen, dtype=dtype),
            "rois": rois,
            "offset": offset if self.kind != "plain" else None,
            "mask": mask if self.kind == "modulated" else None,
        }

    def pool_args(self) -> dict:
        return {"output_size": self.output_size, "spatial_scale": self.spatial_scale,
                "sampling_ratio": self.sampling_ratio, "gamma": 0.1}

    def check_covers_the_parallel_paths(self) -> None:
        c = roi_pool_constants()
        roi_grain = max(1, c["roi_work"] // (self.bins * self.channels))
        _split_exercised(f"{self.kind} RoI loops", self.num_rois, roi_grain)
        channel_grain = max(c["channel_min"], c["channel_work"] // (self.num_rois * self.bins))
        _split_exercised(f"{self.kind} input-gradient channels", self.channels, channel_grain)


POOL_CASES = [LargePool("plain"), LargePool("deformable", seed=11), LargePool("modulated", seed=12)]


def _pool_detkit(input, rois, offset=None, mask=None, **kw):
    return deform_roi_pool(input, rois, offset, mask, **kw)


def _pool_reference(input, rois, offset=None, mask=None, **kw):
    return deform_roi_pool_reference(input, rois, offset, mask, **kw)


def _pool_run(fn, case: LargePool):
    tensors = case.tensors()
    rois = tensors.pop("rois")  # no gradient for RoIs
    return forward_backward(fn, tensors, grad_seed=case.seed + 100, rois=rois, **case.pool_args())


@cache
def _pool_expected(case: LargePool):
    return _pool_run(_pool_reference, case)


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c.kind)
def test_deform_roi_pool_large_float64(case: LargePool, num_threads: int):
    case.check_covers_the_parallel_paths()
    t = case.tensors()
    assert len(set(t["rois"][:, 0].tolist())) == case.batch  # RoIs in every image
    ours = _pool_run(_pool_detkit, case)
    expected = _pool_expected(case)
    assert set(ours[1]) == {"input"} | {n for n in ("offset", "mask") if t[n] is not None}
    assert_results_match(ours, expected, rel=1e-10)
    assert (ours[0] != 0).float().mean() > 0.5  # not a comparison of zeros
