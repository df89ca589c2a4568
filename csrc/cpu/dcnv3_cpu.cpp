// CPU kernels of detkit::dcnv3_core / dcnv4_core and their backwards.
//
// Both ops are one computation: for output pixel p, group g and point k,
//   out[p, g*D + t] += m[p, g, k] * bilinear(input, y_k(p), x_k(p))[g*D + t],
// with the point positions of the official kernels (docs/ops.md, "DCNv3 and
// DCNv4"). DCNv4's packed [.., P] tensor is DCNv3's offset and mask read with
// other strides (per group 2K offsets, then K weights), so one kernel serves
// both: `Sampling` carries the pointers and strides.
//
// Why it is fast:
//  * Channels-last in and out, no im2col buffer: each sample's four corner
//    pixels are four contiguous vectors of the group's D channels, and the
//    corner indices and weights are computed once per (pixel, group, point)
//    and applied to those D channels by a SIMD loop.
//  * No padded copy of the input: a corner outside the image points at a
//    vector of zeros (forward, and the backward's reads) or at a per-thread
//    scratch vector (the backward's writes), so the inner loops never branch.
//  * The scalar work of a pixel's samples (positions, floors, corner indices,
//    weights) is done first for all of them at once, a loop the compiler
//    vectorises (stage 1); the channel loops then only load and add (stage 2).
//    For D = 8, 16, 32, 64 the group's accumulator is a register vector.
//  * The hot loops are compiled as x86-64-v4 (AVX-512), v3 (AVX2) and baseline
//    clones (GCC target_clones); the loader picks one by the CPU's features.
//
// Threads never write the same element. Forward: split over output pixels.
// Backward: over (image, group) pairs, whose input-gradient writes are
// disjoint (image n, channels of group g), when there are enough of them;
// otherwise over pixel ranges, each accumulating the input gradient into its
// own buffer, summed in a fixed order at the end. Either way the result is
// deterministic for a given thread count (the first split for any count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../dcn_shapes.h"

// The vector helpers below are always inlined, so the ABI note about returning
// wide vectors from the baseline clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// Clones by ISA level, not by CPU model: GCC's resolver for "arch=skylake-avx512"
// / "arch=haswell" tests the processor model and picks the baseline on AMD CPUs
// with AVX-512 (measured on the project's EPYC); "arch=x86-64-v4" / "-v3" test
// the features. GCC < 12 cannot dispatch on ISA levels: there, feature clones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DETKIT_DCN_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DETKIT_DCN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DETKIT_DCN_CLONES
#endif

