// Operator schemas of the `detkit` namespace. One place defines what every
// backend (cpu/, cuda/) implements and what the Python fake kernels mirror.
//
// deform_conv2d: semantics and layouts of torchvision.ops.deform_conv2d.
//   input  [B, Cin, H, W]
//   offset [B, 2*G*kh*kw, Ho, Wo]  (dy, dx) per kernel tap k = i*kw + j,
//                                  offset group g at channels 2*(g*kh*kw + k) + {0, 1}
//   weight [Cout, Cin/groups, kh, kw]   (conv groups = Cin / weight.size(1))
//   mask   [B, G*kh*kw, Ho, Wo] or None (None: DCNv1; given: DCNv2)
//   bias   [Cout] or None
//   The backward returns (grad_input, grad_offset, grad_weight, grad_mask,
//   grad_bias); grad_mask / grad_bias are empty tensors when mask / bias is None.
//
// deform_roi_pool: RoIAlign (aligned=True) with per-bin learned shifts.
//   input  [B, C, H, W]; rois [K, 5] = (batch_index, x1, y1, x2, y2) in image pixels
//   offset [K, 2, ph, pw] or None: channel 0 shifts a bin along x by
//          gamma * offset * roi_width, channel 1 along y by gamma * offset * roi_height
//   mask   [K, 1, ph, pw] or None: multiplies each bin's value
//   output [K, C, ph, pw]
//   The backward returns (grad_input, grad_offset, grad_mask), the last two
//   empty when offset / mask is None.
//
// dcnv3_core / dcnv4_core: DCNv3 (InternImage) and DCNv4 (FlashInternImage)
// sampling, channels-last, no weight tensor: for each group g of
// D = group_channels channels, y_g(p0) = sum_k m_gk * x_g(p0 + p_k + dp_gk),
// with the points p_k and offsets in the official (x, y) order and
// offset_scale applied to the dilation grid and the offsets alike.
//   input       [N, H, W, group*group_channels]
//   offset      [N, Ho, Wo, group*K*2]  (x, y) pairs, K = kh*kw (- 1 with remove_center)
//   mask        [N, Ho, Wo, group*K]    used as given (DCNv3 applies softmax before)
//   offset_mask [N, Ho, Wo, P] (DCNv4) per group 2K offsets then K raw weights,
//               P = group*K*3 rounded up to a multiple of 8
//   output      [N, Ho, Wo, group*group_channels]
//   The backwards return (grad_input, grad_offset, grad_mask) and
//   (grad_input, grad_offset_mask).
#include <torch/library.h>

TORCH_LIBRARY(detkit, m) {
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, "
      "Tensor weight, Tensor? mask, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, "
      "int pooled_height, int pooled_width, float spatial_scale, "
      "int sampling_ratio, float gamma) -> Tensor");
  m.def(
      "deform_roi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, "
      "Tensor? offset, Tensor? mask, int pooled_height, int pooled_width, "
      "float spatial_scale, int sampling_ratio, float gamma) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dcnv3_core(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, bool remove_center) -> Tensor");
  m.def(
      "dcnv3_core_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dcnv4_core(Tensor input, Tensor offset_mask, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, bool remove_center) -> Tensor");
  m.def(
      "dcnv4_core_backward(Tensor grad_output, Tensor input, Tensor offset_mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int group, int group_channels, float offset_scale, bool remove_center) -> (Tensor, Tensor)");
}
