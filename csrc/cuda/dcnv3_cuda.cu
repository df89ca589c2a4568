// CUDA kernels of detkit::dcnv3_core, dcnv4_core and their backwards
// (DCNv3 of InternImage, DCNv4 of FlashInternImage; layouts in csrc/schemas.cpp).
//
// Channels-last and direct: no im2col buffer. For output pixel p0 = (ho, wo)
// and group g of D = group_channels channels,
//   y[n, ho, wo, g*D + c] = sum_k m_gk * bilinear(x[n, :, :, g*D + c], h_k, w_k)
// with the points k in the official order (x outer, y inner):
//   for i in [0, kw) (x), for j in [0, kh) (y), skipping (i, j) = (kw/2, kh/2)
//   when remove_center, and
//   w_k = wo*sw - pw + cw + (i*dw - cw + dx_gk) * offset_scale,  cw = dw*(kw-1)/2
//   h_k = ho*sh - ph + ch + (j*dh - ch + dy_gk) * offset_scale,  ch = dh*(kh-1)/2
// (integer division; integer coordinates are pixel centres; a sample is 0
// outside (-1, H) x (-1, W), and corners off the image read as 0: the rule of
// deform_point in common.cuh).
// DCNv3: offset [N, Ho, Wo, G*K*2] holds (dx, dy) pairs at (g*K + k)*2,
//        mask [N, Ho, Wo, G*K] at g*K + k.
// DCNv4: offset_mask [N, Ho, Wo, P] holds, for group g from g*3K, the K
//        (dx, dy) pairs then the K weights; P = G*3K rounded up to a multiple
//        of 8, the tail is padding (its gradient is 0).
// Both ops run the same two kernels, told where the offsets and weights of a
// (pixel, group) are by a DcnLayout (csrc/dcn_shapes.h).
//
// Threads. Forward: one thread per (n, pixel, group, vector of V channels),
// V the widest of 16/8/4/2/1 bytes that divides D and the pointers' alignment,
// the channel vector fastest, so a warp reads contiguous channels of one or a
// few pixels. Backward: a segment of L lanes (L = D/V rounded up to a power of
// two, at most 32; a lane walks every L-th vector when D/V > 32) per (n,
// pixel, group); each lane scatters its channels' input gradient with atomics
// (in float32 for half / bfloat16) and the segment sums the offset and weight
// gradients of each point over its channels with warp shuffles; lane 0 writes
// them. Half and bfloat16 accumulate in float32, float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dcn_shapes.h"
#include "common.cuh"

