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
//  * The hot loops are compiled as AVX-512, AVX2 and baseline clones
//    (GCC target_clones, like channel_loops.cpp); the loader picks one.
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
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DETKIT_DCN_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define DETKIT_DCN_CLONES
#endif

namespace detkit {
namespace cpu {

// Shapes and geometry of one call.
struct DcnGeometry {
  int64_t batch, height, width, channels, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t group, group_channels, points;  // points K = kh*kw, minus 1 with remove_center
  bool remove_center;
  double offset_scale;

  int64_t out_plane() const { return out_h * out_w; }
  int64_t pixels() const { return batch * out_h * out_w; }
};

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

namespace {

// One bilinear sample: corner vectors (or the zero / scratch vector where a
// corner is outside the image) and the weights (hy*hx, hy*lx, ly*hx, ly*lx).
template <typename T>
struct Corners {
  int64_t i00, i01, i10, i11;  // element index of the corner's group vector, or -1
  T ly, lx;
};

// Locates (y, x); false when the sample reads zero: outside (-1, H) x (-1, W)
// or not finite (written as a negated conjunction so NaN lands outside).
template <typename T>
inline __attribute__((always_inline)) bool locate(const DcnGeometry& s, T y, T x, int64_t group_offset,
                                                  Corners<T>& c) {
  if (!(y > T(-1) && y < static_cast<T>(s.height) && x > T(-1) && x < static_cast<T>(s.width)))
    return false;
  const T y0f = std::floor(y), x0f = std::floor(x);
  const int64_t y0 = static_cast<int64_t>(y0f), x0 = static_cast<int64_t>(x0f);
  const bool top = y0 >= 0, bottom = y0 + 1 < s.height, left = x0 >= 0, right = x0 + 1 < s.width;
  const int64_t row = s.width * s.channels;
  const int64_t i00 = y0 * row + x0 * s.channels + group_offset;
  c.i00 = top && left ? i00 : -1;
  c.i01 = top && right ? i00 + s.channels : -1;
  c.i10 = bottom && left ? i00 + row : -1;
  c.i11 = bottom && right ? i00 + row + s.channels : -1;
  c.ly = y - y0f;
  c.lx = x - x0f;
  return true;
}

// Sample positions of output pixel (ho, wo), as the official kernels compute
// them: p0 = (dil*(k-1))/2 - pad + o*stride, then
// loc = p0 - (dil*(k-1))/2 * offset_scale + (point + offset) * offset_scale.
template <typename T>
struct PixelOrigin {
  T x, y;
};

template <typename T>
inline PixelOrigin<T> origin(const DcnGeometry& s, int64_t ho, int64_t wo, T scale) {
  const int64_t half_w = (s.dil_w * (s.kernel_w - 1)) / 2, half_h = (s.dil_h * (s.kernel_h - 1)) / 2;
  const int64_t p0_w = half_w - s.pad_w + wo * s.stride_w;
  const int64_t p0_h = half_h - s.pad_h + ho * s.stride_h;
  return {static_cast<T>(p0_w) - static_cast<T>(half_w) * scale,
          static_cast<T>(p0_h) - static_cast<T>(half_h) * scale};
}

template <typename T>
inline __attribute__((always_inline)) void forward_impl(const DcnGeometry& s, const T* dx, const T* dy,
                                                        const T* input, Sampling<T> sp, const T* zeros,
                                                        T* output, int64_t p_begin, int64_t p_end) {
  const int64_t D = s.group_channels, K = s.points;
  const T scale = static_cast<T>(s.offset_scale);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t n = p / s.out_plane(), q = p % s.out_plane();
    const PixelOrigin<T> o = origin<T>(s, q / s.out_w, q % s.out_w, scale);
    const T* in_n = input + n * s.height * s.width * s.channels;
    for (int64_t g = 0; g < s.group; ++g) {
      T* out = output + p * s.channels + g * D;
      const T* off = sp.offset + p * sp.offset_pixel + g * sp.offset_group;
      const T* msk = sp.mask + p * sp.mask_pixel + g * sp.mask_group;
      bool written = false;
      for (int64_t k = 0; k < K; ++k) {
        const T x = o.x + (dx[k] + off[2 * k]) * scale;
        const T y = o.y + (dy[k] + off[2 * k + 1]) * scale;
        Corners<T> c;
        if (!locate(s, y, x, g * D, c)) continue;
        const T m = msk[k], hy = 1 - c.ly, hx = 1 - c.lx;
        const T w00 = m * hy * hx, w01 = m * hy * c.lx, w10 = m * c.ly * hx, w11 = m * c.ly * c.lx;
        const T* __restrict__ v00 = c.i00 >= 0 ? in_n + c.i00 : zeros;
        const T* __restrict__ v01 = c.i01 >= 0 ? in_n + c.i01 : zeros;
        const T* __restrict__ v10 = c.i10 >= 0 ? in_n + c.i10 : zeros;
        const T* __restrict__ v11 = c.i11 >= 0 ? in_n + c.i11 : zeros;
        T* __restrict__ dst = out;
        if (written) {
#pragma omp simd
          for (int64_t t = 0; t < D; ++t) dst[t] += w00 * v00[t] + w01 * v01[t] + w10 * v10[t] + w11 * v11[t];
        } else {
#pragma omp simd
          for (int64_t t = 0; t < D; ++t) dst[t] = w00 * v00[t] + w01 * v01[t] + w10 * v10[t] + w11 * v11[t];
          written = true;
        }
      }
      if (!written) std::fill(out, out + D, T(0));
    }
  }
}

// Backward of pixels [p_begin, p_end) and groups [g_begin, g_end): adds the
// input gradient into grad_input (an [N, H, W, C] buffer), writes the offset
// and weight gradients.
template <typename T>
inline __attribute__((always_inline)) void backward_impl(const DcnGeometry& s, const T* dx, const T* dy,
                                                         const T* grad_output, const T* input,
                                                         Sampling<T> sp, const T* zeros, T* scratch,
                                                         T* grad_input, SamplingGrad<T> gp,
                                                         int64_t p_begin, int64_t p_end,
                                                         int64_t g_begin, int64_t g_end) {
  const int64_t D = s.group_channels, K = s.points;
  const T scale = static_cast<T>(s.offset_scale);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const int64_t n = p / s.out_plane(), q = p % s.out_plane();
    const PixelOrigin<T> o = origin<T>(s, q / s.out_w, q % s.out_w, scale);
    const int64_t image = n * s.height * s.width * s.channels;
    const T* in_n = input + image;
    T* gin_n = grad_input + image;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const T* __restrict__ gout = grad_output + p * s.channels + g * D;
      const T* off = sp.offset + p * sp.offset_pixel + g * sp.offset_group;
      const T* msk = sp.mask + p * sp.mask_pixel + g * sp.mask_group;
      T* goff = gp.offset + p * sp.offset_pixel + g * sp.offset_group;
      T* gmsk = gp.mask + p * sp.mask_pixel + g * sp.mask_group;
      for (int64_t k = 0; k < K; ++k) {
        const T x = o.x + (dx[k] + off[2 * k]) * scale;
        const T y = o.y + (dy[k] + off[2 * k + 1]) * scale;
        Corners<T> c;
        if (!locate(s, y, x, g * D, c)) {
          goff[2 * k] = T(0);
          goff[2 * k + 1] = T(0);
          gmsk[k] = T(0);
          continue;
        }
        const T m = msk[k], ly = c.ly, lx = c.lx, hy = 1 - ly, hx = 1 - lx;
        const T w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
        const T mw00 = m * w00, mw01 = m * w01, mw10 = m * w10, mw11 = m * w11;
        const T* __restrict__ v00 = c.i00 >= 0 ? in_n + c.i00 : zeros;
        const T* __restrict__ v01 = c.i01 >= 0 ? in_n + c.i01 : zeros;
        const T* __restrict__ v10 = c.i10 >= 0 ? in_n + c.i10 : zeros;
        const T* __restrict__ v11 = c.i11 >= 0 ? in_n + c.i11 : zeros;
        T* d00 = c.i00 >= 0 ? gin_n + c.i00 : scratch;
        T* d01 = c.i01 >= 0 ? gin_n + c.i01 : scratch;
        T* d10 = c.i10 >= 0 ? gin_n + c.i10 : scratch;
        T* d11 = c.i11 >= 0 ? gin_n + c.i11 : scratch;
        T value = 0, d_y = 0, d_x = 0;
        // Invalid corners' writes all go to the scratch vector (aliasing each
        // other only there, whose contents are never read).
#pragma omp simd reduction(+ : value, d_y, d_x)
        for (int64_t t = 0; t < D; ++t) {
          const T gt = gout[t];
          const T a = v00[t], b = v01[t], cc = v10[t], d = v11[t];
          value += gt * (w00 * a + w01 * b + w10 * cc + w11 * d);
          d_y += gt * (hx * (cc - a) + lx * (d - b));
          d_x += gt * (hy * (b - a) + ly * (d - cc));
          d00[t] += mw00 * gt;
          d01[t] += mw01 * gt;
          d10[t] += mw10 * gt;
          d11[t] += mw11 * gt;
        }
        goff[2 * k] = m * scale * d_x;
        goff[2 * k + 1] = m * scale * d_y;
        gmsk[k] = value;
      }
    }
  }
}

}  // namespace

