// CUDA kernels of detkit::deform_conv2d and detkit::deform_conv2d_backward
// (torchvision.ops.deform_conv2d semantics; layouts in csrc/schemas.cpp).
//
// Deformable im2col + GEMM. A chunk of n images is unrolled into
//   columns [Cin*K, n*Ho*Wo],  row c*K + k (K = kh*kw, k = i*kw + j),
//                              column b*Ho*Wo + p (b: image in the chunk, p = ho*Wo + wo),
// holding mask * bilinear(input[b, c], y, x) at the tap's deformed position.
// The rows of conv group g are contiguous, so viewed as
// [groups, Cin/groups*K, n*Ho*Wo] one batched cuBLAS GEMM with the weight
// [groups, Cout/groups, Cin/groups*K] gives the output of the whole chunk.
// Chunks keep the column buffers under cuda_columns_budget_bytes() (256 MiB;
// csrc/tuning.h). The weight gradient is summed over chunks in float32 (float64
// for double), each chunk's GEMM writing float32 directly for half/bfloat16.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../dcn_shapes.h"
#include "../tuning.h"
#include "common.cuh"

namespace detkit {
namespace cuda {
namespace {

constexpr const char* kOp = "detkit::deform_conv2d (CUDA)";

// Checks the arguments of both ops against each other and derives the sizes.
//   input  [B, Cin, H, W]            offset [B, 2*G*K, Ho, Wo]
//   weight [Cout, Cin/groups, kh, kw] mask  [B, G*K, Ho, Wo] or None
//   bias   [Cout] or None
DeformConvShape check_conv_args(const at::Tensor& input, const at::Tensor& offset,
                                const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor");
  check_like(offset, input, kOp, "offset");
  check_like(weight, input, kOp, "weight");
  TORCH_CHECK(input.dim() == 4, kOp, ": input must be [B, Cin, H, W], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, kOp, ": weight must be [Cout, Cin/groups, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(offset.dim() == 4, kOp, ": offset must be [B, 2*G*kh*kw, Ho, Wo], got ",
              offset.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, kOp, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, kOp, ": dilation must be positive, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, kOp, ": padding must be >= 0, got ", padding);

  DeformConvShape s = deform_conv_sizes(input, weight, stride, padding, dilation);
  TORCH_CHECK(s.kernel_h > 0 && s.kernel_w > 0, kOp, ": empty kernel ", weight.sizes());
  TORCH_CHECK(s.in_channels > 0 && weight.size(1) > 0 && s.in_channels % weight.size(1) == 0,
              kOp, ": input channels ", s.in_channels,
              " must be a positive multiple of weight.size(1) = ", weight.size(1));
  s.groups = s.in_channels / weight.size(1);
  TORCH_CHECK(s.out_channels % s.groups == 0, kOp, ": output channels ", s.out_channels,
              " must be divisible by groups = ", s.groups);
  TORCH_CHECK(s.kernel_fits(), kOp, ": the padded input ", input.sizes(),
              " is smaller than the dilated kernel ", weight.sizes());
  s.set_output_size();

  const int64_t K = s.taps();
  TORCH_CHECK(offset.size(1) > 0 && offset.size(1) % (2 * K) == 0, kOp,
              ": offset.size(1) = ", offset.size(1), " must be a positive multiple of 2*kh*kw = ",
              2 * K);
  s.offset_groups = offset.size(1) / (2 * K);
  TORCH_CHECK(s.in_channels % s.offset_groups == 0, kOp, ": input channels ", s.in_channels,
              " must be divisible by offset groups = ", s.offset_groups);
  check_sizes(offset, {s.batch, 2 * s.offset_groups * K, s.out_h, s.out_w}, kOp, "offset");
  if (mask.has_value()) {
    check_like(*mask, input, kOp, "mask");
    check_sizes(*mask, {s.batch, s.offset_groups * K, s.out_h, s.out_w}, kOp, "mask");
  }
  if (bias.has_value()) {
    check_like(*bias, input, kOp, "bias");
    check_sizes(*bias, {s.out_channels}, kOp, "bias");
  }
  return s;
}

// Images per chunk so that `bytes_per_image` times the chunk stays in budget.
int64_t images_per_chunk(int64_t batch, int64_t bytes_per_image) {
  const int64_t n = cuda_columns_budget_bytes() / std::max<int64_t>(bytes_per_image, 1);
  return std::min(batch, std::max<int64_t>(n, 1));
}

// The deformed sampling position of tap (i, j) at output pixel (ho, wo).
template <typename T>
__device__ __forceinline__ void tap_position(const DeformConvShape& s, int64_t ho, int64_t wo,
                                             int64_t i, int64_t j, T dy, T dx, T& y, T& x) {
  y = static_cast<T>(ho * s.stride_h - s.pad_h + i * s.dil_h) + dy;
  x = static_cast<T>(wo * s.stride_w - s.pad_w + j * s.dil_w) + dx;
}

// columns [Cin*K, n*Ho*Wo] (layout at the top of the file) from
//   input [n, Cin, H, W], offset [n, 2*G*K, Ho, Wo], mask [n, G*K, Ho, Wo] or nullptr.
// One thread per (c, b, p), looping over the K taps.
template <typename scalar_t>
__global__ void deform_im2col_kernel(const scalar_t* __restrict__ input,
                                     const scalar_t* __restrict__ offset,
                                     const scalar_t* __restrict__ mask, DeformConvShape s,
                                     int64_t n,
                                     scalar_t* __restrict__ columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.taps();
  const int64_t P = s.positions();
  const int64_t N = n * P;
  const int64_t G = s.offset_groups;
  const int64_t total = s.in_channels * N;
  for (int64_t idx = first_item(); idx < total; idx += item_stride()) {
    const int64_t col = idx % N;
    const int64_t c = idx / N;
    const int64_t b = col / P;
    const int64_t p = col % P;
    const int64_t ho = p / s.out_w;
    const int64_t wo = p % s.out_w;
    const int64_t g = c / s.offset_group_in();
    const scalar_t* plane = input + (b * s.in_channels + c) * s.height * s.width;
    const scalar_t* off = offset + (b * 2 * G + 2 * g) * K * P + p;
    const scalar_t* msk = mask == nullptr ? nullptr : mask + (b * G + g) * K * P + p;
    scalar_t* out = columns + c * K * N + col;
    for (int64_t i = 0; i < s.kernel_h; ++i) {
      for (int64_t j = 0; j < s.kernel_w; ++j) {
        const int64_t k = i * s.kernel_w + j;
        acc_t y, x;
        tap_position(s, ho, wo, i, j, static_cast<acc_t>(off[2 * k * P]),
                     static_cast<acc_t>(off[(2 * k + 1) * P]), y, x);
        const BilinearPoint<acc_t> pt = deform_point(y, x, s.height, s.width);
        acc_t val = pt.inside ? interpolate(pt, load_corners(plane, s.width, pt)) : acc_t(0);
        if (msk != nullptr) val *= static_cast<acc_t>(msk[k * P]);
        out[k * N] = static_cast<scalar_t>(val);
      }
    }
  }
}

// grad_input [n, Cin, H, W] (accumulation dtype, pre-zeroed) += the bilinear
// scatter of grad_columns [Cin*K, n*Ho*Wo] times the mask.
// One thread per element of grad_columns.
template <typename scalar_t, typename acc_t>
__global__ void deform_col2im_kernel(const scalar_t* __restrict__ grad_columns,
                                     const scalar_t* __restrict__ offset,
                                     const scalar_t* __restrict__ mask, DeformConvShape s,
                                     int64_t n,
                                     acc_t* __restrict__ grad_input) {
  const int64_t K = s.taps();
  const int64_t P = s.positions();
  const int64_t N = n * P;
  const int64_t G = s.offset_groups;
  const int64_t total = s.in_channels * K * N;
  for (int64_t idx = first_item(); idx < total; idx += item_stride()) {
    const int64_t col = idx % N;
    const int64_t row = idx / N;
    const int64_t k = row % K;
    const int64_t c = row / K;
    const int64_t b = col / P;
    const int64_t p = col % P;
    const int64_t g = c / s.offset_group_in();
    const int64_t tap = (b * G + g) * K + k;  // (b, g, k) in mask's channel numbering
    acc_t y, x;
    tap_position(s, p / s.out_w, p % s.out_w, k / s.kernel_w, k % s.kernel_w,
                 static_cast<acc_t>(offset[(2 * tap) * P + p]),
                 static_cast<acc_t>(offset[(2 * tap + 1) * P + p]), y, x);
    const BilinearPoint<acc_t> pt = deform_point(y, x, s.height, s.width);
    if (!pt.inside) continue;
    acc_t grad = static_cast<acc_t>(grad_columns[idx]);
    if (mask != nullptr) grad *= static_cast<acc_t>(mask[tap * P + p]);
    scatter_corners(grad_input + (b * s.in_channels + c) * s.height * s.width, s.width, pt, grad);
  }
}

// grad_offset [n, 2*G*K, Ho, Wo] and grad_mask [n, G*K, Ho, Wo] (nullptr when
// there is no mask) from grad_columns [Cin*K, n*Ho*Wo], input [n, Cin, H, W],
// offset, mask. One thread per (b, g, k, p), summing over the channels of
// offset group g; every element of both outputs is written.
template <typename scalar_t>
__global__ void deform_offset_mask_grad_kernel(const scalar_t* __restrict__ grad_columns,
                                               const scalar_t* __restrict__ input,
                                               const scalar_t* __restrict__ offset,
                                               const scalar_t* __restrict__ mask, DeformConvShape s,
                                               int64_t n, scalar_t* __restrict__ grad_offset,
                                               scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = s.taps();
  const int64_t P = s.positions();
  const int64_t N = n * P;
  const int64_t G = s.offset_groups;
  const int64_t cpg = s.offset_group_in();
  const int64_t total = n * G * K * P;
  for (int64_t idx = first_item(); idx < total; idx += item_stride()) {
    const int64_t p = idx % P;
    const int64_t tap = idx / P;  // (b * G + g) * K + k
    const int64_t k = tap % K;
    const int64_t g = (tap / K) % G;
    const int64_t b = tap / (K * G);
    acc_t y, x;
    tap_position(s, p / s.out_w, p % s.out_w, k / s.kernel_w, k % s.kernel_w,
                 static_cast<acc_t>(offset[(2 * tap) * P + p]),
                 static_cast<acc_t>(offset[(2 * tap + 1) * P + p]), y, x);
    const BilinearPoint<acc_t> pt = deform_point(y, x, s.height, s.width);
    acc_t grad_y = 0, grad_x = 0, grad_m = 0;
    if (pt.inside) {
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const acc_t gc = static_cast<acc_t>(grad_columns[(c * K + k) * N + b * P + p]);
        const scalar_t* plane = input + (b * s.in_channels + c) * s.height * s.width;
        const Corners<acc_t> v = load_corners(plane, s.width, pt);
        grad_y += gc * interpolate_dy(pt, v);
        grad_x += gc * interpolate_dx(pt, v);
        if (grad_mask != nullptr) grad_m += gc * interpolate(pt, v);
      }
    }
    const acc_t m = mask == nullptr ? acc_t(1) : static_cast<acc_t>(mask[idx]);
    grad_offset[(2 * tap) * P + p] = static_cast<scalar_t>(grad_y * m);
    grad_offset[(2 * tap + 1) * P + p] = static_cast<scalar_t>(grad_x * m);
    if (grad_mask != nullptr) grad_mask[idx] = static_cast<scalar_t>(grad_m);
  }
}

// Fills `columns` [Cin*K, n*Ho*Wo] for the n images starting at `first` of
// input [B, Cin, H, W], offset [B, 2*G*K, Ho, Wo], mask [B, G*K, Ho, Wo] (or undefined).
void launch_im2col(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                   const DeformConvShape& s, int64_t first, int64_t n, at::Tensor& columns) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "deform_im2col_cuda", [&] {
    launch_grid_stride(
        deform_im2col_kernel<scalar_t>, s.in_channels * n * s.positions(),
        input.const_data_ptr<scalar_t>() + first * s.input_numel_per_image(),
        offset.const_data_ptr<scalar_t>() + first * s.offset_numel_per_image(),
        mask.defined() ? mask.const_data_ptr<scalar_t>() + first * s.mask_numel_per_image()
                       : nullptr,
        s, n, columns.mutable_data_ptr<scalar_t>());
  });
}

// output [B, Cout, Ho, Wo].
at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input_, const at::Tensor& offset_,
                                      const at::Tensor& weight_,
                                      const std::optional<at::Tensor>& mask_,
                                      const std::optional<at::Tensor>& bias_,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  const DeformConvShape s =
      check_conv_args(input_, offset_, weight_, mask_, bias_, stride, padding, dilation);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();

