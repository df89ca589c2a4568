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
}
