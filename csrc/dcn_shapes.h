// Shapes of detkit's deformable convolutions, one definition for the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda):
//  * ConvWindow: kernel, stride, padding, dilation and the output size they
//    give;
//  * DeformConvShape: the sizes of a deform_conv2d call, filled by
//    deform_conv_sizes(); each backend checks the arguments with its own
//    messages (the CPU's and the CUDA's texts differ).
// Compiled by g++ and nvcc: host code, but for the C10_HOST_DEVICE accessors
// that the CUDA kernels call on the structs they receive by value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace detkit {

// ------------------------------------------------------------ the window

// A 2-d convolution window over an input plane of height x width.
struct ConvWindow {
  int64_t height, width;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;  // set by set_output_size()

  // How far the dilated kernel slides over the padded input; negative when it
  // does not fit.
  C10_HOST_DEVICE int64_t span_h() const {
    return height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1);
  }
  C10_HOST_DEVICE int64_t span_w() const {
    return width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1);
  }
  C10_HOST_DEVICE bool kernel_fits() const { return span_h() >= 0 && span_w() >= 0; }

  // Call once kernel_fits() is checked: C++ division truncates toward zero,
  // so a negative span would give one output row.
  void set_output_size() {
    out_h = span_h() / stride_h + 1;
    out_w = span_w() / stride_w + 1;
  }

  // Input plane, kernel size and the 2-entry stride, padding and dilation
  // (lengths checked by the caller); out_h and out_w are left alone.
  void set_window(int64_t plane_h, int64_t plane_w, int64_t kh, int64_t kw, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
    height = plane_h;
    width = plane_w;
    kernel_h = kh;
    kernel_w = kw;
    stride_h = stride[0];
    stride_w = stride[1];
    pad_h = padding[0];
    pad_w = padding[1];
    dil_h = dilation[0];
    dil_w = dilation[1];
  }
};

// ------------------------------------------------------------ deform_conv2d

// input [B, Cin, H, W], weight [Cout, Cin/groups, kh, kw],
// offset [B, 2*G*kh*kw, Ho, Wo], mask [B, G*kh*kw, Ho, Wo] (G offset groups).
struct DeformConvShape : ConvWindow {
  int64_t batch, in_channels, out_channels;
  int64_t groups, offset_groups;

  C10_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  C10_HOST_DEVICE int64_t positions() const { return out_h * out_w; }
  C10_HOST_DEVICE int64_t group_in() const { return in_channels / groups; }
  C10_HOST_DEVICE int64_t group_out() const { return out_channels / groups; }
  C10_HOST_DEVICE int64_t offset_group_in() const { return in_channels / offset_groups; }
  // Rows of one conv group's im2col matrix: Cin/groups * K (CUDA kernel).
  C10_HOST_DEVICE int64_t group_rows() const { return group_in() * taps(); }
  // Elements per image of input, offset and mask.
  C10_HOST_DEVICE int64_t input_numel_per_image() const { return in_channels * height * width; }
  C10_HOST_DEVICE int64_t mask_numel_per_image() const {
    return offset_groups * taps() * positions();
  }
  C10_HOST_DEVICE int64_t offset_numel_per_image() const { return 2 * mask_numel_per_image(); }
  // The input with a one-pixel zero border, [H+2, W+2] (CPU kernel).
  C10_HOST_DEVICE int64_t padded_width() const { return width + 2; }
  C10_HOST_DEVICE int64_t padded_plane() const { return (height + 2) * (width + 2); }
};

// The sizes read from input and weight (both 4-d) and the 2-entry conv
// arguments. groups, offset_groups, out_h and out_w are 0: the backend derives
// them as it checks the arguments (set_output_size once kernel_fits()).
inline DeformConvShape deform_conv_sizes(const at::Tensor& input, const at::Tensor& weight,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation) {
  DeformConvShape s{};
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.out_channels = weight.size(0);
  s.set_window(input.size(2), input.size(3), weight.size(2), weight.size(3), stride, padding,
               dilation);
  return s;
}

}  // namespace detkit