namespace detkit {
namespace cuda {
namespace {

// The checks (csrc/dcn_shapes.h) are the CPU kernels', but for the device and
// the dtypes.
constexpr DcnBackend kCuda{at::kCUDA, "CUDA", /*reduced_precision=*/true, /*int32_images=*/false};

// ---------------------------------------------------------------- device side

// V elements loaded or stored as one aligned access.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ Vec<scalar_t, V> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, V>*>(p);
}

// The sampling point k of output pixel (ho, wo) for the offsets (dx, dy).
template <typename T>
__device__ __forceinline__ BilinearPoint<T> sample_point(const DcnGeometry& s, int64_t ho,
                                                         int64_t wo, int64_t i, int64_t j, T dx,
                                                         T dy) {
  const int64_t ch = s.dil_h * (s.kernel_h - 1) / 2;
  const int64_t cw = s.dil_w * (s.kernel_w - 1) / 2;
  const T scale = static_cast<T>(s.offset_scale);
  const T h = static_cast<T>(ho * s.stride_h - s.pad_h + ch) +
              (static_cast<T>(j * s.dil_h - ch) + dy) * scale;
  const T w = static_cast<T>(wo * s.stride_w - s.pad_w + cw) +
              (static_cast<T>(i * s.dil_w - cw) + dx) * scale;
  return deform_point(h, w, s.height, s.width);
}

// Offset (elements) of pixel (y, x) in a channels-last image.
__device__ __forceinline__ int64_t corner_index(const DcnGeometry& s, int64_t y, int64_t x) {
  return (y * s.width + x) * s.channels;
}

// output [N, Ho, Wo, C] from input [N, H, W, C] and offsets / weights (DcnLayout).
template <typename scalar_t, int V>
__global__ void dcn_forward_kernel(const scalar_t* __restrict__ input,
                                   const scalar_t* __restrict__ offset,
                                   const scalar_t* __restrict__ mask, DcnGeometry s, DcnLayout lay,
                                   scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t vectors = s.group_channels / V;
  const int64_t Q = s.out_plane();
  const int64_t total = s.batch * Q * s.group * vectors;
  for (int64_t idx = first_item(); idx < total; idx += item_stride()) {
    const int64_t g = idx / vectors % s.group;
    const int64_t c = g * s.group_channels + idx % vectors * V;  // first channel in C
    const int64_t q = idx / (vectors * s.group);  // n*Q + pixel
    const int64_t n = q / Q;
    const int64_t ho = q % Q / s.out_w;
    const int64_t wo = q % s.out_w;
    const scalar_t* off = offset + q * lay.offset_pixel + g * lay.offset_group;
    const scalar_t* msk = mask + q * lay.mask_pixel + g * lay.mask_group;
    const scalar_t* image = input + n * s.height * s.width * s.channels + c;
    acc_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = acc_t(0);
    int64_t k = 0;
    for (int64_t i = 0; i < s.kernel_w; ++i) {
      for (int64_t j = 0; j < s.kernel_h; ++j) {
        if (s.remove_center && i == s.kernel_w / 2 && j == s.kernel_h / 2) continue;
        const BilinearPoint<acc_t> pt =
            sample_point(s, ho, wo, i, j, static_cast<acc_t>(off[2 * k]),
                         static_cast<acc_t>(off[2 * k + 1]));
        const acc_t m = static_cast<acc_t>(msk[k]);
        ++k;
        if (!pt.inside) continue;
        const acc_t w00 = m * pt.hy * pt.hx, w01 = m * pt.hy * pt.lx;
        const acc_t w10 = m * pt.ly * pt.hx, w11 = m * pt.ly * pt.lx;
        if (pt.y0_in && pt.x0_in) {
          const Vec<scalar_t, V> x = load_vec<scalar_t, V>(image + corner_index(s, pt.y0, pt.x0));
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += w00 * static_cast<acc_t>(x.v[v]);
        }
        if (pt.y0_in && pt.x1_in) {
          const Vec<scalar_t, V> x = load_vec<scalar_t, V>(image + corner_index(s, pt.y0, pt.x1));
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += w01 * static_cast<acc_t>(x.v[v]);
        }
        if (pt.y1_in && pt.x0_in) {
          const Vec<scalar_t, V> x = load_vec<scalar_t, V>(image + corner_index(s, pt.y1, pt.x0));
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += w10 * static_cast<acc_t>(x.v[v]);
        }
        if (pt.y1_in && pt.x1_in) {
          const Vec<scalar_t, V> x = load_vec<scalar_t, V>(image + corner_index(s, pt.y1, pt.x1));
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += w11 * static_cast<acc_t>(x.v[v]);
        }
      }
    }
    Vec<scalar_t, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) out.v[v] = static_cast<scalar_t>(acc[v]);
    *reinterpret_cast<Vec<scalar_t, V>*>(output + q * s.channels + c) = out;
  }
}

// Sum over the `lanes` lanes (a power of two dividing 32) of an aligned
// segment of the warp; every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T segment_sum(T value, int lanes) {
  for (int delta = lanes / 2; delta > 0; delta /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, delta);
  }
  return value;
}