namespace detkit {
namespace cpu {

// Where the offsets and weights of (pixel p, group g) are: point k's (x, y)
// offset at offset[p*offset_pixel + g*offset_group + 2k + {0, 1}], its weight
// at mask[p*mask_pixel + g*mask_group + k].
template <typename T>
struct Sampling {
  const T* offset;
  const T* mask;
  int64_t offset_pixel, offset_group, mask_pixel, mask_group;
};

// Gradients of the sampling parameters, with the same strides as `Sampling`.
template <typename T>
struct SamplingGrad {
  T* offset;
  T* mask;
};

// The kernel points in the official order (x index i outer, y index j inner),
// as their undeformed distance from the first point, i*dil_w and j*dil_h.
template <typename T>
struct PointTable {
  std::vector<T> dx, dy;
};

template <typename T>
PointTable<T> point_table(const DcnGeometry& s) {
  PointTable<T> table;
  const int64_t center_i = s.kernel_w / 2, center_j = s.kernel_h / 2;
  for (int64_t i = 0; i < s.kernel_w; ++i) {
    for (int64_t j = 0; j < s.kernel_h; ++j) {
      if (s.remove_center && i == center_i && j == center_j) continue;
      table.dx.push_back(static_cast<T>(i * s.dil_w));
      table.dy.push_back(static_cast<T>(j * s.dil_h));
    }
  }
  return table;
}

// Per-call tables over the S = G*K samples of one pixel, sample i = g*K + k.
template <typename T>
struct SampleTable {
  std::vector<T> dx, dy;                       // undeformed point, i*dil_w and j*dil_h
  std::vector<int32_t> offset, mask, channel;  // x offset and weight in the pixel's rows; g*D
  SampleTable(const DcnGeometry& s, const PointTable<T>& points, const Sampling<T>& sp) {
    for (int64_t g = 0; g < s.group; ++g) {
      for (int64_t k = 0; k < s.points; ++k) {
        dx.push_back(points.dx[k]);
        dy.push_back(points.dy[k]);
        offset.push_back(static_cast<int32_t>(g * sp.offset_group + 2 * k));
        mask.push_back(static_cast<int32_t>(g * sp.mask_group + k));
        channel.push_back(static_cast<int32_t>(g * s.group_channels));
      }
    }
  }
};

namespace {

#define DETKIT_INLINE inline __attribute__((always_inline))

// Sample positions of output pixel (ho, wo), as the official kernels compute
// them: p0 = (dil*(k-1))/2 - pad + o*stride, then
// loc = p0 - (dil*(k-1))/2 * offset_scale + (point + offset) * offset_scale.
template <typename T>
struct PixelOrigin {
  T x, y;
};

template <typename T>
DETKIT_INLINE PixelOrigin<T> origin(const DcnGeometry& s, int64_t ho, int64_t wo, T scale) {
  const int64_t half_w = (s.dil_w * (s.kernel_w - 1)) / 2, half_h = (s.dil_h * (s.kernel_h - 1)) / 2;
  const int64_t p0_w = half_w - s.pad_w + wo * s.stride_w;
  const int64_t p0_h = half_h - s.pad_h + ho * s.stride_h;
  return {static_cast<T>(p0_w) - static_cast<T>(half_w) * scale,
          static_cast<T>(p0_h) - static_cast<T>(half_h) * scale};
}

// Where the samples of one pixel land (stage 1, vectorised over samples);
// arrays of S entries. kind: 0 reads zero (outside (-1, H) x (-1, W) or not
// finite), 1 all four corners inside, 2 some corners outside.
template <typename T>
struct Plan {
  std::vector<int32_t> kind, y0, x0, index;  // index: element of corner (y0, x0) + g*D in the image
  std::vector<T> ly, lx, m;
  explicit Plan(int64_t size) : kind(size), y0(size), x0(size), index(size), ly(size), lx(size), m(size) {}
};

// Samples [i0, i0 + count) of a pixel, whose (x, y) offsets are off[2j], off[2j + 1] and
// weights m[j] for j < count. Contiguous reads, raw pointers and scalars only, and not
// inlined: that is what GCC vectorises (inlined into the kernel, or reading through an
// index table, the loop stayed scalar).
}  // namespace

#define DETKIT_DCN_PLAN_RUN(T)                                                                          \
  DETKIT_DCN_CLONES __attribute__((noinline)) void plan_run_raw(                                      \
      const T* __restrict__ dx, const T* __restrict__ dy, const int32_t* __restrict__ chan,             \
      const T* __restrict__ off, const T* __restrict__ msk, T ox, T oy, T scale, T height, T width,     \
      int32_t h, int32_t w, int32_t c, int64_t count, int32_t* __restrict__ kind,                       \
      int32_t* __restrict__ py0, int32_t* __restrict__ px0, int32_t* __restrict__ pindex,               \
      T* __restrict__ ply, T* __restrict__ plx, T* __restrict__ pm) {                                   \
    _Pragma("omp simd") for (int64_t j = 0; j < count; ++j) {                                           \
      const T x = ox + (dx[j] + off[2 * j]) * scale;                                                    \
      const T y = oy + (dy[j] + off[2 * j + 1]) * scale;                                                \
      /* Comparisons are false for NaN, so NaN lands outside and clamps to -1: the clamped */          \
      /* positions (used only inside) stay finite. */                                                   \
      const int32_t inside = (y > T(-1)) & (y < height) & (x > T(-1)) & (x < width);                    \
      const T yc = y > T(-1) ? y : T(-1), xc = x > T(-1) ? x : T(-1);                                   \
      const T ys = yc < height ? yc : height, xs = xc < width ? xc : width;                             \
      /* floor without a library call (ys, xs are in [-1, H] x [-1, W]) */                             \
      const int32_t ty = static_cast<int32_t>(ys), tx = static_cast<int32_t>(xs);                       \
      const int32_t y0 = ty - (static_cast<T>(ty) > ys), x0 = tx - (static_cast<T>(tx) > xs);           \
      const int32_t interior = (y0 >= 0) & (y0 < h - 1) & (x0 >= 0) & (x0 < w - 1);                     \
      kind[j] = inside * (2 - interior); /* branch-free, so the loop vectorises */                      \
      py0[j] = y0;                                                                                      \
      px0[j] = x0;                                                                                      \
      pindex[j] = (y0 * w + x0) * c + chan[j];                                                          \
      ply[j] = ys - static_cast<T>(y0);                                                                 \
      plx[j] = xs - static_cast<T>(x0);                                                                 \
      pm[j] = msk[j];                                                                                   \
    }                                                                                                   \
  }

DETKIT_DCN_PLAN_RUN(float)
DETKIT_DCN_PLAN_RUN(double)
#undef DETKIT_DCN_PLAN_RUN

namespace {

template <typename T>
DETKIT_INLINE void plan_run(const DcnGeometry& s, const SampleTable<T>& tab, const T* off, const T* msk,
                            PixelOrigin<T> o, T scale, int64_t i0, int64_t count, Plan<T>& plan) {
  plan_run_raw(tab.dx.data() + i0, tab.dy.data() + i0, tab.channel.data() + i0, off, msk, o.x, o.y, scale,
               static_cast<T>(s.height), static_cast<T>(s.width), static_cast<int32_t>(s.height),
               static_cast<int32_t>(s.width), static_cast<int32_t>(s.channels), count, plan.kind.data() + i0,
               plan.y0.data() + i0, plan.x0.data() + i0, plan.index.data() + i0, plan.ly.data() + i0,
               plan.lx.data() + i0, plan.m.data() + i0);
}

// Plans the samples of groups [g0, g1) of a pixel (stage 1).
template <typename T>
DETKIT_INLINE void plan_samples(const DcnGeometry& s, const SampleTable<T>& tab, const Sampling<T>& sp,
                                int64_t p, PixelOrigin<T> o, T scale, int64_t g0, int64_t g1, Plan<T>& plan) {
  const int64_t K = s.points;
  const T* off_row = sp.offset + p * sp.offset_pixel;
  const T* mask_row = sp.mask + p * sp.mask_pixel;
  if (sp.offset_group == 2 * K && sp.mask_group == K) {  // DCNv3: the groups are contiguous too
    plan_run(s, tab, off_row + g0 * 2 * K, mask_row + g0 * K, o, scale, g0 * K, (g1 - g0) * K, plan);
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {
    plan_run(s, tab, off_row + g * sp.offset_group, mask_row + g * sp.mask_group, o, scale, g * K, K, plan);
  }
}

// Corner element indices of a border sample (kind 2), -1 where outside.
struct BorderCorners {
  int64_t i00, i01, i10, i11;
};

DETKIT_INLINE BorderCorners border_corners(const DcnGeometry& s, int32_t y0, int32_t x0, int64_t index) {
  const bool top = y0 >= 0, bottom = y0 + 1 < s.height, left = x0 >= 0, right = x0 + 1 < s.width;
  const int64_t row = s.width * s.channels;
  return {top && left ? index : -1, top && right ? index + s.channels : -1,
          bottom && left ? index + row : -1, bottom && right ? index + row + s.channels : -1};
}

// GCC vector of N elements of T (lowered to the clone's widest registers).
template <typename T, int N>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * N)));
};

