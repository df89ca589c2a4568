// CPU kernels of detkit::deform_roi_pool and its backward.
//
// The feature map is read channels-last ([B, H, W, C]) so every bilinear
// sample is four contiguous channel vectors (see channel_loops.h); the output
// is produced as [K, ph*pw, C] and permuted to [K, C, ph, pw] at the end.
// Forward and the offset/mask gradients split the work over RoIs; the input
// gradient splits it over channel ranges, so no two threads write one element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../roi_checks.h"
#include "channel_loops.h"

namespace detkit {
namespace cpu {
namespace {

void check_same(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "deform_roi_pool: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "deform_roi_pool: ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
}

RoiPoolShape describe(const at::Tensor& input, const at::Tensor& rois,
                      const c10::optional<at::Tensor>& offset,
                      const c10::optional<at::Tensor>& mask, int64_t pooled_h, int64_t pooled_w,
                      double spatial_scale, int64_t sampling_ratio, double gamma) {
  TORCH_CHECK(input.dim() == 4, "deform_roi_pool: input must be [B, C, H, W], got ", input.sizes());
  TORCH_CHECK(input.is_cpu(), "deform_roi_pool (CPU kernel): input must be a CPU tensor");
  TORCH_CHECK(rois.device() == input.device(), "deform_roi_pool: rois is on ", rois.device(),
              " but input is on ", input.device());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "deform_roi_pool: rois must be [K, 5] = (batch_index, x1, y1, x2, y2), got ",
              rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "deform_roi_pool: output_size must be positive");
  const RoiPoolShape s =
      roi_pool_shape(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
  if (offset.has_value()) {
    check_same(*offset, input, "offset");
    TORCH_CHECK(offset->dim() == 4 && offset->size(0) == s.rois && offset->size(1) == 2 &&
                    offset->size(2) == pooled_h && offset->size(3) == pooled_w,
                "deform_roi_pool: offset must be [", s.rois, ", 2, ", pooled_h, ", ", pooled_w,
                "], got ", offset->sizes());
  }
  if (mask.has_value()) {
    check_same(*mask, input, "mask");
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == s.rois && mask->size(1) == 1 &&
                    mask->size(2) == pooled_h && mask->size(3) == pooled_w,
                "deform_roi_pool: mask must be [", s.rois, ", 1, ", pooled_h, ", ", pooled_w,
                "], got ", mask->sizes());
  }
  check_roi_dtype(rois, s.batch, "deform_roi_pool");
  check_roi_values(rois, s.batch, "deform_roi_pool");
  return s;
}

// One RoI in feature-map coordinates (RoIAlign with aligned=True).
template <typename T>
struct RoiBox {
  int64_t batch_index;
  T start_y, start_x, height, width, bin_h, bin_w;
  int64_t grid_h, grid_w;  // samples per bin along y and x
  T count;                 // samples averaged per bin (at least 1)
};

template <typename T>
RoiBox<T> roi_box(const T* roi, const RoiPoolShape& s) {
  RoiBox<T> box;
  box.batch_index = static_cast<int64_t>(roi[0]);
  const T scale = static_cast<T>(s.spatial_scale);
  box.start_x = roi[1] * scale - T(0.5);
  box.start_y = roi[2] * scale - T(0.5);
  box.width = (roi[3] - roi[1]) * scale;
  box.height = (roi[4] - roi[2]) * scale;
  box.bin_h = box.height / static_cast<T>(s.pooled_h);
  box.bin_w = box.width / static_cast<T>(s.pooled_w);
  box.grid_h = adaptive_grid(s.sampling_ratio, box.bin_h);
  box.grid_w = adaptive_grid(s.sampling_ratio, box.bin_w);
  box.count = static_cast<T>(std::max<int64_t>(box.grid_h * box.grid_w, 1));
  return box;
}

// RoIs per parallel task: enough (bins x channels) work to pay for a thread.
inline int64_t roi_grain(const RoiPoolShape& s) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, s.bins() * s.channels));
}

