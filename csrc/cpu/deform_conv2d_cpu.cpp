// CPU kernels of detkit::deform_conv2d and its backward.
//
// A deformable conv is a dense conv's matrix product plus a bilinear gather; the
// design keeps the gather cheap and hands the product to oneDNN:
//  * The input is copied once per call into a zero-padded, channels-last
//    buffer `in_pad` [B, H+2, W+2, C]. Every sample inside (-1, H) x (-1, W)
//    then has its four bilinear corners inside the buffer (corners that fall
//    outside the image read the zero border), so there is no per-corner bounds
//    test, and the four corners are contiguous channel vectors that the inner
//    loops process with SIMD (AVX-512 / AVX2 clones, picked at load time).
//  * One sampling plan per (position, offset group, tap): corner and weights,
//    mask folded in, computed once and applied to all the group's channels.
//  * Columns are laid out [groups, P, K, Cg] (P output positions, K = kh*kw
//    taps, Cg = channels per conv group) in tiles of positions: one sample
//    writes Cg contiguous values, and each group's block is the [tile, K*Cg]
//    input of a oneDNN inner product (weights packed once per call, bias fused;
//    float64 and builds without oneDNN use at::mm / at::bmm).
//  * Backward: the column gradient is one more inner product; one pass per
//    sample scatters it to the four corners (threads own channel ranges, so no
//    two write one element) and sums the four dot products that give the
//    offset and mask gradients (per thread, added in a fixed order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../dcn_shapes.h"

namespace detkit {
namespace cpu {
namespace {

void check_same(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "deform_conv2d: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "deform_conv2d: ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
}

DeformConvShape describe(const at::Tensor& input, const at::Tensor& offset,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: input must be [B, C, H, W], got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, "deform_conv2d: weight must be [C_out, C_in/groups, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(offset.dim() == 4, "deform_conv2d: offset must be [B, 2*G*kh*kw, H_out, W_out], got ",
              offset.sizes());
  TORCH_CHECK(input.is_cpu(), "deform_conv2d (CPU kernel): input must be a CPU tensor");
  check_same(offset, input, "offset");
  check_same(weight, input, "weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "deform_conv2d: stride, padding and dilation must have 2 entries");
  DeformConvShape s = deform_conv_sizes(input, weight, stride, padding, dilation);
  TORCH_CHECK(s.stride_h > 0 && s.stride_w > 0, "deform_conv2d: stride must be positive");
  TORCH_CHECK(s.pad_h >= 0 && s.pad_w >= 0, "deform_conv2d: padding must be non-negative");
  TORCH_CHECK(s.dil_h > 0 && s.dil_w > 0, "deform_conv2d: dilation must be positive");
  TORCH_CHECK(s.kernel_h > 0 && s.kernel_w > 0, "deform_conv2d: weight's kernel must not be empty, got weight ",
              weight.sizes());
  TORCH_CHECK(s.in_channels > 0, "deform_conv2d: input must have at least one channel, got shape ", input.sizes());
  TORCH_CHECK(weight.size(1) > 0 && s.in_channels % weight.size(1) == 0,
              "deform_conv2d: input channels (", s.in_channels,
              ") must be a multiple of weight.size(1) (", weight.size(1), ")");
  s.groups = s.in_channels / weight.size(1);
  TORCH_CHECK(s.out_channels % s.groups == 0, "deform_conv2d: weight.size(0) (", s.out_channels,
              ") must be a multiple of the conv groups (", s.groups, ")");
  const int64_t taps = s.taps();
  TORCH_CHECK(offset.size(1) > 0 && offset.size(1) % (2 * taps) == 0,
              "deform_conv2d: offset.size(1) must be a positive multiple of 2*kh*kw = ", 2 * taps,
              ", got ", offset.size(1));
  s.offset_groups = offset.size(1) / (2 * taps);
  TORCH_CHECK(s.in_channels % s.offset_groups == 0, "deform_conv2d: input channels (",
              s.in_channels, ") must be a multiple of the offset groups (", s.offset_groups, ")");
  TORCH_CHECK(s.kernel_fits(), "deform_conv2d: input of size ", s.height, "x", s.width,
              " is smaller than the dilated kernel with padding");
  s.set_output_size();
  TORCH_CHECK(offset.size(0) == s.batch && offset.size(2) == s.out_h && offset.size(3) == s.out_w,
              "deform_conv2d: offset must be [", s.batch, ", ", offset.size(1), ", ", s.out_h, ", ",
              s.out_w, "], got ", offset.sizes());
  if (mask.has_value()) {
    check_same(*mask, input, "mask");
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == s.batch &&
                    mask->size(1) == s.offset_groups * taps && mask->size(2) == s.out_h &&
                    mask->size(3) == s.out_w,
                "deform_conv2d: mask must be [", s.batch, ", ", s.offset_groups * taps, ", ",
                s.out_h, ", ", s.out_w, "], got ", mask->sizes());
  }
  if (bias.has_value()) {
    check_same(*bias, input, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_channels,
                "deform_conv2d: bias must be [", s.out_channels, "], got ", bias->sizes());
  }
  return s;
}

// Where one deformed tap samples the padded channels-last input.
template <typename T>
struct PaddedSample {
  int64_t corner;  // pixel index of corner (y0, x0) in the padded plane
  T ly, lx;        // fractional position inside the pixel cell
  bool inside;     // false: the sample is entirely outside the image and reads 0
};

template <typename T>
inline __attribute__((always_inline)) PaddedSample<T> locate(T y, T x, const DeformConvShape& s) {
  // Written as a negated conjunction so NaN coordinates land outside.
  if (!(y > -1 && y < s.height && x > -1 && x < s.width)) return {0, T(0), T(0), false};
  const T y0 = std::floor(y), x0 = std::floor(x);
  const int64_t corner =
      (static_cast<int64_t>(y0) + 1) * s.padded_width() + static_cast<int64_t>(x0) + 1;
  return {corner, y - y0, x - x0, true};
}

// Calls fn(p, g, k, sample, m) for output positions p in [p_begin, p_end),
// offset groups g and taps k. offset: [2*G*K, P], mask: [G*K, P] or null.
template <typename T, typename Fn>
inline __attribute__((always_inline)) void for_each_sample(const DeformConvShape& s, const T* offset, const T* mask,
                            int64_t p_begin, int64_t p_end, Fn&& fn) {
  const int64_t taps = s.taps(), positions = s.positions();
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t ho = p / s.out_w, wo = p % s.out_w;
    const T y_base = static_cast<T>(ho * s.stride_h - s.pad_h);
    const T x_base = static_cast<T>(wo * s.stride_w - s.pad_w);
    for (int64_t g = 0; g < s.offset_groups; ++g) {
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t gk = g * taps + k;
        const T y = y_base + static_cast<T>((k / s.kernel_w) * s.dil_h) + offset[2 * gk * positions + p];
        const T x = x_base + static_cast<T>((k % s.kernel_w) * s.dil_w) + offset[(2 * gk + 1) * positions + p];
        const T m = mask ? mask[gk * positions + p] : T(1);
        fn(p, g, k, locate(y, x, s), m);
      }
    }
  }
}