template <typename V, typename T>
DETKIT_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
DETKIT_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename T, int N>
DETKIT_INLINE T hsum(typename VecOf<T, N>::type v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    using Half = typename VecOf<T, N / 2>::type;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(Half));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return hsum<T, N / 2>(lo + hi);
  }
}

// Stage 2 of the forward for samples [g*K, (g+1)*K) of one pixel: out[0, D).
// DC > 0: D == DC, the accumulator is one vector register set; DC == 0: any D.
template <typename T, int DC>
DETKIT_INLINE void forward_group(const DcnGeometry& s, const Plan<T>& plan, int64_t i0, const T* in_n,
                                 const T* zeros, T* __restrict__ out) {
  const int64_t D = DC > 0 ? DC : s.group_channels, K = s.points;
  const int64_t C = s.channels, row = s.width * s.channels;
  if constexpr (DC > 0) {
    using V = typename VecOf<T, DC>::type;
    V acc = {};
    for (int64_t i = i0; i < i0 + K; ++i) {
      const int32_t kind = plan.kind[i];
      if (kind == 0) continue;
      const T ly = plan.ly[i], lx = plan.lx[i], hy = 1 - ly, hx = 1 - lx, m = plan.m[i];
      const T w00 = m * hy * hx, w01 = m * hy * lx, w10 = m * ly * hx, w11 = m * ly * lx;
      if (kind == 1) {
        const T* p = in_n + plan.index[i];
        acc += w00 * load<V>(p) + w01 * load<V>(p + C) + w10 * load<V>(p + row) + w11 * load<V>(p + row + C);
      } else {
        const BorderCorners b = border_corners(s, plan.y0[i], plan.x0[i], plan.index[i]);
        acc += w00 * load<V>(b.i00 >= 0 ? in_n + b.i00 : zeros) + w01 * load<V>(b.i01 >= 0 ? in_n + b.i01 : zeros) +
               w10 * load<V>(b.i10 >= 0 ? in_n + b.i10 : zeros) + w11 * load<V>(b.i11 >= 0 ? in_n + b.i11 : zeros);
      }
    }
    store(out, acc);
  } else {
    std::fill(out, out + D, T(0));
    for (int64_t i = i0; i < i0 + K; ++i) {
      const int32_t kind = plan.kind[i];
      if (kind == 0) continue;
      const T ly = plan.ly[i], lx = plan.lx[i], hy = 1 - ly, hx = 1 - lx, m = plan.m[i];
      const T w00 = m * hy * hx, w01 = m * hy * lx, w10 = m * ly * hx, w11 = m * ly * lx;
      const T *v00, *v01, *v10, *v11;
      if (kind == 1) {
        v00 = in_n + plan.index[i];
        v01 = v00 + C;
        v10 = v00 + row;
        v11 = v10 + C;
      } else {
        const BorderCorners b = border_corners(s, plan.y0[i], plan.x0[i], plan.index[i]);
        v00 = b.i00 >= 0 ? in_n + b.i00 : zeros;
        v01 = b.i01 >= 0 ? in_n + b.i01 : zeros;
        v10 = b.i10 >= 0 ? in_n + b.i10 : zeros;
        v11 = b.i11 >= 0 ? in_n + b.i11 : zeros;
      }
#pragma omp simd
      for (int64_t t = 0; t < D; ++t) out[t] += w00 * v00[t] + w01 * v01[t] + w10 * v10[t] + w11 * v11[t];
    }
  }
}

