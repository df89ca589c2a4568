// Helpers shared by detkit's CUDA kernels: argument checks, kernel launches
// and the two bilinear sampling rules (deformable convolution's and RoIAlign's).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace detkit {
namespace cuda {

// ---------------------------------------------------------------- host side

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

// Blocks for a grid-stride loop over `work_items` threads. Capped so the grid
// stays within limits; the kernels loop over whatever the grid does not cover.
inline int blocks_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<int>(std::min<int64_t>(blocks, int64_t{1} << 20));
}

// Runs `kernel`, whose threads loop grid-stride over `work_items` items (see
// first_item), on the current stream, and checks the launch; launches nothing
// when there is no work.
template <typename... Params, typename... Args>
void launch_grid_stride(void (*kernel)(Params...), int64_t work_items, Args&&... args) {
  if (work_items == 0) return;
  kernel<<<blocks_for(work_items), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// `t` is a CUDA tensor on the same device and of the same dtype as `ref`.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but input is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", ref.scalar_type());
}

// `t` has exactly the sizes `expected`.
inline void check_sizes(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// dtype in which gradients are accumulated (atomics, sums over chunks).
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// -------------------------------------------------------------- device side

// The grid-stride loop of the kernels launch_grid_stride runs:
//   for (int64_t idx = first_item(); idx < total; idx += item_stride())
__device__ __forceinline__ int64_t first_item() {
  return blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
}
__device__ __forceinline__ int64_t item_stride() { return int64_t{gridDim.x} * blockDim.x; }

// A bilinear sampling point in an [H, W] plane: the four corners (y0, x0),
// (y0, x1), (y1, x0), (y1, x1) and their weights hy*hx, hy*lx, ly*hx, ly*lx.
// A corner whose row or column is flagged out of the plane reads as 0.
template <typename T>
struct BilinearPoint {
  bool inside;        // false: the sample and all its gradients are 0
  int64_t y0, y1, x0, x1;
  T ly, lx, hy, hx;
  bool y0_in, y1_in, x0_in, x1_in;
  bool y_moves, x_moves;  // false: the value does not depend on y (x) here
};

// Deformable convolution's rule: zero outside (-1, H) x (-1, W) (written so
// that NaN coordinates land outside), zero-padded corners, no clamping.
template <typename T>
__device__ __forceinline__ BilinearPoint<T> deform_point(T y, T x, int64_t H, int64_t W) {
  BilinearPoint<T> pt{};
  pt.inside = y > T(-1) && y < static_cast<T>(H) && x > T(-1) && x < static_cast<T>(W);
  if (!pt.inside) return pt;
  const T yf = floor(y);
  const T xf = floor(x);
  pt.y0 = static_cast<int64_t>(yf);
  pt.x0 = static_cast<int64_t>(xf);
  pt.y1 = pt.y0 + 1;
  pt.x1 = pt.x0 + 1;
  pt.ly = y - yf;
  pt.lx = x - xf;
  pt.hy = T(1) - pt.ly;
  pt.hx = T(1) - pt.lx;
  pt.y0_in = pt.y0 >= 0;
  pt.y1_in = pt.y1 < H;
  pt.x0_in = pt.x0 >= 0;
  pt.x1_in = pt.x1 < W;
  pt.y_moves = pt.x_moves = true;
  return pt;
}

// RoIAlign's rule: zero outside [-1, H] x [-1, W] (NaN lands outside);
// otherwise coordinates are clamped into the plane, and along a clamped axis
// the value is constant (zero derivative).
template <typename T>
__device__ __forceinline__ BilinearPoint<T> roialign_point(T y, T x, int64_t H, int64_t W) {
  BilinearPoint<T> pt{};
  pt.inside = H > 0 && W > 0 && y >= T(-1) && y <= static_cast<T>(H) && x >= T(-1) &&
              x <= static_cast<T>(W);
  if (!pt.inside) return pt;
  pt.y_moves = y > T(0);
  pt.x_moves = x > T(0);
  if (y <= T(0)) y = T(0);
  if (x <= T(0)) x = T(0);
  pt.y0 = static_cast<int64_t>(y);
  pt.x0 = static_cast<int64_t>(x);
  if (pt.y0 >= H - 1) {
    pt.y0 = pt.y1 = H - 1;
    y = static_cast<T>(pt.y0);
    pt.y_moves = false;
  } else {
    pt.y1 = pt.y0 + 1;
  }
  if (pt.x0 >= W - 1) {
    pt.x0 = pt.x1 = W - 1;
    x = static_cast<T>(pt.x0);
    pt.x_moves = false;
  } else {
    pt.x1 = pt.x0 + 1;
  }
  pt.ly = y - static_cast<T>(pt.y0);
  pt.lx = x - static_cast<T>(pt.x0);
  pt.hy = T(1) - pt.ly;
  pt.hx = T(1) - pt.lx;
  pt.y0_in = pt.y1_in = pt.x0_in = pt.x1_in = true;
  return pt;
}

// The four corner values v(y0,x0), v(y0,x1), v(y1,x0), v(y1,x1) of an inside
// point, read from `plane` [H, W] (row length W), 0 for corners off the plane.
template <typename T>
struct Corners {
  T v00, v01, v10, v11;
};

template <typename scalar_t, typename T>
__device__ __forceinline__ Corners<T> load_corners(const scalar_t* __restrict__ plane, int64_t W,
                                                   const BilinearPoint<T>& pt) {
  Corners<T> v;
  v.v00 = (pt.y0_in && pt.x0_in) ? static_cast<T>(plane[pt.y0 * W + pt.x0]) : T(0);
  v.v01 = (pt.y0_in && pt.x1_in) ? static_cast<T>(plane[pt.y0 * W + pt.x1]) : T(0);
  v.v10 = (pt.y1_in && pt.x0_in) ? static_cast<T>(plane[pt.y1 * W + pt.x0]) : T(0);
  v.v11 = (pt.y1_in && pt.x1_in) ? static_cast<T>(plane[pt.y1 * W + pt.x1]) : T(0);
  return v;
}

template <typename T>
__device__ __forceinline__ T interpolate(const BilinearPoint<T>& pt, const Corners<T>& v) {
  return pt.hy * pt.hx * v.v00 + pt.hy * pt.lx * v.v01 + pt.ly * pt.hx * v.v10 +
         pt.ly * pt.lx * v.v11;
}

// d value / d y of an inside point.
template <typename T>
__device__ __forceinline__ T interpolate_dy(const BilinearPoint<T>& pt, const Corners<T>& v) {
  if (!pt.y_moves) return T(0);
  return pt.hx * (v.v10 - v.v00) + pt.lx * (v.v11 - v.v01);
}

// d value / d x of an inside point.
template <typename T>
__device__ __forceinline__ T interpolate_dx(const BilinearPoint<T>& pt, const Corners<T>& v) {
  if (!pt.x_moves) return T(0);
  return pt.hy * (v.v01 - v.v00) + pt.ly * (v.v11 - v.v10);
}

// Adds grad * (corner weight) to each on-plane corner of an inside point in
// `grad_plane` [H, W] (row length W), atomically.
template <typename T>
__device__ __forceinline__ void scatter_corners(T* __restrict__ grad_plane, int64_t W,
                                                const BilinearPoint<T>& pt, T grad) {
  if (pt.y0_in && pt.x0_in) gpuAtomicAdd(grad_plane + pt.y0 * W + pt.x0, pt.hy * pt.hx * grad);
  if (pt.y0_in && pt.x1_in) gpuAtomicAdd(grad_plane + pt.y0 * W + pt.x1, pt.hy * pt.lx * grad);
  if (pt.y1_in && pt.x0_in) gpuAtomicAdd(grad_plane + pt.y1 * W + pt.x0, pt.ly * pt.hx * grad);
  if (pt.y1_in && pt.x1_in) gpuAtomicAdd(grad_plane + pt.y1 * W + pt.x1, pt.ly * pt.lx * grad);
}

}  // namespace cuda
}  // namespace detkit