  const int64_t P = s.positions();
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (output.numel() == 0) return output;

  const int64_t rows = s.in_channels * s.taps();
  const int64_t chunk =
      images_per_chunk(s.batch, (rows + s.out_channels) * P * input.element_size());
  at::Tensor columns_buffer = at::empty({rows * chunk * P}, input.options());
  const at::Tensor weight_g =
      weight.view({s.groups, s.out_channels / s.groups, s.group_rows()});
  for (int64_t first = 0; first < s.batch; first += chunk) {
    const int64_t n = std::min(chunk, s.batch - first);
    at::Tensor columns = columns_buffer.narrow(0, 0, rows * n * P);
    launch_im2col(input, offset, mask, s, first, n, columns);
    // [groups, Cout/groups, n*P] -> [Cout, n, Ho, Wo] -> output[first:first+n].
    const at::Tensor out = at::bmm(weight_g, columns.view({s.groups, s.group_rows(), n * P}));
    output.narrow(0, first, n)
        .copy_(out.view({s.out_channels, n, s.out_h, s.out_w}).transpose(0, 1));
  }
  if (bias_.has_value()) output.add_(bias_->view({1, s.out_channels, 1, 1}));
  return output;
}

// grad_output [B, Cout, Ho, Wo] -> (grad_input [B, Cin, H, W],
// grad_offset [B, 2*G*K, Ho, Wo], grad_weight [Cout, Cin/groups, kh, kw],
// grad_mask [B, G*K, Ho, Wo] or [0], grad_bias [Cout] or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_conv2d_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& input_,
                            const at::Tensor& offset_, const at::Tensor& weight_,
                            const std::optional<at::Tensor>& mask_,
                            const std::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformConvShape s =
      check_conv_args(input_, offset_, weight_, mask_, bias_, stride, padding, dilation);
  check_like(grad_output_, input_, kOp, "grad_output");
  check_sizes(grad_output_, {s.batch, s.out_channels, s.out_h, s.out_w}, kOp, "grad_output");
  at::globalContext().alertNotDeterministic("detkit::deform_conv2d_backward (CUDA)");
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();