template <typename T, int DC>
DETKIT_INLINE void forward_impl(const DcnGeometry& s, const SampleTable<T>& tab, const T* input,
                                Sampling<T> sp, const T* zeros, T* output, int64_t p_begin, int64_t p_end) {
  const T scale = static_cast<T>(s.offset_scale);
  Plan<T> plan(s.group * s.points);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t n = p / s.out_plane(), q = p % s.out_plane();
    const PixelOrigin<T> o = origin<T>(s, q / s.out_w, q % s.out_w, scale);
    const T* in_n = input + n * s.height * s.width * s.channels;
    plan_samples(s, tab, sp, p, o, scale, 0, s.group, plan);
    for (int64_t g = 0; g < s.group; ++g) {
      forward_group<T, DC>(s, plan, g * s.points, in_n, zeros, output + p * s.channels + g * s.group_channels);
    }
  }
}

// Stage 2 of the backward for sample i of a pixel: adds the input gradient
// (scratch takes the writes of corners outside the image), returns the
// weight gradient and writes the offset gradient.
template <typename T, int DC>
DETKIT_INLINE void backward_sample(const DcnGeometry& s, const Plan<T>& plan, int64_t i, const T* gout,
                                   const T* in_n, T* gin_n, const T* zeros, T* scratch, T scale,
                                   T* goff_xy, T* gmask) {
  const int64_t D = DC > 0 ? DC : s.group_channels;
  const int64_t C = s.channels, row = s.width * s.channels;
  const int32_t kind = plan.kind[i];
  if (kind == 0) {
    goff_xy[0] = T(0);
    goff_xy[1] = T(0);
    *gmask = T(0);
    return;
  }
  const T ly = plan.ly[i], lx = plan.lx[i], hy = 1 - ly, hx = 1 - lx, m = plan.m[i];
  const T w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
  const T *v00, *v01, *v10, *v11;
  T *d00, *d01, *d10, *d11;
  if (kind == 1) {
    const int64_t index = plan.index[i];
    v00 = in_n + index;
    d00 = gin_n + index;
    v01 = v00 + C;
    d01 = d00 + C;
    v10 = v00 + row;
    d10 = d00 + row;
    v11 = v10 + C;
    d11 = d10 + C;
  } else {
    const BorderCorners b = border_corners(s, plan.y0[i], plan.x0[i], plan.index[i]);
    v00 = b.i00 >= 0 ? in_n + b.i00 : zeros;
    v01 = b.i01 >= 0 ? in_n + b.i01 : zeros;
    v10 = b.i10 >= 0 ? in_n + b.i10 : zeros;
    v11 = b.i11 >= 0 ? in_n + b.i11 : zeros;
    d00 = b.i00 >= 0 ? gin_n + b.i00 : scratch;
    d01 = b.i01 >= 0 ? gin_n + b.i01 : scratch;
    d10 = b.i10 >= 0 ? gin_n + b.i10 : scratch;
    d11 = b.i11 >= 0 ? gin_n + b.i11 : scratch;
  }
  T value, d_y, d_x;
  if constexpr (DC > 0) {
    using V = typename VecOf<T, DC>::type;
    const V gv = load<V>(gout);
    const V a = load<V>(v00), b = load<V>(v01), c = load<V>(v10), d = load<V>(v11);
    value = hsum<T, DC>(gv * (w00 * a + w01 * b + w10 * c + w11 * d));
    d_y = hsum<T, DC>(gv * (hx * (c - a) + lx * (d - b)));
    d_x = hsum<T, DC>(gv * (hy * (b - a) + ly * (d - c)));
    // In order: with several corners outside, d00..d11 may all be the scratch vector.
    store(d00, load<V>(d00) + (m * w00) * gv);
    store(d01, load<V>(d01) + (m * w01) * gv);
    store(d10, load<V>(d10) + (m * w10) * gv);
    store(d11, load<V>(d11) + (m * w11) * gv);
  } else {
    value = 0;
    d_y = 0;
    d_x = 0;
    const T mw00 = m * w00, mw01 = m * w01, mw10 = m * w10, mw11 = m * w11;
    // Invalid corners' writes all go to the scratch vector (aliasing each
    // other only there, whose contents are never read).
#pragma omp simd reduction(+ : value, d_y, d_x)
    for (int64_t t = 0; t < D; ++t) {
      const T gt = gout[t];
      const T a = v00[t], b = v01[t], c = v10[t], d = v11[t];
      value += gt * (w00 * a + w01 * b + w10 * c + w11 * d);
      d_y += gt * (hx * (c - a) + lx * (d - b));
      d_x += gt * (hy * (b - a) + ly * (d - c));
      d00[t] += mw00 * gt;
      d01[t] += mw01 * gt;
      d10[t] += mw10 * gt;
      d11[t] += mw11 * gt;
    }
  }
  goff_xy[0] = m * scale * d_x;
  goff_xy[1] = m * scale * d_y;
  *gmask = value;
}