// The cloned entry points (non-template, so target_clones applies).
#define DETKIT_DCN_ENTRY_POINTS(T)                                                                     \
  DETKIT_DCN_CLONES void dcn_forward_pixels(const DcnGeometry& s, const T* dx, const T* dy,            \
                                            const T* input, Sampling<T> sp, const T* zeros,            \
                                            T* output, int64_t p_begin, int64_t p_end) {               \
    forward_impl<T>(s, dx, dy, input, sp, zeros, output, p_begin, p_end);                              \
  }                                                                                                    \
  DETKIT_DCN_CLONES void dcn_backward_pixels(const DcnGeometry& s, const T* dx, const T* dy,           \
                                             const T* grad_output, const T* input, Sampling<T> sp,     \
                                             const T* zeros, T* scratch, T* grad_input,                \
                                             SamplingGrad<T> gp, int64_t p_begin, int64_t p_end,       \
                                             int64_t g_begin, int64_t g_end) {                         \
    backward_impl<T>(s, dx, dy, grad_output, input, sp, zeros, scratch, grad_input, gp, p_begin,       \
                     p_end, g_begin, g_end);                                                           \
  }

DETKIT_DCN_ENTRY_POINTS(float)
DETKIT_DCN_ENTRY_POINTS(double)

#undef DETKIT_DCN_ENTRY_POINTS