// Calls fn(c0, c1, conv_group) for the channels of offset group g inside
// [c_lo, c_hi), split where a conv group ends.
template <typename Fn>
inline __attribute__((always_inline)) void for_each_channel_run(const DeformConvShape& s, int64_t g, int64_t c_lo,
                                 int64_t c_hi, Fn&& fn) {
  const int64_t per_offset_group = s.offset_group_in(), per_group = s.group_in();
  int64_t begin = std::max(g * per_offset_group, c_lo);
  const int64_t end = std::min((g + 1) * per_offset_group, c_hi);
  while (begin < end) {
    const int64_t conv_group = begin / per_group;
    const int64_t run_end = std::min(end, (conv_group + 1) * per_group);
    fn(begin, run_end, conv_group);
    begin = run_end;
  }
}

// A run of output positions [begin, begin + size) whose columns are in the
// buffer at once. Tiling keeps the buffer in cache between the gather that
// writes it and the GEMM that reads it.
struct Tile {
  int64_t begin, size;
};

// Index of column element (conv_group, p, k, c) in a tile's [groups, tile, K, Cg] buffer.
inline __attribute__((always_inline)) int64_t column_index(const DeformConvShape& s, const Tile& tile, int64_t conv_group,
                            int64_t p, int64_t k, int64_t c) {
  return ((conv_group * tile.size + (p - tile.begin)) * s.taps() + k) * s.group_in() +
         (c - conv_group * s.group_in());
}

inline int64_t position_grain(const DeformConvShape& s) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.taps() * s.in_channels));
}

// Positions per tile: about 2 MB of columns (measured against 256 KB and 768 KB
// tiles with MKL; with oneDNN, 256 KB to 1 MB tiles on a 1 MB-L2 EPYC were not
// consistently faster), and at least 128 positions so the products stay efficient.
inline int64_t tile_positions(const DeformConvShape& s, size_t element_size) {
  const int64_t row_bytes = s.taps() * s.in_channels * static_cast<int64_t>(element_size);
  return std::min(s.positions(), std::max<int64_t>(128, (int64_t{2} << 20) / row_bytes));
}

// A tile's [groups, tile.size, K*Cg] view at the start of a flat column buffer:
// contiguous, as column_index addresses it. (Narrowing a [groups, tile_size, ...]
// buffer instead would keep the full tile's group stride, and a last, shorter
// tile would be read with the wrong stride by every group but the first.)
inline at::Tensor tile_view(const at::Tensor& flat, const DeformConvShape& s, const Tile& tile) {
  const int64_t width = s.taps() * s.group_in();
  return flat.narrow(0, 0, s.groups * tile.size * width).view({s.groups, tile.size, width});
}