// Backward of pixels [p_begin, p_end) and groups [g_begin, g_end): adds the
// input gradient into grad_input (an [N, H, W, C] buffer), writes the offset
// and weight gradients.
template <typename T, int DC>
DETKIT_INLINE void backward_impl(const DcnGeometry& s, const SampleTable<T>& tab, const T* grad_output,
                                 const T* input, Sampling<T> sp, const T* zeros, T* scratch, T* grad_input,
                                 SamplingGrad<T> gp, int64_t p_begin, int64_t p_end, int64_t g_begin,
                                 int64_t g_end) {
  const int64_t D = s.group_channels, K = s.points;
  const T scale = static_cast<T>(s.offset_scale);
  Plan<T> plan(s.group * s.points);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t n = p / s.out_plane(), q = p % s.out_plane();
    const PixelOrigin<T> o = origin<T>(s, q / s.out_w, q % s.out_w, scale);
    const int64_t image = n * s.height * s.width * s.channels;
    plan_samples(s, tab, sp, p, o, scale, g_begin, g_end, plan);
    T* goff = gp.offset + p * sp.offset_pixel;
    T* gmsk = gp.mask + p * sp.mask_pixel;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const T* gout = grad_output + p * s.channels + g * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = g * K + k;
        backward_sample<T, DC>(s, plan, i, gout, input + image, grad_input + image, zeros, scratch, scale,
                               goff + tab.offset[i], gmsk + tab.mask[i]);
      }
    }
  }
}

}  // namespace