// grad_input [N, H, W, C] (accumulation dtype, pre-zeroed) += the bilinear
// scatter of grad_output times the weights; grad_offset / grad_mask (DcnLayout,
// scalar_t) = the offset and weight gradients, every element of the layout
// written. One segment of `lanes` lanes per (n, pixel, group).
template <typename scalar_t, int V>
__global__ void dcn_backward_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input,
                                    const scalar_t* __restrict__ offset,
                                    const scalar_t* __restrict__ mask, DcnGeometry s, DcnLayout lay,
                                    int lanes, at::opmath_type<scalar_t>* __restrict__ grad_input,
                                    scalar_t* __restrict__ grad_offset,
                                    scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = s.out_plane();
  const int64_t total = s.batch * Q * s.group * lanes;
  const acc_t scale = static_cast<acc_t>(s.offset_scale);
  const int warp_lane = threadIdx.x % kWarpSize;
  // The loop runs while the warp's first thread has work, so that whole warps
  // iterate together and every lane reaches the shuffles; segments never
  // straddle warps (lanes divides 32, total is a multiple of lanes).
  for (int64_t idx = first_item(); idx - warp_lane < total; idx += item_stride()) {
    const bool active = idx < total;
    const int64_t lane = idx % lanes;
    const int64_t g = idx / lanes % s.group;
    const int64_t q = active ? idx / (lanes * s.group) : 0;  // n*Q + pixel
    const int64_t n = q / Q;
    const int64_t ho = q % Q / s.out_w;
    const int64_t wo = q % s.out_w;
    const scalar_t* off = offset + q * lay.offset_pixel + g * lay.offset_group;
    const scalar_t* msk = mask + q * lay.mask_pixel + g * lay.mask_group;
    const int64_t image_first = n * s.height * s.width * s.channels + g * s.group_channels;
    const scalar_t* image = input + image_first;
    acc_t* grad_image = grad_input + image_first;
    const scalar_t* grad_out = grad_output + q * s.channels + g * s.group_channels;
    int64_t k = 0;
    for (int64_t i = 0; i < s.kernel_w; ++i) {
      for (int64_t j = 0; j < s.kernel_h; ++j) {
        if (s.remove_center && i == s.kernel_w / 2 && j == s.kernel_h / 2) continue;
        BilinearPoint<acc_t> pt{};
        acc_t m = 0;
        if (active) {
          pt = sample_point(s, ho, wo, i, j, static_cast<acc_t>(off[2 * k]),
                            static_cast<acc_t>(off[2 * k + 1]));
          m = static_cast<acc_t>(msk[k]);
        }
        // This lane's share of sum_c grad_c * (d value_c / dy, d value_c / dx, value_c).
        acc_t sum_dy = 0, sum_dx = 0, sum_val = 0;
        if (pt.inside) {
          const acc_t w00 = pt.hy * pt.hx, w01 = pt.hy * pt.lx;
          const acc_t w10 = pt.ly * pt.hx, w11 = pt.ly * pt.lx;
          const bool in00 = pt.y0_in && pt.x0_in, in01 = pt.y0_in && pt.x1_in;
          const bool in10 = pt.y1_in && pt.x0_in, in11 = pt.y1_in && pt.x1_in;
          const int64_t i00 = corner_index(s, pt.y0, pt.x0), i01 = corner_index(s, pt.y0, pt.x1);
          const int64_t i10 = corner_index(s, pt.y1, pt.x0), i11 = corner_index(s, pt.y1, pt.x1);
          for (int64_t c = lane * V; c < s.group_channels; c += int64_t{lanes} * V) {
            const Vec<scalar_t, V> go = load_vec<scalar_t, V>(grad_out + c);
            Vec<scalar_t, V> v00{}, v01{}, v10{}, v11{};
            if (in00) v00 = load_vec<scalar_t, V>(image + i00 + c);
            if (in01) v01 = load_vec<scalar_t, V>(image + i01 + c);
            if (in10) v10 = load_vec<scalar_t, V>(image + i10 + c);
            if (in11) v11 = load_vec<scalar_t, V>(image + i11 + c);
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const acc_t gc = static_cast<acc_t>(go.v[v]);
              const acc_t a = in00 ? static_cast<acc_t>(v00.v[v]) : acc_t(0);
              const acc_t b = in01 ? static_cast<acc_t>(v01.v[v]) : acc_t(0);
              const acc_t d = in10 ? static_cast<acc_t>(v10.v[v]) : acc_t(0);
              const acc_t e = in11 ? static_cast<acc_t>(v11.v[v]) : acc_t(0);
              sum_dy += gc * (pt.hx * (d - a) + pt.lx * (e - b));
              sum_dx += gc * (pt.hy * (b - a) + pt.ly * (e - d));
              sum_val += gc * (w00 * a + w01 * b + w10 * d + w11 * e);
              const acc_t gm = gc * m;
              if (in00) gpuAtomicAdd(grad_image + i00 + c + v, w00 * gm);
              if (in01) gpuAtomicAdd(grad_image + i01 + c + v, w01 * gm);
              if (in10) gpuAtomicAdd(grad_image + i10 + c + v, w10 * gm);
              if (in11) gpuAtomicAdd(grad_image + i11 + c + v, w11 * gm);
            }
          }
        }
        sum_dy = segment_sum(sum_dy, lanes);
        sum_dx = segment_sum(sum_dx, lanes);
        sum_val = segment_sum(sum_val, lanes);
        if (active && lane == 0) {
          scalar_t* goff = grad_offset + q * lay.offset_pixel + g * lay.offset_group + 2 * k;
          goff[0] = static_cast<scalar_t>(sum_dx * m * scale);
          goff[1] = static_cast<scalar_t>(sum_dy * m * scale);
          grad_mask[q * lay.mask_pixel + g * lay.mask_group + k] = static_cast<scalar_t>(sum_val);
        }
        ++k;
      }
    }
  }
}