// A RoIAlign bilinear sample in a [H, W] plane: corner pixel indices, the
// fractional position, and whether the value moves with y / x (it does not
// where RoIAlign clamps the position to the border).
template <typename T>
struct AlignSample {
  int64_t i00, i01, i10, i11;
  T ly, lx;
  bool inside, moves_y, moves_x;
};

template <typename T>
inline AlignSample<T> locate(T y, T x, int64_t height, int64_t width) {
  AlignSample<T> a{0, 0, 0, 0, T(0), T(0), false, false, false};
  // Negated so that NaN coordinates count as outside. An empty map (H or W = 0)
  // has no pixel to read: every sample is outside (the corners would be -1).
  if (!(height > 0 && width > 0 && y >= -1 && y <= height && x >= -1 && x <= width)) return a;
  a.inside = true;
  a.moves_y = y > 0;
  a.moves_x = x > 0;
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int64_t y0 = static_cast<int64_t>(y), x0 = static_cast<int64_t>(x), y1, x1;
  if (y0 >= height - 1) {
    y0 = y1 = height - 1;
    y = static_cast<T>(y0);
    a.moves_y = false;
  } else {
    y1 = y0 + 1;
  }
  if (x0 >= width - 1) {
    x0 = x1 = width - 1;
    x = static_cast<T>(x0);
    a.moves_x = false;
  } else {
    x1 = x0 + 1;
  }
  a.i00 = y0 * width + x0;
  a.i01 = y0 * width + x1;
  a.i10 = y1 * width + x0;
  a.i11 = y1 * width + x1;
  a.ly = y - static_cast<T>(y0);
  a.lx = x - static_cast<T>(x0);
  return a;
}

// Calls fn(sample) for every sample of bin (i, j) of `box`, shifted by (shift_y, shift_x).
template <typename T, typename Fn>
inline void for_each_bin_sample(const RoiBox<T>& box, int64_t i, int64_t j, T shift_y, T shift_x,
                                const RoiPoolShape& s, Fn&& fn) {
  const T y_begin = box.start_y + static_cast<T>(i) * box.bin_h + shift_y;
  const T x_begin = box.start_x + static_cast<T>(j) * box.bin_w + shift_x;
  for (int64_t iy = 0; iy < box.grid_h; ++iy) {
    const T y = y_begin + (static_cast<T>(iy) + T(0.5)) * box.bin_h / static_cast<T>(box.grid_h);
    for (int64_t ix = 0; ix < box.grid_w; ++ix) {
      const T x = x_begin + (static_cast<T>(ix) + T(0.5)) * box.bin_w / static_cast<T>(box.grid_w);
      const AlignSample<T> a = locate(y, x, s.height, s.width);
      if (a.inside) fn(a);
    }
  }
}

// The learned shift (in feature pixels) and weight of bin `bin` of RoI k.
template <typename T>
inline void bin_shift(const RoiBox<T>& box, const T* offset, const T* mask, int64_t k, int64_t bin,
                      const RoiPoolShape& s, T& shift_y, T& shift_x, T& m) {
  shift_y = shift_x = 0;
  if (offset) {
    const T gamma = static_cast<T>(s.gamma);
    shift_x = gamma * offset[(2 * k) * s.bins() + bin] * box.width;
    shift_y = gamma * offset[(2 * k + 1) * s.bins() + bin] * box.height;
  }
  m = mask ? mask[k * s.bins() + bin] : T(1);
}