// The cloned entry points (non-template, so target_clones applies).
// One switch case per register-resident channel count (DC = D), DC = 0 for any other D.
#define DETKIT_DCN_SWITCH(D, CALL) \
  switch (D) {                     \
    case 8: CALL(8); break;        \
    case 16: CALL(16); break;      \
    case 32: CALL(32); break;      \
    case 64: CALL(64); break;      \
    default: CALL(0); break;       \
  }

// The cloned entry points: non-template (so target_clones applies), with the
// hot loops inlined into each clone (no lambdas: they would not be cloned).
#define DETKIT_DCN_ENTRY_POINTS(T)                                                                   \
  DETKIT_DCN_CLONES void dcn_forward_pixels(const DcnGeometry& s, const SampleTable<T>& tab,         \
                                            const T* input, Sampling<T> sp, const T* zeros,          \
                                            T* output, int64_t p_begin, int64_t p_end) {             \
    using Scalar = T;                                                                                \
    DETKIT_DCN_SWITCH(s.group_channels, DETKIT_DCN_FORWARD)                                          \
  }                                                                                                  \
  DETKIT_DCN_CLONES void dcn_backward_pixels(const DcnGeometry& s, const SampleTable<T>& tab,        \
                                             const T* grad_output, const T* input, Sampling<T> sp,   \
                                             const T* zeros, T* scratch, T* grad_input,              \
                                             SamplingGrad<T> gp, int64_t p_begin, int64_t p_end,     \
                                             int64_t g_begin, int64_t g_end) {                       \
    using Scalar = T;                                                                                \
    DETKIT_DCN_SWITCH(s.group_channels, DETKIT_DCN_BACKWARD)                                         \
  }

#define DETKIT_DCN_FORWARD(DC) forward_impl<Scalar, DC>(s, tab, input, sp, zeros, output, p_begin, p_end)
#define DETKIT_DCN_BACKWARD(DC)                                                                    \
  backward_impl<Scalar, DC>(s, tab, grad_output, input, sp, zeros, scratch, grad_input, gp, p_begin, p_end, \
                       g_begin, g_end)

DETKIT_DCN_ENTRY_POINTS(float)
DETKIT_DCN_ENTRY_POINTS(double)