// ---------------------------------------------------------------- host side

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Channels per vector access: the widest V (at most 16 bytes) dividing
// group_channels with every pointer aligned to V elements.
int vector_width(const DcnGeometry& s, int64_t element_size,
                 std::initializer_list<const void*> ptrs) {
  for (int v = 8; v > 1; v /= 2) {
    if (v * element_size > 16 || s.group_channels % v != 0) continue;
    bool ok = true;
    for (const void* p : ptrs) ok = ok && aligned_to(p, v * element_size);
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, v>{}) for v in {8, 4, 2, 1}, widths
// above 16 bytes falling back to 1 (vector_width never picks them).
template <typename scalar_t, typename F>
void with_vector_width(int v, F&& f) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(scalar_t));
  switch (v) {
    case 8: f(std::integral_constant<int, kMax >= 8 ? 8 : 1>{}); break;
    case 4: f(std::integral_constant<int, kMax >= 4 ? 4 : 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Lanes per (n, pixel, group) segment of the backward: D/V rounded up to a
// power of two, at most a warp.
int segment_lanes(int64_t vectors) {
  int lanes = 1;
  while (lanes < kWarpSize && lanes < vectors) lanes *= 2;
  return lanes;
}

// output [N, Ho, Wo, C]; `weights` holds the weights from `weights_first` on
// (DCNv4 passes offset_mask as `offset` and as `weights`).
at::Tensor launch_forward(const at::Tensor& input, const at::Tensor& offset,
                          const at::Tensor& weights, int64_t weights_first, const DcnGeometry& s,
                          const DcnLayout& lay) {
  at::Tensor output = at::empty({s.batch, s.out_h, s.out_w, s.channels}, input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dcn_forward_cuda", [&] {
    const scalar_t* off = offset.const_data_ptr<scalar_t>();
    const scalar_t* msk = weights.const_data_ptr<scalar_t>() + weights_first;
    const int v = vector_width(s, sizeof(scalar_t), {input.const_data_ptr(), output.const_data_ptr()});
    with_vector_width<scalar_t>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      launch_grid_stride(dcn_forward_kernel<scalar_t, V>,
                         s.pixels() * s.group * (s.group_channels / V),
                         input.const_data_ptr<scalar_t>(), off, msk, s, lay,
                         output.mutable_data_ptr<scalar_t>());
    });
  });
  return output;
}

// grad_input [N, H, W, C]; fills grad_offset and grad_weights (the layouts of
// offset and weights; DCNv4 passes grad_offset_mask as both).
at::Tensor launch_backward(const at::Tensor& grad_output, const at::Tensor& input,
                           const at::Tensor& offset, const at::Tensor& weights,
                           int64_t weights_first, const DcnGeometry& s, const DcnLayout& lay,
                           at::Tensor& grad_offset, at::Tensor& grad_weights) {
  const auto acc_type = accumulate_type(input.scalar_type());
  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
  if (s.pixels() == 0) return grad_input_acc.to(input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "dcn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* off = offset.const_data_ptr<scalar_t>();
    const scalar_t* msk = weights.const_data_ptr<scalar_t>() + weights_first;
    scalar_t* goff = grad_offset.mutable_data_ptr<scalar_t>();
    scalar_t* gmsk = grad_weights.mutable_data_ptr<scalar_t>() + weights_first;
    const int v = vector_width(s, sizeof(scalar_t),
                               {input.const_data_ptr(), grad_output.const_data_ptr()});
    with_vector_width<scalar_t>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int lanes = segment_lanes(s.group_channels / V);
      launch_grid_stride(dcn_backward_kernel<scalar_t, V>, s.pixels() * s.group * lanes,
                         grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                         off, msk, s, lay, lanes, grad_input_acc.mutable_data_ptr<acc_t>(), goff,
                         gmsk);
    });
  });
  return grad_input_acc.scalar_type() == input.scalar_type()
             ? grad_input_acc
             : grad_input_acc.to(input.scalar_type());
}