// The per-sample loops below are compiled for several x86 ISAs and picked at load
// time (target_clones). The clones are named by ISA level (x86-64-v4: AVX-512,
// v3: AVX2 + FMA), not by CPU ("arch=haswell" / "arch=skylake-avx512" clones
// are chosen with __builtin_cpu_is and so never run on AMD CPUs).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DETKIT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DETKIT_ISA_CLONES
#endif
#define DETKIT_INLINE inline __attribute__((always_inline))

// dst[t] = w00*s00[t] + w01*s01[t] + w10*s10[t] + w11*s11[t]; s01 = s00 + step, s10 = s00 + row.
template <typename T>
DETKIT_INLINE void gather_run(T* __restrict dst, const T* s00, int64_t step, int64_t row, int64_t n,
                              T w00, T w01, T w10, T w11) {
  const T* s01 = s00 + step;
  const T* s10 = s00 + row;
  const T* s11 = s10 + step;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) dst[t] = w00 * s00[t] + w01 * s01[t] + w10 * s10[t] + w11 * s11[t];
}

// The backward of one sample over a run of n channels, in one pass:
//   d_XY[t] += w_XY * grad[t]           (the input gradient, scattered to the four corners)
//   dots[XY] += sum_t grad[t] * s_XY[t] (what the offset and mask gradients need)
// d00 (grad_in_pad) and s00 (in_pad) are corner 00 of the same sample in two buffers; the
// four corners are distinct pixels (step, row >= n), so the updates commute.
template <typename T>
DETKIT_INLINE void scatter_dot_run(const T* __restrict grad, const T* __restrict s00,
                                   T* __restrict d00, int64_t step, int64_t row, int64_t n, T w00,
                                   T w01, T w10, T w11, T dots[4]) {
  const T* s01 = s00 + step;
  const T* s10 = s00 + row;
  const T* s11 = s10 + step;
  T* d01 = d00 + step;
  T* d10 = d00 + row;
  T* d11 = d10 + step;
  T a00 = 0, a01 = 0, a10 = 0, a11 = 0;
#pragma omp simd reduction(+ : a00, a01, a10, a11)
  for (int64_t t = 0; t < n; ++t) {
    const T g = grad[t];
    a00 += g * s00[t];
    a01 += g * s01[t];
    a10 += g * s10[t];
    a11 += g * s11[t];
    d00[t] += w00 * g;
    d01[t] += w01 * g;
    d10[t] += w10 * g;
    d11[t] += w11 * g;
  }
  dots[0] += a00;
  dots[1] += a01;
  dots[2] += a10;
  dots[3] += a11;
}

// One thread's share of each kernel: positions [p0, p1) of im2col and of the
// offset gradient, channels [c_lo, c_hi) of col2im.
template <typename T>
DETKIT_INLINE void im2col_chunk(const DeformConvShape& s, const Tile& tile, const T* in_pad,
                                const T* offset, const T* mask, T* columns, int64_t p0, int64_t p1) {
  const int64_t channels = s.in_channels, row = s.padded_width() * channels;
  for_each_sample(s, offset, mask, p0, p1, [&](int64_t p, int64_t g, int64_t k,
                                               const PaddedSample<T>& at, T m) {
    for_each_channel_run(s, g, 0, channels, [&](int64_t c0, int64_t c1, int64_t cg) {
      T* dst = columns + column_index(s, tile, cg, p, k, c0);
      if (!at.inside) {
        std::fill(dst, dst + (c1 - c0), T(0));
        return;
      }
      const T hy = 1 - at.ly, hx = 1 - at.lx;
      gather_run(dst, in_pad + at.corner * channels + c0, channels, row, c1 - c0, m * hy * hx,
                 m * hy * at.lx, m * at.ly * hx, m * at.ly * at.lx);
    });
  });
}

// dots: [tile.size, G, K, 4], this channel range's sums grad . corner value of every sample
// (zero for samples outside the image or without channels in the range).
template <typename T>
DETKIT_INLINE void col2im_chunk(const DeformConvShape& s, const Tile& tile, const T* grad_columns,
                                const T* in_pad, const T* offset, const T* mask, T* grad_in_pad,
                                T* dots, int64_t c_lo, int64_t c_hi) {
  const int64_t channels = s.in_channels, row = s.padded_width() * channels;
  const int64_t taps = s.taps();
  for_each_sample(s, offset, mask, tile.begin, tile.begin + tile.size, [&](int64_t p, int64_t g, int64_t k,
                                                         const PaddedSample<T>& at, T m) {
    T* sample_dots = dots + (((p - tile.begin) * s.offset_groups + g) * taps + k) * 4;
    std::fill(sample_dots, sample_dots + 4, T(0));
    if (!at.inside) return;
    const T hy = 1 - at.ly, hx = 1 - at.lx;
    for_each_channel_run(s, g, c_lo, c_hi, [&](int64_t c0, int64_t c1, int64_t cg) {
      scatter_dot_run(grad_columns + column_index(s, tile, cg, p, k, c0),
                      in_pad + at.corner * channels + c0, grad_in_pad + at.corner * channels + c0,
                      channels, row, c1 - c0, m * hy * hx, m * hy * at.lx, m * at.ly * hx,
                      m * at.ly * at.lx, sample_dots);
    });
  });
}

}  // namespace

