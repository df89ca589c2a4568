// Shared by every backend of detkit::deform_roi_pool: the shape of a call
// (RoiPoolShape), and the RoI checks, so that the CPU and CUDA kernels, eager
// calls, direct torch.ops calls and compiled graphs refuse the same inputs
// with the same message.
//
// rois [K, 5] = (batch_index, x1, y1, x2, y2). Refused: a non-finite value
// (in float16 that includes coordinates above 65504), and a batch index
// outside [0, B). Huge but finite RoIs are allowed; the adaptive sampling grid
// (sampling_ratio = 0) is bounded by adaptive_grid() instead.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace detkit {

// Most bilinear samples per bin side when sampling_ratio = 0 (ceil of the bin
// size otherwise): a bin 1024 feature pixels wide already exceeds any feature
// map a detector uses, and the cap keeps the kernels' loops finite (an
// unbounded ceil of a huge size overflows int64). The float64 reference in
// detkit/ops/reference.py applies the same cap.
constexpr int64_t kMaxAdaptiveGrid = 1024;

// input [B, C, H, W], rois [K, 5], offset [K, 2, ph, pw], mask [K, 1, ph, pw],
// output [K, C, ph, pw].
struct RoiPoolShape {
  int64_t batch, channels, height, width, rois, pooled_h, pooled_w;
  double spatial_scale, gamma;
  int64_t sampling_ratio;

  C10_HOST_DEVICE int64_t bins() const { return pooled_h * pooled_w; }
};

// The shape of a call whose input is 4-d and rois 2-d (checked by the caller).
inline RoiPoolShape roi_pool_shape(const at::Tensor& input, const at::Tensor& rois,
                                   int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                   int64_t sampling_ratio, double gamma) {
  return {input.size(0), input.size(1), input.size(2), input.size(3), rois.size(0),
          pooled_h,      pooled_w,      spatial_scale, gamma,         sampling_ratio};
}

// Samples per bin side: sampling_ratio if > 0, else ceil(bin_size) clamped to
// [0, kMaxAdaptiveGrid] (NaN gives 0). Written for host and device code.
template <typename T>
#ifdef __CUDACC__
__host__ __device__
#endif
inline int64_t adaptive_grid(int64_t sampling_ratio, T bin_size) {
  if (sampling_ratio > 0) return sampling_ratio;
  const T cells = ceil(bin_size);
  if (!(cells > T(0))) return 0;  // negative, zero or NaN
  if (cells >= static_cast<T>(kMaxAdaptiveGrid)) return kMaxAdaptiveGrid;
  return static_cast<int64_t>(cells);
}

// Throws (RuntimeError in Python) naming the first offending RoI unless every
// RoI is finite with a batch index in [0, batch). On CUDA this costs one
// reduction and a one-byte device-to-host copy; the CUDA backend skips it
// while a CUDA graph is being captured (no copy is allowed there), and its
// kernels then treat such RoIs as empty (output 0, no gradient).
inline void check_roi_values(const at::Tensor& rois, int64_t batch, const char* op) {
  if (rois.size(0) == 0) return;
  const at::Tensor index = rois.select(1, 0);
  const at::Tensor ok = at::isfinite(rois).all().logical_and_(index.ge(0).all())
                            .logical_and_(index.lt(static_cast<double>(batch)).all());
  if (ok.item<bool>()) return;
  const at::Tensor host = rois.to(at::kCPU, at::kDouble).contiguous();
  const double* r = host.const_data_ptr<double>();
  for (int64_t k = 0; k < host.size(0); ++k) {
    for (int i = 0; i < 5; ++i) {
      TORCH_CHECK(std::isfinite(r[5 * k + i]), op, ": rois[", k, ", ", i, "] is not finite (",
                  r[5 * k + i], "); RoI coordinates must be finite (float16 holds at most 65504)");
    }
    TORCH_CHECK(r[5 * k] >= 0 && r[5 * k] < static_cast<double>(batch), op, ": rois[", k,
                ", 0] (batch index) is ", r[5 * k], " but the input holds ", batch,
                " images: it must lie in [0, ", batch, ")");
  }
}

// rois may have their own floating dtype (the kernels read them in the input's
// accumulation type: float32 for float16 / bfloat16 inputs), so that batch
// indices stay exact whatever the input dtype. rois stored in float16 /
// bfloat16 hold integers exactly only up to 2048 / 256: an index above that
// was already rounded to another image's, so such rois are refused once the
// batch has more images than the dtype can tell apart.
inline void check_roi_dtype(const at::Tensor& rois, int64_t batch, const char* op) {
  const at::ScalarType dtype = rois.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": rois must be a floating-point tensor, got ", dtype);
  const int64_t exact = dtype == at::kHalf ? 2048 : dtype == at::kBFloat16 ? 256 : -1;
  TORCH_CHECK(exact < 0 || batch - 1 <= exact, op, ": rois of dtype ", dtype,
              " hold batch indices exactly only up to ", exact, ", but the input has ", batch,
              " images: pass rois as float32 (a larger index rounds to another image's)");
}

}  // namespace detkit