  const auto acc_options = input.options().dtype(accumulate_type(input.scalar_type()));
  const int64_t K = s.taps();
  const int64_t P = s.positions();
  const int64_t cout_g = s.out_channels / s.groups;
  at::Tensor grad_input_acc = at::zeros(input.sizes(), acc_options);
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = mask.defined() ? at::empty_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_weight_acc = at::zeros({s.groups, cout_g, s.group_rows()}, acc_options);
  at::Tensor grad_bias = bias_.has_value() ? grad_output.sum({0, 2, 3})
                                           : at::empty({0}, input.options());

  const int64_t rows = s.in_channels * K;
  const int64_t chunk =
      images_per_chunk(s.batch, (rows + s.out_channels) * P * input.element_size());
  at::Tensor columns_buffer = at::empty({rows * chunk * P}, input.options());
  const at::Tensor weight_g = weight.view({s.groups, cout_g, s.group_rows()});
  for (int64_t first = 0; first < s.batch; first += chunk) {
    const int64_t n = std::min(chunk, s.batch - first);
    const int64_t N = n * P;
    // grad_output[first:first+n] as [groups, Cout/groups, n*P].
    const at::Tensor grad_out_g = grad_output.narrow(0, first, n)
                                      .view({n, s.out_channels, P})
                                      .transpose(0, 1)
                                      .contiguous()
                                      .view({s.groups, cout_g, N});
    // The buffer first holds grad_columns = weight^T @ grad_output, consumed
    // by the input / offset / mask gradients, then the recomputed columns.
    at::Tensor columns =
        columns_buffer.narrow(0, 0, rows * N).view({s.groups, s.group_rows(), N});
    at::bmm_out(columns, weight_g.transpose(1, 2), grad_out_g);

    const int64_t input_first = first * s.input_numel_per_image();
    const int64_t offset_first = first * s.offset_numel_per_image();
    const int64_t mask_first = first * s.mask_numel_per_image();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "deform_conv2d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* offset_ptr = offset.const_data_ptr<scalar_t>() + offset_first;
      const scalar_t* mask_ptr =
          mask.defined() ? mask.const_data_ptr<scalar_t>() + mask_first : nullptr;
      launch_grid_stride(deform_col2im_kernel<scalar_t, acc_t>, rows * N,
                         columns.const_data_ptr<scalar_t>(), offset_ptr, mask_ptr, s, n,
                         grad_input_acc.mutable_data_ptr<acc_t>() + input_first);
      launch_grid_stride(
          deform_offset_mask_grad_kernel<scalar_t>, n * s.offset_groups * K * P,
          columns.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>() + input_first,
          offset_ptr, mask_ptr, s, n, grad_offset.mutable_data_ptr<scalar_t>() + offset_first,
          mask.defined() ? grad_mask.mutable_data_ptr<scalar_t>() + mask_first : nullptr);
    });

    launch_im2col(input, offset, mask, s, first, n, columns);
    if (grad_weight_acc.scalar_type() == input.scalar_type()) {
      grad_weight_acc.baddbmm_(grad_out_g, columns.transpose(1, 2));
    } else {
      // half / bfloat16 operands, float32 result: the partial sums are never rounded.
      grad_weight_acc.add_(
          at::bmm(grad_out_g, columns.transpose(1, 2), grad_weight_acc.scalar_type()));
    }
  }
  return {grad_input_acc.to(input.scalar_type()), grad_offset,
          grad_weight_acc.view(weight.sizes()).to(input.scalar_type()), grad_mask, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, CUDA, m) {
  m.impl("deform_conv2d", TORCH_FN(detkit::cuda::deform_conv2d_forward_cuda));
  m.impl("deform_conv2d_backward", TORCH_FN(detkit::cuda::deform_conv2d_backward_cuda));
}