// The ISA-dispatched entry points (outside the anonymous namespace: target_clones
// makes an ifunc, which wants external linkage).
#define DETKIT_DEFINE_CHUNKS(T)                                                                  \
  DETKIT_ISA_CLONES void dcn_im2col_chunk(const DeformConvShape& s, const Tile& tile,            \
                                          const T* in_pad, const T* offset, const T* mask,       \
                                          T* columns, int64_t p0, int64_t p1) {                  \
    im2col_chunk<T>(s, tile, in_pad, offset, mask, columns, p0, p1);                             \
  }                                                                                              \
  DETKIT_ISA_CLONES void dcn_col2im_chunk(const DeformConvShape& s, const Tile& tile,            \
                                          const T* grad_columns, const T* in_pad,                \
                                          const T* offset, const T* mask, T* grad_in_pad,        \
                                          T* dots, int64_t c_lo, int64_t c_hi) {                 \
    col2im_chunk<T>(s, tile, grad_columns, in_pad, offset, mask, grad_in_pad, dots, c_lo, c_hi); \
  }
DETKIT_DEFINE_CHUNKS(float)
DETKIT_DEFINE_CHUNKS(double)
#undef DETKIT_DEFINE_CHUNKS

namespace {

// columns[groups, tile, K, Cg] = mask * bilinear(input) at the deformed taps.
// in_pad: [H+2, W+2, C] of one image; offset: [2GK, P]; mask: [GK, P] or null.
template <typename T>
void deformable_im2col(const DeformConvShape& s, const Tile& tile, const T* in_pad,
                       const T* offset, const T* mask, T* columns) {
  at::parallel_for(tile.begin, tile.begin + tile.size, position_grain(s), [&](int64_t p0, int64_t p1) {
    dcn_im2col_chunk(s, tile, in_pad, offset, mask, columns, p0, p1);
  });
}

// grad_in_pad[H+2, W+2, C] += scatter of a tile's grad_columns through the bilinear taps, and
// per channel range the sums grad . corner value (dots, [slots, tile, G, K, 4]) that
// deformable_offset_grad turns into the offset and mask gradients.
template <typename T>
void deformable_col2im(const DeformConvShape& s, const Tile& tile, const T* grad_columns,
                       const T* in_pad, const T* offset, const T* mask, T* grad_in_pad, T* dots,
                       std::vector<char>& slot_used) {
  // Threads own disjoint channel ranges, so their scatters never collide.
  const int64_t work_per_channel = tile.size * s.taps();
  const int64_t channel_grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, work_per_channel));
  // Each range keeps its sums in its own slot of dots. at::parallel_for cuts [0, C) into at
  // most `slots` (the thread count, at most C) ranges of one length, at least ceil(C / slots),
  // each starting at a multiple of it: c_lo / ceil(C / slots) differs between ranges.
  const int64_t slots = static_cast<int64_t>(slot_used.size());
  const int64_t slot_width = (s.in_channels + slots - 1) / slots;
  const int64_t slot_size = tile.size * s.offset_groups * s.taps() * 4;
  std::fill(slot_used.begin(), slot_used.end(), 0);
  at::parallel_for(0, s.in_channels, channel_grain, [&](int64_t c_lo, int64_t c_hi) {
    const int64_t slot = c_lo / slot_width;
    TORCH_INTERNAL_ASSERT(slot < slots && !slot_used[slot], "deform_conv2d_backward: channel range slots");
    slot_used[slot] = 1;
    dcn_col2im_chunk(s, tile, grad_columns, in_pad, offset, mask, grad_in_pad, dots + slot * slot_size,
                     c_lo, c_hi);
  });
}

