// CUDA kernels of detkit::deform_roi_pool and detkit::deform_roi_pool_backward:
// RoIAlign (aligned=True) whose bins are shifted by learned offsets and
// scaled by an optional mask (layouts in csrc/schemas.cpp).
//
// Roi k = (batch_index, x1, y1, x2, y2) covers, in feature-map pixels,
//   start = (x1, y1) * spatial_scale - 0.5, size = (x2 - x1, y2 - y1) * spatial_scale,
// split into ph x pw bins. Bin (i, j) is moved by
//   (gamma * offset[k, 0, i, j] * roi_w, gamma * offset[k, 1, i, j] * roi_h)
// and averages grid_h x grid_w bilinear samples (RoIAlign's clamping rule);
// grid = sampling_ratio if > 0, else ceil(bin size) capped at
// kMaxAdaptiveGrid (csrc/roi_checks.h). The average is then multiplied by
// mask[k, 0, i, j]. RoIs that are not finite or whose batch index is not in
// [0, B) are refused on the host (check_roi_values, as on the CPU); while a
// CUDA graph is captured that check cannot run, and the kernels then give
// such RoIs output 0 and no gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../roi_checks.h"
#include "common.cuh"

namespace detkit {
namespace cuda {
namespace {

constexpr const char* kOp = "detkit::deform_roi_pool (CUDA)";

// Checks the arguments of both ops and derives the sizes.
//   input [B, C, H, W], rois [K, 5], offset [K, 2, ph, pw] or None, mask [K, 1, ph, pw] or None
RoiPoolShape check_pool_args(const at::Tensor& input, const at::Tensor& rois,
                             const std::optional<at::Tensor>& offset,
                             const std::optional<at::Tensor>& mask, int64_t pooled_h,
                             int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                             double gamma) {
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor");
  TORCH_CHECK(rois.is_cuda() && rois.device() == input.device(), kOp, ": rois is on ",
              rois.device(), " but input is on ", input.device());
  check_roi_dtype(rois, input.size(0), kOp);  // any floating dtype: read as the accumulation type
  TORCH_CHECK(input.dim() == 4, kOp, ": input must be [B, C, H, W], got ", input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, kOp,
              ": rois must be [K, 5] = (batch_index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, kOp, ": pooled size must be positive, got ",
              pooled_h, "x", pooled_w);
  const RoiPoolShape s =
      roi_pool_shape(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma);
  if (offset.has_value()) {
    check_like(*offset, input, kOp, "offset");
    check_sizes(*offset, {s.rois, 2, pooled_h, pooled_w}, kOp, "offset");
  }
  if (mask.has_value()) {
    check_like(*mask, input, kOp, "mask");
    check_sizes(*mask, {s.rois, 1, pooled_h, pooled_w}, kOp, "mask");
  }
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    c10::cuda::CUDAGuard guard(input.device());
    check_roi_values(rois, s.batch, kOp);
  }
  return s;
}

// Where one roi's bins and samples lie in its image's feature map.
template <typename T>
struct RoiBins {
  bool valid;            // finite, batch index in [0, B)
  int64_t batch_index;
  T start_h, start_w;    // top-left corner
  T roi_h, roi_w;        // size
  T bin_h, bin_w;
  int64_t grid_h, grid_w;  // samples per bin along y and x
  T count;               // max(grid_h * grid_w, 1)