#undef DETKIT_DCN_ENTRY_POINTS
#undef DETKIT_DCN_FORWARD
#undef DETKIT_DCN_BACKWARD
#undef DETKIT_DCN_SWITCH

namespace {

// Float32 and float64, on the CPU; the sample tables index an image's
// elements with int32.
constexpr DcnBackend kCpu{at::kCPU, "CPU", /*reduced_precision=*/false, /*int32_images=*/true};

template <typename T>
Sampling<T> sampling_of(DcnPacking packing, const DcnGeometry& s, const at::Tensor& offset,
                        const at::Tensor& mask) {
  const DcnLayout lay = dcn_layout(packing, s);
  const T* weights = packing == DcnPacking::kSeparate ? mask.data_ptr<T>() : offset.data_ptr<T>();
  return {offset.data_ptr<T>(), weights + dcn_weights_first(packing, s), lay.offset_pixel,
          lay.offset_group, lay.mask_pixel, lay.mask_group};
}

// dst[e] += src[e], e < n.
template <typename T>
void add_into(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] += src[e];
}

inline int64_t pixel_grain(const DcnGeometry& s) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.group * s.points * std::max<int64_t>(s.group_channels, 8)));
}

at::Tensor dcn_forward(DcnPacking packing, const at::Tensor& input_any, const at::Tensor& offset_any,
                       const at::Tensor* mask_any, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                       int64_t group_channels, double offset_scale, bool remove_center) {
  const DcnGeometry s = describe_dcn(kCpu, packing, input_any, offset_any, mask_any, kernel_size, stride,
                                     padding, dilation, group, group_channels, offset_scale, remove_center);
  const at::Tensor input = input_any.contiguous(), offset = offset_any.contiguous();
  const at::Tensor mask = mask_any ? mask_any->contiguous() : at::Tensor();
  at::Tensor output = at::empty({s.batch, s.out_h, s.out_w, s.channels}, input.options());
  if (s.pixels() == 0 || s.channels == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward_cpu", [&] {
    const std::vector<scalar_t> zeros(s.group_channels, scalar_t(0));
    const Sampling<scalar_t> sp = sampling_of<scalar_t>(packing, s, offset, mask);
    const SampleTable<scalar_t> tab(s, point_table<scalar_t>(s), sp);
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    at::parallel_for(0, s.pixels(), pixel_grain(s), [&](int64_t p0, int64_t p1) {
      dcn_forward_pixels(s, tab, in, sp, zeros.data(), out, p0, p1);
    });
  });
  return output;
}