namespace {

enum class Packing { kSeparate, kPacked };

const char* op_name(Packing packing) {
  return packing == Packing::kSeparate ? "dcnv3_core" : "dcnv4_core";
}

// Checks (the Python wrappers check the same with ValueErrors; these guard
// direct torch.ops calls) and the geometry of a call.
DcnGeometry describe(Packing packing, const at::Tensor& input, const at::Tensor& offset,
                     const at::Tensor* mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                     int64_t group_channels, double offset_scale, bool remove_center) {
  const char* name = op_name(packing);
  TORCH_CHECK(input.dim() == 4, name, ": input must be [N, H, W, group*group_channels], got shape ",
              input.sizes());
  TORCH_CHECK(input.is_cpu(), name, " (CPU kernel): input must be a CPU tensor");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, name,
              " (CPU kernel): float32 or float64 only, got ", input.scalar_type());
  auto check_same = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device() == input.device(), name, ": ", what, " is on ", t.device(),
                " but input is on ", input.device());
    TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, ": ", what, " has dtype ",
                t.scalar_type(), " but input has dtype ", input.scalar_type());
    TORCH_CHECK(t.dim() == 4, name, ": ", what, " must be 4-d, got shape ", t.sizes());
  };
  check_same(offset, packing == Packing::kSeparate ? "offset" : "offset_mask");
  if (mask) check_same(*mask, "mask");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              name, ": kernel_size, stride, padding and dilation must have 2 entries");
  DcnGeometry s{};
  s.batch = input.size(0);
  s.height = input.size(1);
  s.width = input.size(2);
  s.channels = input.size(3);
  s.kernel_h = kernel_size[0];
  s.kernel_w = kernel_size[1];
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.group = group;
  s.group_channels = group_channels;
  s.remove_center = remove_center;
  s.offset_scale = offset_scale;
  TORCH_CHECK(s.kernel_h > 0 && s.kernel_w > 0 && s.stride_h > 0 && s.stride_w > 0 && s.dil_h > 0 &&
                  s.dil_w > 0 && s.pad_h >= 0 && s.pad_w >= 0,
              name, ": kernel_size, stride and dilation must be positive, padding non-negative");
  TORCH_CHECK(group > 0 && group_channels > 0, name, ": group and group_channels must be positive");
  TORCH_CHECK(s.channels == group * group_channels, name, ": input has ", s.channels,
              " channels but group * group_channels = ", group * group_channels);
  s.points = s.kernel_h * s.kernel_w - (remove_center ? 1 : 0);
  TORCH_CHECK(s.points > 0, name, ": remove_center leaves no point of a 1x1 kernel");
  const int64_t span_h = s.height + 2 * s.pad_h - (s.dil_h * (s.kernel_h - 1) + 1);
  const int64_t span_w = s.width + 2 * s.pad_w - (s.dil_w * (s.kernel_w - 1) + 1);
  TORCH_CHECK(span_h >= 0 && span_w >= 0, name, ": input of size ", s.height, "x", s.width,
              " is smaller than the dilated kernel with padding");
  s.out_h = span_h / s.stride_h + 1;
  s.out_w = span_w / s.stride_w + 1;
  if (packing == Packing::kSeparate) {
    TORCH_CHECK(offset.sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, group * s.points * 2}),
                name, ": offset must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ",
                group * s.points * 2, "], got ", offset.sizes());
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, group * s.points}), name,
                ": mask must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ", group * s.points,
                "], got ", mask->sizes());
  } else {
    const int64_t packed = (group * s.points * 3 + 7) / 8 * 8;
    TORCH_CHECK(offset.sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, packed}), name,
                ": offset_mask must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ", packed,
                "] (group*K*3 rounded up to a multiple of 8), got ", offset.sizes());
  }
  return s;
}