// grad_offset[2GK, P] and grad_mask[GK, P] (or null) of one image, for a tile's positions,
// from the channel ranges' sums (added in slot order: deterministic for a thread count).
template <typename T>
void deformable_offset_grad(const DeformConvShape& s, const Tile& tile, const T* dots,
                            const std::vector<char>& slot_used, const T* offset, const T* mask,
                            T* grad_offset, T* grad_mask) {
  const int64_t taps = s.taps(), positions = s.positions();
  const int64_t slot_size = tile.size * s.offset_groups * taps * 4;
  at::parallel_for(tile.begin, tile.begin + tile.size, position_grain(s), [&](int64_t p0, int64_t p1) {
    for_each_sample(s, offset, mask, p0, p1, [&](int64_t p, int64_t g, int64_t k,
                                                 const PaddedSample<T>& at, T m) {
      const int64_t index = (((p - tile.begin) * s.offset_groups + g) * taps + k) * 4;
      T a[4] = {0, 0, 0, 0};  // sum over channels of grad * corner 00, 01, 10, 11
      for (size_t slot = 0; slot < slot_used.size(); ++slot) {
        if (!slot_used[slot]) continue;
        for (int i = 0; i < 4; ++i) a[i] += dots[slot * slot_size + index + i];
      }
      const T ly = at.inside ? at.ly : T(0), lx = at.inside ? at.lx : T(0);
      const T hy = 1 - ly, hx = 1 - lx;
      const T value = hy * hx * a[0] + hy * lx * a[1] + ly * hx * a[2] + ly * lx * a[3];
      const T d_y = hx * (a[2] - a[0]) + lx * (a[3] - a[1]);
      const T d_x = hy * (a[1] - a[0]) + ly * (a[3] - a[2]);
      const int64_t gk = g * taps + k;
      grad_offset[2 * gk * positions + p] = m * d_y;
      grad_offset[(2 * gk + 1) * positions + p] = m * d_x;
      if (grad_mask) grad_mask[gk * positions + p] = value;
    });
  });
}

// ---------------------------------------------------------------- oneDNN matrix products
//
// The column GEMMs go to oneDNN's inner-product primitive through ATen's
// mkldnn::_linear_pointwise (the op torch.compile's CPU backend uses): it JITs
// AVX-512 kernels on every CPU that has them, where at::mm's MKL runs its AVX2
// code on AMD CPUs (measured 1.2-1.5x slower than oneDNN on the 2-core EPYC).
// The constant operand is packed once per call (mkldnn::_reorder_linear_weight),
// and the bias is fused. float32 only; float64 (and builds without oneDNN, or
// torch.backends.mkldnn.enabled = False) use at::mm / at::bmm.
struct OnednnOps {
  std::optional<c10::OperatorHandle> linear, pack;
};

const OnednnOps& onednn_ops() {
  static const OnednnOps ops = [] {
    OnednnOps o;
    auto& dispatcher = c10::Dispatcher::singleton();
    o.linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    o.pack = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    return o;
  }();
  return ops;
}

bool use_onednn(const at::Tensor& like) {
  if (like.scalar_type() != at::kFloat) return false;
  if (!at::globalContext().userEnabledMkldnn() || !at::hasMKLDNN()) return false;
  const OnednnOps& ops = onednn_ops();
  // These are torch's internal ops: use them only with the argument lists they are called
  // with below (checked once), so another torch version falls back to at::mm, not an error.
  static const bool expected_schemas =
      ops.linear.has_value() && ops.pack.has_value() &&
      ops.linear->schema().arguments().size() == 6 && ops.pack->schema().arguments().size() == 2;
  return expected_schemas && ops.linear->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
         ops.pack->hasKernelForDispatchKey(c10::DispatchKey::CPU);
}

// Whether the column products of a call go to oneDNN: float32 with the ops above, and
// per-group products large enough to pay for oneDNN's fixed cost per primitive call
// (about 20-150 us: a weight pack per group, a product per group and tile). Below the
// threshold one at::bmm over all groups is far cheaper: a depthwise 3x3 call (512
// groups of one 9-wide row) took 83 ms on oneDNN against 4 ms on at::bmm (2-core EPYC,
// 2x512x7x7). The detector's deformable convs (groups of 64-512 channels) are far above it.
constexpr int64_t kOnednnMinGroupWeight = 4096;  // Cout/groups * K * Cin/groups

bool use_onednn(const at::Tensor& like, const DeformConvShape& s) {
  return s.group_out() * s.taps() * s.group_in() >= kOnednnMinGroupWeight && use_onednn(like);
}

// Y[M, N] = X[M, K] @ W^T (+ bias), W: [N, K] packed once for about `rows` rows of X.
class PackedLinear {
 public:
  PackedLinear(const at::Tensor& weight, int64_t rows, const c10::optional<at::Tensor>& bias) {
    std::vector<c10::IValue> stack{weight.contiguous(), c10::IValue(rows)};
    onednn_ops().pack->callBoxed(&stack);
    packed_ = stack.at(0).toTensor();
    if (bias.has_value()) bias_ = bias->contiguous();
  }
  at::Tensor operator()(const at::Tensor& x) const {
    std::vector<c10::IValue> stack{x,
                                   packed_,
                                   bias_.defined() ? c10::IValue(bias_) : c10::IValue(),
                                   c10::IValue(std::string("none")),
                                   c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                   c10::IValue(std::string(""))};
    onednn_ops().linear->callBoxed(&stack);
    return stack.at(0).toTensor();
  }