at::Tensor deform_roi_pool_cpu(const at::Tensor& input, const at::Tensor& rois,
                               const c10::optional<at::Tensor>& offset,
                               const c10::optional<at::Tensor>& mask, int64_t pooled_height,
                               int64_t pooled_width, double spatial_scale, int64_t sampling_ratio,
                               double gamma) {
  const RoiPoolShape s = describe(input, rois, offset, mask, pooled_height, pooled_width,
                                  spatial_scale, sampling_ratio, gamma);
  at::Tensor out_t = at::zeros({s.rois, s.bins(), s.channels}, input.options());
  if (s.rois > 0 && s.channels > 0) {
    const at::Tensor in_t = input.permute({0, 2, 3, 1}).contiguous();
    const at::Tensor rois_c = rois.to(input.scalar_type()).contiguous();  // exact indices (checked)
    const at::Tensor offset_c = offset.has_value() ? offset->contiguous() : at::Tensor();
    const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_roi_pool_cpu", [&] {
      const scalar_t* rois_p = rois_c.data_ptr<scalar_t>();
      const scalar_t* offset_p = offset_c.defined() ? offset_c.data_ptr<scalar_t>() : nullptr;
      const scalar_t* mask_p = mask_c.defined() ? mask_c.data_ptr<scalar_t>() : nullptr;
      const scalar_t* in_p = in_t.data_ptr<scalar_t>();
      scalar_t* out_p = out_t.data_ptr<scalar_t>();
      const int64_t C = s.channels, plane = s.height * s.width;
      at::parallel_for(0, s.rois, roi_grain(s), [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const RoiBox<scalar_t> box = roi_box(rois_p + 5 * k, s);
          const scalar_t* image = in_p + box.batch_index * plane * C;
          for (int64_t bin = 0; bin < s.bins(); ++bin) {
            scalar_t shift_y, shift_x, m;
            bin_shift(box, offset_p, mask_p, k, bin, s, shift_y, shift_x, m);
            scalar_t* dst = out_p + (k * s.bins() + bin) * C;
            for_each_bin_sample(box, bin / s.pooled_w, bin % s.pooled_w, shift_y, shift_x, s,
                                [&](const AlignSample<scalar_t>& a) {
              const scalar_t hy = 1 - a.ly, hx = 1 - a.lx;
              gather_bilinear(dst, image + a.i00 * C, image + a.i01 * C, image + a.i10 * C,
                              image + a.i11 * C, C, hy * hx, hy * a.lx, a.ly * hx, a.ly * a.lx,
                              true);
            });
            const scalar_t scale = m / box.count;
            for (int64_t c = 0; c < C; ++c) dst[c] *= scale;
          }
        }
      });
    });
  }
  return out_t.view({s.rois, s.pooled_h, s.pooled_w, s.channels}).permute({0, 3, 1, 2}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_roi_pool_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
    const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& mask,
    int64_t pooled_height, int64_t pooled_width, double spatial_scale, int64_t sampling_ratio,
    double gamma) {
  const RoiPoolShape s = describe(input, rois, offset, mask, pooled_height, pooled_width,
                                  spatial_scale, sampling_ratio, gamma);
  check_same(grad_output, input, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.rois, s.channels, s.pooled_h, s.pooled_w}),
              "deform_roi_pool_backward: grad_output has shape ", grad_output.sizes());
  const auto options = input.options();
  at::Tensor grad_in_t = at::zeros({s.batch, s.height, s.width, s.channels}, options);
  at::Tensor grad_offset = offset.has_value() ? at::zeros(offset->sizes(), options) : at::empty({0}, options);
  at::Tensor grad_mask = mask.has_value() ? at::zeros(mask->sizes(), options) : at::empty({0}, options);
  if (s.rois > 0 && s.channels > 0) {
    const at::Tensor in_t = input.permute({0, 2, 3, 1}).contiguous();
    const at::Tensor grad_t = grad_output.permute({0, 2, 3, 1}).contiguous();  // [K, ph, pw, C]
    const at::Tensor rois_c = rois.to(input.scalar_type()).contiguous();  // exact indices (checked)
    const at::Tensor offset_c = offset.has_value() ? offset->contiguous() : at::Tensor();
    const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_roi_pool_backward_cpu", [&] {
      const scalar_t* rois_p = rois_c.data_ptr<scalar_t>();
      const scalar_t* offset_p = offset_c.defined() ? offset_c.data_ptr<scalar_t>() : nullptr;
      const scalar_t* mask_p = mask_c.defined() ? mask_c.data_ptr<scalar_t>() : nullptr;
      const scalar_t* in_p = in_t.data_ptr<scalar_t>();
      const scalar_t* grad_p = grad_t.data_ptr<scalar_t>();
      scalar_t* grad_in_p = grad_in_t.data_ptr<scalar_t>();
      const int64_t C = s.channels, plane = s.height * s.width;

      // Input gradient: threads own disjoint channel ranges.
      const int64_t channel_grain =
          std::max<int64_t>(16, 32768 / std::max<int64_t>(1, s.rois * s.bins()));
      at::parallel_for(0, C, channel_grain, [&](int64_t c0, int64_t c1) {
        for (int64_t k = 0; k < s.rois; ++k) {
          const RoiBox<scalar_t> box = roi_box(rois_p + 5 * k, s);
          scalar_t* image = grad_in_p + box.batch_index * plane * C + c0;
          for (int64_t bin = 0; bin < s.bins(); ++bin) {
            scalar_t shift_y, shift_x, m;
            bin_shift(box, offset_p, mask_p, k, bin, s, shift_y, shift_x, m);
            const scalar_t scale = m / box.count;
            const scalar_t* g = grad_p + (k * s.bins() + bin) * C + c0;
            for_each_bin_sample(box, bin / s.pooled_w, bin % s.pooled_w, shift_y, shift_x, s,
                                [&](const AlignSample<scalar_t>& a) {
              const scalar_t hy = 1 - a.ly, hx = 1 - a.lx;
              scatter_bilinear(g, image + a.i00 * C, image + a.i01 * C, image + a.i10 * C,
                               image + a.i11 * C, c1 - c0, scale * hy * hx, scale * hy * a.lx,
                               scale * a.ly * hx, scale * a.ly * a.lx);
            });
          }
        }
      });

      // Offset and mask gradients: one RoI per task, reductions over channels.
      if (offset_p == nullptr && mask_p == nullptr) return;
      scalar_t* grad_offset_p = offset_p ? grad_offset.data_ptr<scalar_t>() : nullptr;
      scalar_t* grad_mask_p = mask_p ? grad_mask.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, s.rois, roi_grain(s), [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const RoiBox<scalar_t> box = roi_box(rois_p + 5 * k, s);
          const scalar_t* image = in_p + box.batch_index * plane * C;
          for (int64_t bin = 0; bin < s.bins(); ++bin) {
            scalar_t shift_y, shift_x, m;
            bin_shift(box, offset_p, mask_p, k, bin, s, shift_y, shift_x, m);
            const scalar_t* g = grad_p + (k * s.bins() + bin) * C;
            scalar_t value = 0, d_y = 0, d_x = 0;
            for_each_bin_sample(box, bin / s.pooled_w, bin % s.pooled_w, shift_y, shift_x, s,
                                [&](const AlignSample<scalar_t>& a) {
              scalar_t sums[3] = {0, 0, 0};
              reduce_bilinear_grad(g, image + a.i00 * C, image + a.i01 * C, image + a.i10 * C,
                                   image + a.i11 * C, C, a.ly, a.lx, sums);
              value += sums[0];
              if (a.moves_y) d_y += sums[1];
              if (a.moves_x) d_x += sums[2];
            });
            if (grad_mask_p) grad_mask_p[k * s.bins() + bin] = value / box.count;
            if (grad_offset_p) {
              const scalar_t scale = static_cast<scalar_t>(s.gamma) * m / box.count;
              grad_offset_p[(2 * k) * s.bins() + bin] = scale * box.width * d_x;
              grad_offset_p[(2 * k + 1) * s.bins() + bin] = scale * box.height * d_y;
            }
          }
        }
      });
    });
  }
  return {grad_in_t.permute({0, 3, 1, 2}).contiguous(), grad_offset, grad_mask};
}

}  // namespace
}  // namespace cpu
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, CPU, m) {
  m.impl("deform_roi_pool", &detkit::cpu::deform_roi_pool_cpu);
  m.impl("deform_roi_pool_backward", &detkit::cpu::deform_roi_pool_backward_cpu);
}