// ---------------------------------------------------------------- the ops
//
// One forward and one backward for both ops; `mask_` is nullptr for DCNv4,
// whose `offset_` is then offset_mask.

at::Tensor dcn_forward(DcnPacking packing, const at::Tensor& input_, const at::Tensor& offset_,
                       const at::Tensor* mask_, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t group, int64_t group_channels, double offset_scale,
                       bool remove_center) {
  const DcnGeometry s = describe_dcn(kCuda, packing, input_, offset_, mask_, kernel_size, stride,
                                     padding, dilation, group, group_channels, offset_scale,
                                     remove_center);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor weights = mask_ != nullptr ? mask_->contiguous() : offset;
  return launch_forward(input, offset, weights, dcn_weights_first(packing, s), s,
                        dcn_layout(packing, s));
}

// (grad_input, grad_offset, grad_mask) for DCNv3, (grad_input, grad_offset_mask) for DCNv4.
std::vector<at::Tensor> dcn_backward(DcnPacking packing, const at::Tensor& grad_output_,
                                     const at::Tensor& input_, const at::Tensor& offset_,
                                     const at::Tensor* mask_, at::IntArrayRef kernel_size,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t group,
                                     int64_t group_channels, double offset_scale,
                                     bool remove_center) {
  const DcnGeometry s = describe_dcn(kCuda, packing, input_, offset_, mask_, kernel_size, stride,
                                     padding, dilation, group, group_channels, offset_scale,
                                     remove_center);
  check_dcn_grad_output(packing, grad_output_, input_, s);
  at::globalContext().alertNotDeterministic(std::string("detkit::") + dcn_op_name(packing) +
                                            "_backward (CUDA)");
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor weights = mask_ != nullptr ? mask_->contiguous() : offset;
  // The kernel writes every element of grad_offset and grad_mask but for
  // offset_mask's padding (DCNv4), which stays 0.
  at::Tensor grad_offset =
      packing == DcnPacking::kSeparate ? at::empty_like(offset) : at::zeros_like(offset);
  at::Tensor grad_weights = mask_ != nullptr ? at::empty_like(weights) : grad_offset;
  at::Tensor grad_input =
      launch_backward(grad_output, input, offset, weights, dcn_weights_first(packing, s), s,
                      dcn_layout(packing, s), grad_offset, grad_weights);
  if (packing == DcnPacking::kSeparate) return {grad_input, grad_offset, grad_weights};
  return {grad_input, grad_offset};
}

at::Tensor dcnv3_core_cuda(const at::Tensor& input, const at::Tensor& offset,
                           const at::Tensor& mask, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                           double offset_scale, bool remove_center) {
  return dcn_forward(DcnPacking::kSeparate, input, offset, &mask, kernel_size, stride, padding,
                     dilation, group, group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_core_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group, int64_t group_channels,
    double offset_scale, bool remove_center) {
  auto grads = dcn_backward(DcnPacking::kSeparate, grad_output, input, offset, &mask,
                            kernel_size, stride, padding, dilation, group, group_channels,
                            offset_scale, remove_center);
  return {grads[0], grads[1], grads[2]};
}

at::Tensor dcnv4_core_cuda(const at::Tensor& input, const at::Tensor& offset_mask,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                           int64_t group_channels, double offset_scale, bool remove_center) {
  return dcn_forward(DcnPacking::kPacked, input, offset_mask, nullptr, kernel_size, stride,
                     padding, dilation, group, group_channels, offset_scale, remove_center);
}

std::tuple<at::Tensor, at::Tensor> dcnv4_core_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset_mask,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t group, int64_t group_channels, double offset_scale,
    bool remove_center) {
  auto grads = dcn_backward(DcnPacking::kPacked, grad_output, input, offset_mask, nullptr,
                            kernel_size, stride, padding, dilation, group, group_channels,
                            offset_scale, remove_center);
  return {grads[0], grads[1]};
}

}  // namespace
}  // namespace cuda
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, CUDA, m) {
  m.impl("dcnv3_core", TORCH_FN(detkit::cuda::dcnv3_core_cuda));
  m.impl("dcnv3_core_backward", TORCH_FN(detkit::cuda::dcnv3_core_backward_cuda));
  m.impl("dcnv4_core", TORCH_FN(detkit::cuda::dcnv4_core_cuda));
  m.impl("dcnv4_core_backward", TORCH_FN(detkit::cuda::dcnv4_core_backward_cuda));
}