  // Sample (iy, ix) of bin (i, j) moved by (shift_y, shift_x).
  __device__ T sample_y(int64_t i, int64_t iy, T shift_y) const {
    return start_h + i * bin_h + shift_y + (iy + T(0.5)) * bin_h / static_cast<T>(grid_h);
  }
  __device__ T sample_x(int64_t j, int64_t ix, T shift_x) const {
    return start_w + j * bin_w + shift_x + (ix + T(0.5)) * bin_w / static_cast<T>(grid_w);
  }
};

// Geometry of roi `roi` [5]. Validity is tested again here (the host check is
// skipped during CUDA graph capture), comparing floats so that NaN or huge
// values never become an index or a loop bound.
template <typename T, typename scalar_t>
__device__ __forceinline__ RoiBins<T> roi_bins(const scalar_t* __restrict__ roi,
                                               const RoiPoolShape& s) {
  RoiBins<T> r{};
  const T index = static_cast<T>(roi[0]);
  const T x1 = static_cast<T>(roi[1]);
  const T y1 = static_cast<T>(roi[2]);
  const T x2 = static_cast<T>(roi[3]);
  const T y2 = static_cast<T>(roi[4]);
  r.valid = index >= T(0) && index < static_cast<T>(s.batch) && isfinite(x1) && isfinite(y1) &&
            isfinite(x2) && isfinite(y2);
  if (!r.valid) return r;
  r.batch_index = static_cast<int64_t>(index);  // truncation, like (int)
  const T scale = static_cast<T>(s.spatial_scale);
  r.start_w = x1 * scale - T(0.5);
  r.start_h = y1 * scale - T(0.5);
  r.roi_w = (x2 - x1) * scale;
  r.roi_h = (y2 - y1) * scale;
  r.bin_h = r.roi_h / static_cast<T>(s.pooled_h);
  r.bin_w = r.roi_w / static_cast<T>(s.pooled_w);
  r.grid_h = adaptive_grid(s.sampling_ratio, r.bin_h);
  r.grid_w = adaptive_grid(s.sampling_ratio, r.bin_w);
  r.count = static_cast<T>(r.grid_h * r.grid_w > 1 ? r.grid_h * r.grid_w : 1);
  return r;
}

// The bin shift (shift_y, shift_x) of bin `bin` = i*pw + j of roi k, from
// offset [K, 2, ph, pw] (nullptr: no shift).
template <typename T, typename scalar_t>
__device__ __forceinline__ void bin_shift(const scalar_t* __restrict__ offset,
                                          const RoiPoolShape& s, const RoiBins<T>& r, int64_t k,
                                          int64_t bin, T& shift_y, T& shift_x) {
  if (offset == nullptr) {
    shift_y = shift_x = T(0);
    return;
  }
  const T gamma = static_cast<T>(s.gamma);
  shift_x = gamma * static_cast<T>(offset[(2 * k) * s.bins() + bin]) * r.roi_w;
  shift_y = gamma * static_cast<T>(offset[(2 * k + 1) * s.bins() + bin]) * r.roi_h;
}

// output [K, C, ph, pw] from input [B, C, H, W], rois [K, 5], offset, mask
// (nullptr when absent). One thread per output element.
template <typename scalar_t>
__global__ void deform_roi_pool_forward_kernel(const scalar_t* __restrict__ input,
                                               const at::opmath_type<scalar_t>* __restrict__ rois,
                                               const scalar_t* __restrict__ offset,
                                               const scalar_t* __restrict__ mask, RoiPoolShape s,
                                               scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = s.rois * s.channels * s.bins();
  for (int64_t idx = first_item(); idx < total; idx += item_stride()) {
    const int64_t bin = idx % s.bins();
    const int64_t c = (idx / s.bins()) % s.channels;
    const int64_t k = idx / (s.bins() * s.channels);
    const RoiBins<acc_t> r = roi_bins<acc_t>(rois + 5 * k, s);
    if (!r.valid) {
      output[idx] = static_cast<scalar_t>(0);
      continue;
    }
    acc_t shift_y, shift_x;
    bin_shift(offset, s, r, k, bin, shift_y, shift_x);
    const int64_t i = bin / s.pooled_w;
    const int64_t j = bin % s.pooled_w;
    const scalar_t* plane = input + (r.batch_index * s.channels + c) * s.height * s.width;
    acc_t sum = 0;
    for (int64_t iy = 0; iy < r.grid_h; ++iy) {
      const acc_t y = r.sample_y(i, iy, shift_y);
      for (int64_t ix = 0; ix < r.grid_w; ++ix) {
        const BilinearPoint<acc_t> pt =
            roialign_point(y, r.sample_x(j, ix, shift_x), s.height, s.width);
        if (pt.inside) sum += interpolate(pt, load_corners(plane, s.width, pt));
      }
    }
    acc_t value = sum / r.count;
    if (mask != nullptr) value *= static_cast<acc_t>(mask[k * s.bins() + bin]);
    output[idx] = static_cast<scalar_t>(value);
  }
}

// grad_input [B, C, H, W] (accumulation dtype, pre-zeroed) += the scatter of
// grad_output [K, C, ph, pw] * mask / count over each bin's samples.
// One thread per element of grad_output.
template <typename scalar_t, typename acc_t>
__global__ void deform_roi_pool_input_grad_kernel(const scalar_t* __restrict__ grad_output,
                                                  const acc_t* __restrict__ rois,
                                                  const scalar_t* __restrict__ offset,
                                                  const scalar_t* __restrict__ mask, RoiPoolShape s,
                                                  acc_t* __restrict__ grad_input) {
  const int64_t total = s.rois * s.channels * s.bins();
  for (int64_t idx = first_item(); idx < total; idx += item_stride()) {
    const int64_t bin = idx % s.bins();
    const int64_t c = (idx / s.bins()) % s.channels;
    const int64_t k = idx / (s.bins() * s.channels);
    const RoiBins<acc_t> r = roi_bins<acc_t>(rois + 5 * k, s);
    if (!r.valid) continue;
    acc_t shift_y, shift_x;
    bin_shift(offset, s, r, k, bin, shift_y, shift_x);
    acc_t grad = static_cast<acc_t>(grad_output[idx]) / r.count;
    if (mask != nullptr) grad *= static_cast<acc_t>(mask[k * s.bins() + bin]);
    const int64_t i = bin / s.pooled_w;
    const int64_t j = bin % s.pooled_w;
    acc_t* grad_plane = grad_input + (r.batch_index * s.channels + c) * s.height * s.width;
    for (int64_t iy = 0; iy < r.grid_h; ++iy) {
      const acc_t y = r.sample_y(i, iy, shift_y);
      for (int64_t ix = 0; ix < r.grid_w; ++ix) {
        const BilinearPoint<acc_t> pt =
            roialign_point(y, r.sample_x(j, ix, shift_x), s.height, s.width);
        if (pt.inside) scatter_corners(grad_plane, s.width, pt, grad);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, delta);
  }
  return v;
}

// grad_offset [K, 2, ph, pw] and grad_mask [K, 1, ph, pw] (either nullptr when
// not wanted) from grad_output [K, C, ph, pw], input, rois, offset, mask.
// One warp per (k, bin): the lanes split the channels, then a shuffle sums
// them. Every element of the wanted outputs is written.
template <typename scalar_t>
__global__ void deform_roi_pool_offset_mask_grad_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
    const at::opmath_type<scalar_t>* __restrict__ rois, const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask, RoiPoolShape s, scalar_t* __restrict__ grad_offset,
    scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = s.rois * s.bins();
  const int lane = threadIdx.x % kWarpSize;
  // All lanes of a warp share `item`, so the loops below are warp-uniform.
  for (int64_t item = first_item() / kWarpSize; item < total; item += item_stride() / kWarpSize) {
    const int64_t bin = item % s.bins();
    const int64_t k = item / s.bins();
    const RoiBins<acc_t> r = roi_bins<acc_t>(rois + 5 * k, s);
    acc_t sum_dy = 0, sum_dx = 0, sum_value = 0;  // weighted by grad_output, over c and samples
    if (r.valid) {
      acc_t shift_y, shift_x;
      bin_shift(offset, s, r, k, bin, shift_y, shift_x);
      const int64_t i = bin / s.pooled_w;
      const int64_t j = bin % s.pooled_w;
      for (int64_t iy = 0; iy < r.grid_h; ++iy) {
        const acc_t y = r.sample_y(i, iy, shift_y);
        for (int64_t ix = 0; ix < r.grid_w; ++ix) {
          const BilinearPoint<acc_t> pt =
            roialign_point(y, r.sample_x(j, ix, shift_x), s.height, s.width);
          if (!pt.inside) continue;
          for (int64_t c = lane; c < s.channels; c += kWarpSize) {
            const acc_t go = static_cast<acc_t>(grad_output[(k * s.channels + c) * s.bins() + bin]);
            const scalar_t* plane = input + (r.batch_index * s.channels + c) * s.height * s.width;
            const Corners<acc_t> v = load_corners(plane, s.width, pt);
            if (grad_offset != nullptr) {
              sum_dy += go * interpolate_dy(pt, v);
              sum_dx += go * interpolate_dx(pt, v);
            }
            if (grad_mask != nullptr) sum_value += go * interpolate(pt, v);
          }
        }
      }
    }
    sum_dy = warp_sum(sum_dy);
    sum_dx = warp_sum(sum_dx);
    sum_value = warp_sum(sum_value);
    if (lane != 0) continue;
    if (grad_offset != nullptr) {
      acc_t gx = 0, gy = 0;
      if (r.valid) {
        const acc_t m = mask == nullptr ? acc_t(1) : static_cast<acc_t>(mask[item]);
        const acc_t scale = static_cast<acc_t>(s.gamma) * m / r.count;
        gx = scale * r.roi_w * sum_dx;
        gy = scale * r.roi_h * sum_dy;
      }
      grad_offset[(2 * k) * s.bins() + bin] = static_cast<scalar_t>(gx);
      grad_offset[(2 * k + 1) * s.bins() + bin] = static_cast<scalar_t>(gy);
    }
    if (grad_mask != nullptr) {
      grad_mask[item] = static_cast<scalar_t>(r.valid ? sum_value / r.count : acc_t(0));
    }
  }
}

// output [K, C, ph, pw].
at::Tensor deform_roi_pool_forward_cuda(const at::Tensor& input_, const at::Tensor& rois_,
                                        const std::optional<at::Tensor>& offset_,
                                        const std::optional<at::Tensor>& mask_,
                                        int64_t pooled_height, int64_t pooled_width,
                                        double spatial_scale, int64_t sampling_ratio,
                                        double gamma) {
  const RoiPoolShape s = check_pool_args(input_, rois_, offset_, mask_, pooled_height,
                                         pooled_width, spatial_scale, sampling_ratio, gamma);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  // In the accumulation type (float32 for float16 / bfloat16 inputs): batch indices stay exact.
  const at::Tensor rois = rois_.to(at::toOpMathType(input.scalar_type())).contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();

  at::Tensor output = at::empty({s.rois, s.channels, s.pooled_h, s.pooled_w}, input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_roi_pool_forward_cuda", [&] {
    launch_grid_stride(deform_roi_pool_forward_kernel<scalar_t>, output.numel(),
                       input.const_data_ptr<scalar_t>(),
                       rois.const_data_ptr<at::opmath_type<scalar_t>>(),
                       offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr,
                       mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, s,
                       output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

// grad_output [K, C, ph, pw] -> (grad_input [B, C, H, W],
// grad_offset [K, 2, ph, pw] or [0], grad_mask [K, 1, ph, pw] or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_roi_pool_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& rois_,
    const std::optional<at::Tensor>& offset_, const std::optional<at::Tensor>& mask_,
    int64_t pooled_height, int64_t pooled_width, double spatial_scale, int64_t sampling_ratio,
    double gamma) {
  const RoiPoolShape s = check_pool_args(input_, rois_, offset_, mask_, pooled_height,
                                         pooled_width, spatial_scale, sampling_ratio, gamma);
  check_like(grad_output_, input_, kOp, "grad_output");
  check_sizes(grad_output_, {s.rois, s.channels, s.pooled_h, s.pooled_w}, kOp, "grad_output");
  at::globalContext().alertNotDeterministic("detkit::deform_roi_pool_backward (CUDA)");
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  // In the accumulation type (float32 for float16 / bfloat16 inputs): batch indices stay exact.
  const at::Tensor rois = rois_.to(at::toOpMathType(input.scalar_type())).contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();

  at::Tensor grad_input_acc =
      at::zeros(input.sizes(), input.options().dtype(accumulate_type(input.scalar_type())));
  at::Tensor grad_offset =
      offset.defined() ? at::empty_like(offset) : at::empty({0}, input.options());
  at::Tensor grad_mask = mask.defined() ? at::empty_like(mask) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_roi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* offset_ptr = offset.defined() ? offset.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask_ptr = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
    launch_grid_stride(deform_roi_pool_input_grad_kernel<scalar_t, acc_t>, grad_output.numel(),
                       grad_output.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(),
                       offset_ptr, mask_ptr, s, grad_input_acc.mutable_data_ptr<acc_t>());
    if (offset.defined() || mask.defined()) {
      // One warp per (k, bin).
      launch_grid_stride(deform_roi_pool_offset_mask_grad_kernel<scalar_t>,
                         s.rois * s.bins() * kWarpSize, grad_output.const_data_ptr<scalar_t>(),
                         input.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(),
                         offset_ptr, mask_ptr, s,
                         offset.defined() ? grad_offset.mutable_data_ptr<scalar_t>() : nullptr,
                         mask.defined() ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr);
    }
  });
  return {grad_input_acc.to(input.scalar_type()), grad_offset, grad_mask};
}

}  // namespace
}  // namespace cuda
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, CUDA, m) {
  m.impl("deform_roi_pool", TORCH_FN(detkit::cuda::deform_roi_pool_forward_cuda));
  m.impl("deform_roi_pool_backward", TORCH_FN(detkit::cuda::deform_roi_pool_backward_cuda));
}