 private:
  at::Tensor packed_, bias_;
};

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols: a transpose
// between strided matrices, in 8x8 blocks (AVX registers for float where the CPU has AVX).
template <typename T>
void transpose_scalar(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
                      int64_t dst_stride, int64_t r_begin, int64_t c_begin) {
  // The edges the 8x8 blocks leave: rows >= r_begin (all columns), columns >= c_begin.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = (r < r_begin ? c_begin : 0); c < cols; ++c) {
      dst[c * dst_stride + r] = src[r * src_stride + c];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx"))) void transpose_avx(const float* src, int64_t src_stride, int64_t rows,
                                                 int64_t cols, float* dst, int64_t dst_stride) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < rows8; r0 += 8) {
    for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
      const float* s = src + r0 * src_stride + c0;
      const __m256 r_0 = _mm256_loadu_ps(s), r_1 = _mm256_loadu_ps(s + src_stride);
      const __m256 r_2 = _mm256_loadu_ps(s + 2 * src_stride), r_3 = _mm256_loadu_ps(s + 3 * src_stride);
      const __m256 r_4 = _mm256_loadu_ps(s + 4 * src_stride), r_5 = _mm256_loadu_ps(s + 5 * src_stride);
      const __m256 r_6 = _mm256_loadu_ps(s + 6 * src_stride), r_7 = _mm256_loadu_ps(s + 7 * src_stride);
      const __m256 t0 = _mm256_unpacklo_ps(r_0, r_1), t1 = _mm256_unpackhi_ps(r_0, r_1);
      const __m256 t2 = _mm256_unpacklo_ps(r_2, r_3), t3 = _mm256_unpackhi_ps(r_2, r_3);
      const __m256 t4 = _mm256_unpacklo_ps(r_4, r_5), t5 = _mm256_unpackhi_ps(r_4, r_5);
      const __m256 t6 = _mm256_unpacklo_ps(r_6, r_7), t7 = _mm256_unpackhi_ps(r_6, r_7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* d = dst + c0 * dst_stride + r0;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + dst_stride, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * dst_stride, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * dst_stride, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  transpose_scalar(src, src_stride, rows, cols, dst, dst_stride, rows8, cols8);
}
#endif

template <typename T>
void transpose_into(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
                    int64_t dst_stride) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    static const bool has_avx = __builtin_cpu_supports("avx");
    if (has_avx) return transpose_avx(src, src_stride, rows, cols, dst, dst_stride);
  }
#endif
  // Blocks of 16 rows: each destination row gets 16 contiguous values at a time.
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c = 0; c < cols; ++c) {
      T* d = dst + c * dst_stride;
      for (int64_t r = r0; r < r1; ++r) d[r] = src[r * src_stride + c];
    }
  }
}

// input [B, C, H, W] -> [B, H+2, W+2, C] with a zero border of one pixel.
// Parallel over output rows; each row is a transpose in 8x8 blocks (transpose_into).
at::Tensor padded_channels_last(const at::Tensor& input_any) {
  const at::Tensor input = input_any.contiguous();
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t padded_h = height + 2, padded_w = width + 2;
  at::Tensor out = at::empty({batch, padded_h, padded_w, channels}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "padded_channels_last", [&] {
    const scalar_t* src = input.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t row_grain = std::max<int64_t>(1, 32768 / (padded_w * channels));
    at::parallel_for(0, batch * padded_h, row_grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1;) {
        const int64_t b = r / padded_h, y0 = r % padded_h;
        const int64_t y1 = std::min(padded_h, y0 + (r1 - r));  // rows [y0, y1) of image b
        for (int64_t y = y0; y < y1; ++y) {
          scalar_t* row = dst + (b * padded_h + y) * padded_w * channels;
          if (y == 0 || y == padded_h - 1) {
            std::fill(row, row + padded_w * channels, scalar_t(0));
          } else {
            std::fill(row, row + channels, scalar_t(0));
            std::fill(row + (padded_w - 1) * channels, row + padded_w * channels, scalar_t(0));
          }
        }
        // Interior rows: [C, W] (plane stride H*W) -> [W, C] after the left border pixel.
        for (int64_t y = std::max<int64_t>(y0, 1); y < std::min(y1, height + 1); ++y) {
          transpose_into(src + (b * channels * height + (y - 1)) * width, height * width, channels,
                         width, dst + ((b * padded_h + y) * padded_w + 1) * channels, channels);
        }
        r += y1 - y0;
      }
    });
  });
  return out;
}

// grad_in_pad [H+2, W+2, C] of one image -> grad_input [C, H, W] (drops the border).
// The inverse of padded_channels_last's layout change, parallel over rows.
template <typename T>
void crop_to_channels_first(const DeformConvShape& s, const T* padded, T* out) {
  const int64_t channels = s.in_channels, height = s.height, width = s.width;
  const int64_t padded_w = s.padded_width();
  // max(1, ...): a zero-width input with padding still has output positions.
  const int64_t row_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width * channels));
  at::parallel_for(0, height, row_grain, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      // [W, C] -> [C, W] (plane stride H*W)
      transpose_into(padded + ((y + 1) * padded_w + 1) * channels, channels, width, channels,
                     out + y * width, height * width);
    }
  });
}