// Returns grad_input and the gradient of the sampling tensor(s) (grad_offset
// and grad_mask, or grad_offset_mask whose padding stays zero).
std::vector<at::Tensor> dcn_backward(DcnPacking packing, const at::Tensor& grad_output_any,
                                     const at::Tensor& input_any, const at::Tensor& offset_any,
                                     const at::Tensor* mask_any, at::IntArrayRef kernel_size,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                                     double offset_scale, bool remove_center) {
  const DcnGeometry s = describe_dcn(kCpu, packing, input_any, offset_any, mask_any, kernel_size, stride,
                                     padding, dilation, group, group_channels, offset_scale, remove_center);
  check_dcn_grad_output(packing, grad_output_any, input_any, s);
  const at::Tensor input = input_any.contiguous(), offset = offset_any.contiguous();
  const at::Tensor mask = mask_any ? mask_any->contiguous() : at::Tensor();
  const at::Tensor grad_output = grad_output_any.contiguous();
  at::Tensor grad_input = at::zeros(input.sizes(), input.options());
  at::Tensor grad_offset = at::zeros(offset.sizes(), offset.options());
  at::Tensor grad_mask = mask.defined() ? at::zeros(mask.sizes(), mask.options()) : at::Tensor();
  auto result = [&]() -> std::vector<at::Tensor> {
    if (packing == DcnPacking::kSeparate) return {grad_input, grad_offset, grad_mask};
    return {grad_input, grad_offset};
  };
  if (s.pixels() == 0 || s.channels == 0) return result();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_backward_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> zeros(s.group_channels, T(0));
    const Sampling<T> sp = sampling_of<T>(packing, s, offset, mask);
    const SampleTable<T> tab(s, point_table<T>(s), sp);
    SamplingGrad<T> gp{grad_offset.data_ptr<T>(), nullptr};
    gp.mask = packing == DcnPacking::kSeparate ? grad_mask.data_ptr<T>() : gp.offset + 2 * s.points;
    const T* in = input.data_ptr<T>();
    const T* gout = grad_output.data_ptr<T>();
    T* gin = grad_input.data_ptr<T>();

    const int64_t threads = at::get_num_threads();
    const int64_t items = s.batch * s.group;  // (image, group) pairs
    if (threads <= 1 || items >= 4 * threads || items % threads == 0) {
      // Disjoint writes: item (n, g) owns the input gradient of image n, group g.
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        std::vector<T> scratch(s.group_channels);
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t n = item / s.group, g = item % s.group;
          dcn_backward_pixels(s, tab, gout, in, sp, zeros.data(),
                              scratch.data(), gin, gp, n * s.out_plane(), (n + 1) * s.out_plane(), g,
                              g + 1);
        }
      });
    } else {
      // Too few (image, group) pairs to keep the threads busy: split the pixels
      // into one range per thread; range r > 0 accumulates its input gradient in
      // buffer r - 1, added to range 0's (grad_input itself) in order at the end.
      const int64_t chunks = std::min(threads, s.pixels());
      const int64_t per_chunk = (s.pixels() + chunks - 1) / chunks;
      at::Tensor buffers = at::zeros({chunks - 1, grad_input.numel()}, input.options());
      T* buf = buffers.data_ptr<T>();
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<T> scratch(s.group_channels);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t p0 = c * per_chunk, p1 = std::min(s.pixels(), p0 + per_chunk);
          if (p0 >= p1) continue;
          T* target = c == 0 ? gin : buf + (c - 1) * grad_input.numel();
          dcn_backward_pixels(s, tab, gout, in, sp, zeros.data(),
                              scratch.data(), target, gp, p0, p1, 0, s.group);
        }
      });
      const int64_t numel = grad_input.numel();
      at::parallel_for(0, numel, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t c = 0; c + 1 < chunks; ++c) {
          add_into(gin + e0, buf + c * numel + e0, e1 - e0);
        }
      });
    }
  });
  return result();
}

at::Tensor dcnv3_core_cpu(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                          double offset_scale, bool remove_center) {
  return dcn_forward(DcnPacking::kSeparate, input, offset, &mask, kernel_size, stride, padding, dilation,
                     group, group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_core_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  auto grads = dcn_backward(DcnPacking::kSeparate, grad_output, input, offset, &mask, kernel_size, stride,
                            padding, dilation, group, group_channels, offset_scale, remove_center);
  return {grads[0], grads[1], grads[2]};
}

at::Tensor dcnv4_core_cpu(const at::Tensor& input, const at::Tensor& offset_mask,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                          double offset_scale, bool remove_center) {
  return dcn_forward(DcnPacking::kPacked, input, offset_mask, nullptr, kernel_size, stride, padding, dilation,
                     group, group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor> dcnv4_core_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_mask,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t group, int64_t group_channels, double offset_scale, bool remove_center) {
  auto grads = dcn_backward(DcnPacking::kPacked, grad_output, input, offset_mask, nullptr, kernel_size, stride,
                            padding, dilation, group, group_channels, offset_scale, remove_center);
  return {grads[0], grads[1]};
}

}  // namespace
}  // namespace cpu
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, CPU, m) {
  m.impl("dcnv3_core", &detkit::cpu::dcnv3_core_cpu);
  m.impl("dcnv3_core_backward", &detkit::cpu::dcnv3_core_backward_cpu);
  m.impl("dcnv4_core", &detkit::cpu::dcnv4_core_cpu);
  m.impl("dcnv4_core_backward", &detkit::cpu::dcnv4_core_backward_cpu);
}