template <typename T>
Sampling<T> sampling_of(Packing packing, const DcnGeometry& s, const at::Tensor& offset,
                        const at::Tensor& mask) {
  if (packing == Packing::kSeparate) {
    return {offset.data_ptr<T>(), mask.data_ptr<T>(), s.group * s.points * 2, s.points * 2,
            s.group * s.points, s.points};
  }
  const int64_t packed = offset.size(3);
  const T* base = offset.data_ptr<T>();
  return {base, base + 2 * s.points, packed, 3 * s.points, packed, 3 * s.points};
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

at::Tensor dcn_forward(Packing packing, const at::Tensor& input_any, const at::Tensor& offset_any,
                       const at::Tensor* mask_any, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                       int64_t group_channels, double offset_scale, bool remove_center) {
  const DcnGeometry s = describe(packing, input_any, offset_any, mask_any, kernel_size, stride, padding,
                                 dilation, group, group_channels, offset_scale, remove_center);
  const at::Tensor input = input_any.contiguous(), offset = offset_any.contiguous();
  const at::Tensor mask = mask_any ? mask_any->contiguous() : at::Tensor();
  at::Tensor output = at::empty({s.batch, s.out_h, s.out_w, s.channels}, input.options());
  if (s.pixels() == 0 || s.channels == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward_cpu", [&] {
    const PointTable<scalar_t> table = point_table<scalar_t>(s);
    const std::vector<scalar_t> zeros(s.group_channels, scalar_t(0));
    const Sampling<scalar_t> sp = sampling_of<scalar_t>(packing, s, offset, mask);
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    at::parallel_for(0, s.pixels(), pixel_grain(s), [&](int64_t p0, int64_t p1) {
      dcn_forward_pixels(s, table.dx.data(), table.dy.data(), in, sp, zeros.data(), out, p0, p1);
    });
  });
  return output;
}