// weight [Cout, Cg, kh, kw] -> [groups, Cout/groups, K*Cg], matching the column order.
at::Tensor weight_as_rows(const at::Tensor& weight, const DeformConvShape& s) {
  return weight.reshape({s.groups, s.group_out(), s.group_in(), s.taps()})
      .permute({0, 1, 3, 2})
      .contiguous()
      .view({s.groups, s.group_out(), s.taps() * s.group_in()});
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformConvShape s = describe(input, offset, weight, mask, bias, stride, padding, dilation);
  // Every element is written below (no zero fill), except in the degenerate case.
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (s.batch == 0 || s.out_channels == 0 || s.in_channels == 0) {
    output.zero_();
    if (bias.has_value()) output.add_(bias->view({1, -1, 1, 1}));
    return output;
  }
  const at::Tensor in_pad = padded_channels_last(input);
  const at::Tensor offset_c = offset.contiguous();
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor weight_rows = weight_as_rows(weight, s);
  const int64_t tile_size = tile_positions(s, input.element_size());
  at::Tensor columns = at::empty({s.groups * tile_size * s.taps() * s.group_in()}, input.options());
  const bool onednn = use_onednn(input, s);
  std::vector<PackedLinear> linears;
  if (onednn) {
    for (int64_t g = 0; g < s.groups; ++g) {
      c10::optional<at::Tensor> bias_g;
      if (bias.has_value()) bias_g = bias->narrow(0, g * s.group_out(), s.group_out());
      linears.emplace_back(weight_rows[g], tile_size, bias_g);
    }
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
    for (int64_t b = 0; b < s.batch; ++b) {
      const scalar_t* in_pad_b = in_pad.data_ptr<scalar_t>() + b * s.padded_plane() * s.in_channels;
      const scalar_t* offset_b = offset_c.data_ptr<scalar_t>() + b * offset_c.stride(0);
      const scalar_t* mask_b =
          mask_c.defined() ? mask_c.data_ptr<scalar_t>() + b * mask_c.stride(0) : nullptr;
      const at::Tensor out_b = output.select(0, b).view({s.groups, s.group_out(), s.positions()});
      for (int64_t begin = 0; begin < s.positions(); begin += tile_size) {
        const Tile tile{begin, std::min(tile_size, s.positions() - begin)};
        const at::Tensor cols = tile_view(columns, s, tile);
        deformable_im2col<scalar_t>(s, tile, in_pad_b, offset_b, mask_b, cols.data_ptr<scalar_t>());
        if (onednn) {
          // out[g, Cout_g, tile] = (cols[g] [tile, K*Cg] @ weight[g]^T + bias)^T
          for (int64_t g = 0; g < s.groups; ++g) {
            const at::Tensor y = linears[g](cols[g]);
            transpose_into(y.data_ptr<scalar_t>(), s.group_out(), tile.size, s.group_out(),
                           out_b[g].data_ptr<scalar_t>() + begin, s.positions());
          }
        } else {
          // out[groups, Cout_g, tile] = weight[groups, Cout_g, K*Cg] @ cols^T
          at::Tensor out_tile = out_b.narrow(2, begin, tile.size);
          at::bmm_out(out_tile, weight_rows, cols.transpose(1, 2));
        }
      }
    }
  });
  if (bias.has_value() && !onednn) output.add_(bias->view({1, -1, 1, 1}));
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const DeformConvShape s = describe(input, offset, weight, mask, bias, stride, padding, dilation);
  check_same(grad_output, input, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.batch, s.out_channels, s.out_h, s.out_w}),
              "deform_conv2d_backward: grad_output has shape ", grad_output.sizes());
  const auto options = input.options();
  // Every element of these is written below (no zero fill), except in the degenerate case.
  at::Tensor grad_input = at::empty(input.sizes(), options);
  at::Tensor grad_offset = at::empty(offset.sizes(), options);
  at::Tensor grad_mask = mask.has_value() ? at::empty(mask->sizes(), options) : at::empty({0}, options);
  at::Tensor grad_bias = bias.has_value() ? grad_output.sum({0, 2, 3}) : at::empty({0}, options);
  if (s.batch == 0 || s.out_channels == 0 || s.in_channels == 0) {
    grad_input.zero_();
    grad_offset.zero_();
    grad_mask.zero_();
    return {grad_input, grad_offset, at::zeros(weight.sizes(), options), grad_mask, grad_bias};
  }

  const at::Tensor in_pad = padded_channels_last(input);
  const at::Tensor grad_out_c = grad_output.contiguous();
  const at::Tensor offset_c = offset.contiguous();
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor weight_rows = weight_as_rows(weight, s);
  at::Tensor grad_weight_rows = at::zeros_like(weight_rows);
  const int64_t column_width = s.taps() * s.group_in();
  const int64_t tile_size = tile_positions(s, input.element_size());
  at::Tensor columns = at::empty({s.groups * tile_size * column_width}, options);
  at::Tensor grad_columns = at::empty({s.groups * tile_size * column_width}, options);
  at::Tensor grad_in_pad = at::empty({s.height + 2, s.width + 2, s.in_channels}, options);
  // col2im's per-thread sums for the offset and mask gradients: [threads, tile, G, K, 4].
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.in_channels));
  at::Tensor dots = at::empty({slots * tile_size * s.offset_groups * s.taps() * 4}, options);
  std::vector<char> slot_used(slots);
  const bool onednn = use_onednn(input, s);
  std::vector<PackedLinear> grad_linears;  // per conv group: grad_cols = grad_out^T @ weight
  if (onednn) {
    for (int64_t g = 0; g < s.groups; ++g) grad_linears.emplace_back(weight_rows[g].t(), tile_size, c10::nullopt);
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    for (int64_t b = 0; b < s.batch; ++b) {
      const scalar_t* in_pad_b = in_pad.data_ptr<scalar_t>() + b * s.padded_plane() * s.in_channels;
      const scalar_t* offset_b = offset_c.data_ptr<scalar_t>() + b * offset_c.stride(0);
      const scalar_t* mask_b =
          mask_c.defined() ? mask_c.data_ptr<scalar_t>() + b * mask_c.stride(0) : nullptr;
      scalar_t* grad_offset_b = grad_offset.data_ptr<scalar_t>() + b * grad_offset.stride(0);
      scalar_t* grad_mask_b =
          mask.has_value() ? grad_mask.data_ptr<scalar_t>() + b * grad_mask.stride(0) : nullptr;
      const at::Tensor grad_out_b =
          grad_out_c.select(0, b).view({s.groups, s.group_out(), s.positions()});
      grad_in_pad.zero_();
      // [groups, P, Cout_g]: each tile's rows are the contiguous X of its oneDNN product.
      const at::Tensor grad_out_rows = onednn ? grad_out_b.transpose(1, 2).contiguous() : at::Tensor();
      for (int64_t begin = 0; begin < s.positions(); begin += tile_size) {
        const Tile tile{begin, std::min(tile_size, s.positions() - begin)};
        const at::Tensor cols = tile_view(columns, s, tile);
        at::Tensor grad_cols = tile_view(grad_columns, s, tile);
        const at::Tensor grad_out_tile = grad_out_b.narrow(2, begin, tile.size);

        // Weight gradient: grad_out [groups, Cout_g, tile] @ columns [groups, tile, K*Cg].
        deformable_im2col<scalar_t>(s, tile, in_pad_b, offset_b, mask_b, cols.data_ptr<scalar_t>());
        grad_weight_rows.baddbmm_(grad_out_tile, cols);

        // Column gradient: grad_out^T [groups, tile, Cout_g] @ weight [groups, Cout_g, K*Cg].
        const scalar_t* grad_cols_data = grad_cols.data_ptr<scalar_t>();
        at::Tensor grad_cols_onednn;
        if (onednn) {
          for (int64_t g = 0; g < s.groups; ++g) {
            at::Tensor y = grad_linears[g](grad_out_rows[g].narrow(0, begin, tile.size));
            if (s.groups == 1) {
              grad_cols_onednn = y;  // already [1, tile, K*Cg]
              grad_cols_data = y.data_ptr<scalar_t>();
            } else {
              grad_cols[g].copy_(y);
            }
          }
        } else {
          at::bmm_out(grad_cols, grad_out_tile.transpose(1, 2), weight_rows);
        }
        scalar_t* dots_data = dots.data_ptr<scalar_t>();
        deformable_col2im<scalar_t>(s, tile, grad_cols_data, in_pad_b, offset_b, mask_b,
                                    grad_in_pad.data_ptr<scalar_t>(), dots_data, slot_used);
        deformable_offset_grad<scalar_t>(s, tile, dots_data, slot_used, offset_b, mask_b,
                                         grad_offset_b, grad_mask_b);
      }
      crop_to_channels_first<scalar_t>(s, grad_in_pad.data_ptr<scalar_t>(),
                                       grad_input.data_ptr<scalar_t>() + b * grad_input.stride(0));
    }
  });
  at::Tensor grad_weight = grad_weight_rows.view({s.groups, s.group_out(), s.taps(), s.group_in()})
                               .permute({0, 1, 3, 2})
                               .reshape(weight.sizes())
                               .contiguous();
  return {grad_input, grad_offset, grad_weight, grad_mask, grad_bias};
}

}  // namespace
}  // namespace cpu
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, CPU, m) {
  m.impl("deform_conv2d", &detkit::cpu::deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &detkit::cpu::deform_conv2d_backward_cpu);
}
