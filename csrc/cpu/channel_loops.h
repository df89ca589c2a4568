// Vectorised inner loops shared by the CPU kernels.
//
// Both CPU kernels store feature maps channels-last, so the four corner pixels
// of one bilinear sample are four contiguous channel vectors. Every inner loop
// below runs over `n` channels of those vectors; the sample's corner pointers
// and weights are computed once per sample by the caller.
//
// Corner naming: v00 = (y0, x0), v01 = (y0, x1), v10 = (y1, x0), v11 = (y1, x1).
#pragma once

#include <cstdint>

namespace detkit {
namespace cpu {

// dst[t] (+)= w00*s00[t] + w01*s01[t] + w10*s10[t] + w11*s11[t], t < n.
void gather_bilinear(float* dst, const float* s00, const float* s01, const float* s10,
                     const float* s11, int64_t n, float w00, float w01, float w10, float w11,
                     bool accumulate);
void gather_bilinear(double* dst, const double* s00, const double* s01, const double* s10,
                     const double* s11, int64_t n, double w00, double w01, double w10,
                     double w11, bool accumulate);

// dXY[t] += wXY * grad[t] for the four corners, t < n. Corners may alias
// (RoIAlign clamps at the border); the updates are applied in order.
void scatter_bilinear(const float* grad, float* d00, float* d01, float* d10, float* d11,
                      int64_t n, float w00, float w01, float w10, float w11);
void scatter_bilinear(const double* grad, double* d00, double* d01, double* d10, double* d11,
                      int64_t n, double w00, double w01, double w10, double w11);

// Sums over t < n of grad[t] times: the sample value, its derivative along y
// and its derivative along x, with fractional position (ly, lx) inside the
// pixel cell (hy = 1 - ly, hx = 1 - lx). Adds them to sums[0..2].
void reduce_bilinear_grad(const float* grad, const float* s00, const float* s01,
                          const float* s10, const float* s11, int64_t n, float ly, float lx,
                          float sums[3]);
void reduce_bilinear_grad(const double* grad, const double* s00, const double* s01,
                          const double* s10, const double* s11, int64_t n, double ly,
                          double lx, double sums[3]);

}  // namespace cpu
}  // namespace detkit