// Returns grad_input and the gradient of the sampling tensor(s) (grad_offset
// and grad_mask, or grad_offset_mask whose padding stays zero).
std::vector<at::Tensor> dcn_backward(Packing packing, const at::Tensor& grad_output_any,
                                     const at::Tensor& input_any, const at::Tensor& offset_any,
                                     const at::Tensor* mask_any, at::IntArrayRef kernel_size,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                                     double offset_scale, bool remove_center) {
  const DcnGeometry s = describe(packing, input_any, offset_any, mask_any, kernel_size, stride, padding,
                                 dilation, group, group_channels, offset_scale, remove_center);
  const char* name = op_name(packing);
  TORCH_CHECK(grad_output_any.device() == input_any.device() &&
                  grad_output_any.scalar_type() == input_any.scalar_type(),
              name, "_backward: grad_output must have input's device and dtype");
  TORCH_CHECK(grad_output_any.sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, s.channels}), name,
              "_backward: grad_output must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ", s.channels,
              "], got ", grad_output_any.sizes());
  const at::Tensor input = input_any.contiguous(), offset = offset_any.contiguous();
  const at::Tensor mask = mask_any ? mask_any->contiguous() : at::Tensor();
  const at::Tensor grad_output = grad_output_any.contiguous();
  at::Tensor grad_input = at::zeros(input.sizes(), input.options());
  at::Tensor grad_offset = at::zeros(offset.sizes(), offset.options());
  at::Tensor grad_mask = mask.defined() ? at::zeros(mask.sizes(), mask.options()) : at::Tensor();
  auto result = [&]() -> std::vector<at::Tensor> {
    if (packing == Packing::kSeparate) return {grad_input, grad_offset, grad_mask};
    return {grad_input, grad_offset};
  };
  if (s.pixels() == 0 || s.channels == 0) return result();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_backward_cpu", [&] {
    using T = scalar_t;
    const PointTable<T> table = point_table<T>(s);
    const std::vector<T> zeros(s.group_channels, T(0));
    const Sampling<T> sp = sampling_of<T>(packing, s, offset, mask);
    SamplingGrad<T> gp{grad_offset.data_ptr<T>(), nullptr};
    gp.mask = packing == Packing::kSeparate ? grad_mask.data_ptr<T>() : gp.offset + 2 * s.points;
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
          dcn_backward_pixels(s, table.dx.data(), table.dy.data(), gout, in, sp, zeros.data(),
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
          dcn_backward_pixels(s, table.dx.data(), table.dy.data(), gout, in, sp, zeros.data(),
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
  return dcn_forward(Packing::kSeparate, input, offset, &mask, kernel_size, stride, padding, dilation,
                     group, group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_core_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  auto grads = dcn_backward(Packing::kSeparate, grad_output, input, offset, &mask, kernel_size, stride,
                            padding, dilation, group, group_channels, offset_scale, remove_center);
  return {grads[0], grads[1], grads[2]};
}

at::Tensor dcnv4_core_cpu(const at::Tensor& input, const at::Tensor& offset_mask,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                          double offset_scale, bool remove_center) {
  return dcn_forward(Packing::kPacked, input, offset_mask, nullptr, kernel_size, stride, padding, dilation,
                     group, group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor> dcnv4_core_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_mask,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t group, int64_t group_channels, double offset_scale, bool remove_center) {
  auto grads = dcn_backward(Packing::kPacked, grad_output, input, offset_mask, nullptr, kernel_size, stride,
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
