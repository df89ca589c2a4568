// Shapes of detkit's deformable convolutions, one definition for the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda):
//  * ConvWindow: kernel, stride, padding, dilation and the output size they
//    give, common to deform_conv2d and DCNv3 / DCNv4;
//  * DeformConvShape: the sizes of a deform_conv2d call, filled by
//    deform_conv_sizes(); each backend checks the arguments with its own
//    messages (the CPU's and the CUDA's texts differ);
//  * DcnGeometry: the sizes of a dcnv3_core / dcnv4_core call, with the
//    argument checks (describe_dcn, check_dcn_grad_output) that both backends
//    run, so that they refuse the same inputs with the same messages, and the
//    layout of the offsets and weights (dcn_layout).
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

// ------------------------------------------------------------ DCNv3 / DCNv4

// input [N, H, W, group*group_channels], output [N, Ho, Wo, group*group_channels].
struct DcnGeometry : ConvWindow {
  int64_t batch, channels;
  int64_t group, group_channels, points;  // points K = kh*kw, minus 1 with remove_center
  bool remove_center;
  double offset_scale;

  C10_HOST_DEVICE int64_t out_plane() const { return out_h * out_w; }
  C10_HOST_DEVICE int64_t pixels() const { return batch * out_h * out_w; }
};

// DCNv3 takes offset [N, Ho, Wo, G*K*2] and mask [N, Ho, Wo, G*K]; DCNv4 one
// offset_mask [N, Ho, Wo, P] holding per group g, from g*3K, the K (dx, dy)
// pairs then the K weights, P = G*3K rounded up to a multiple of 8.
enum class DcnPacking { kSeparate, kPacked };

inline const char* dcn_op_name(DcnPacking packing) {
  return packing == DcnPacking::kSeparate ? "dcnv3_core" : "dcnv4_core";
}

// Width P of DCNv4's offset_mask.
inline int64_t dcn_packed_width(int64_t group, int64_t points) {
  return (group * points * 3 + 7) / 8 * 8;
}

// Where the offsets and weights of (pixel q, group g) are, in elements, with
// q = n*Ho*Wo + ho*Wo + wo: point k's (dx, dy) at
// offset[q*offset_pixel + g*offset_group + 2k + {0, 1}], its weight at
// weights[q*mask_pixel + g*mask_group + k], where `weights` is the mask
// (DCNv3) or offset_mask advanced by dcn_weights_first (DCNv4). The
// gradients have the same layout.
struct DcnLayout {
  int64_t offset_pixel, offset_group, mask_pixel, mask_group;
};

inline DcnLayout dcn_layout(DcnPacking packing, const DcnGeometry& s) {
  if (packing == DcnPacking::kSeparate) {
    return {s.group * s.points * 2, s.points * 2, s.group * s.points, s.points};
  }
  const int64_t packed = dcn_packed_width(s.group, s.points);
  return {packed, 3 * s.points, packed, 3 * s.points};
}

// Index of the first weight in the tensor that holds the weights.
inline int64_t dcn_weights_first(DcnPacking packing, const DcnGeometry& s) {
  return packing == DcnPacking::kSeparate ? 0 : 2 * s.points;
}

// What one backend's DCNv3 / DCNv4 kernels accept.
struct DcnBackend {
  at::DeviceType device;
  const char* device_name;  // in messages: "CPU", "CUDA"
  bool reduced_precision;   // float16 and bfloat16 besides float32 and float64
  bool int32_images;        // an image's elements are counted in int32
};

// Checks a call (the Python wrappers check the same with ValueErrors first;
// these guard direct torch.ops calls) and returns its geometry. `mask` is
// nullptr for DCNv4, whose `offset` is then offset_mask.
inline DcnGeometry describe_dcn(const DcnBackend& backend, DcnPacking packing,
                                const at::Tensor& input, const at::Tensor& offset,
                                const at::Tensor* mask, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t group, int64_t group_channels,
                                double offset_scale, bool remove_center) {
  const char* name = dcn_op_name(packing);
  const char* device = backend.device_name;
  TORCH_CHECK(input.dim() == 4, name, ": input must be [N, H, W, group*group_channels], got shape ",
              input.sizes());
  TORCH_CHECK(input.device().type() == backend.device, name, " (", device,
              " kernel): input must be a ", device, " tensor");
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble ||
                  (backend.reduced_precision && (dtype == at::kHalf || dtype == at::kBFloat16)),
              name, " (", device, " kernel): ",
              backend.reduced_precision ? "float32, float64, float16 or bfloat16"
                                        : "float32 or float64",
              " only, got ", dtype);
  auto check_same = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device() == input.device(), name, ": ", what, " is on ", t.device(),
                " but input is on ", input.device());
    TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, ": ", what, " has dtype ",
                t.scalar_type(), " but input has dtype ", input.scalar_type());
    TORCH_CHECK(t.dim() == 4, name, ": ", what, " must be 4-d, got shape ", t.sizes());
  };
  check_same(offset, packing == DcnPacking::kSeparate ? "offset" : "offset_mask");
  if (mask != nullptr) check_same(*mask, "mask");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              name, ": kernel_size, stride, padding and dilation must have 2 entries");
  DcnGeometry s{};
  s.batch = input.size(0);
  s.channels = input.size(3);
  s.set_window(input.size(1), input.size(2), kernel_size[0], kernel_size[1], stride, padding,
               dilation);
  s.group = group;
  s.group_channels = group_channels;
  s.remove_center = remove_center;
  s.offset_scale = offset_scale;
  TORCH_CHECK(s.kernel_h > 0 && s.kernel_w > 0 && s.stride_h > 0 && s.stride_w > 0 &&
                  s.dil_h > 0 && s.dil_w > 0 && s.pad_h >= 0 && s.pad_w >= 0,
              name, ": kernel_size, stride and dilation must be positive, padding non-negative");
  TORCH_CHECK(group > 0 && group_channels > 0, name,
              ": group and group_channels must be positive");
  TORCH_CHECK(s.channels == group * group_channels, name, ": input has ", s.channels,
              " channels but group * group_channels = ", group * group_channels);
  s.points = s.kernel_h * s.kernel_w - (remove_center ? 1 : 0);
  TORCH_CHECK(s.points > 0, name, ": remove_center leaves no point of a 1x1 kernel");
  TORCH_CHECK(s.kernel_fits(), name, ": input of size ", s.height, "x", s.width,
              " is smaller than the dilated kernel with padding");
  TORCH_CHECK(!backend.int32_images || s.height * s.width * s.channels < (int64_t{1} << 31), name,
              ": an image of the input must have fewer than 2^31 elements");
  s.set_output_size();
  if (packing == DcnPacking::kSeparate) {
    TORCH_CHECK(
        offset.sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, group * s.points * 2}),
        name, ": offset must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ",
        group * s.points * 2, "], got ", offset.sizes());
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, group * s.points}),
                name, ": mask must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ",
                group * s.points, "], got ", mask->sizes());
  } else {
    const int64_t packed = dcn_packed_width(group, s.points);
    TORCH_CHECK(offset.sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, packed}), name,
                ": offset_mask must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ", packed,
                "] (group*K*3 rounded up to a multiple of 8), got ", offset.sizes());
  }
  return s;
}

// The backward's grad_output: input's device and dtype, the output's shape.
inline void check_dcn_grad_output(DcnPacking packing, const at::Tensor& grad_output,
                                  const at::Tensor& input, const DcnGeometry& s) {
  const char* name = dcn_op_name(packing);
  TORCH_CHECK(grad_output.device() == input.device() &&
                  grad_output.scalar_type() == input.scalar_type(),
              name, "_backward: grad_output must have input's device and dtype");
  TORCH_CHECK(
      grad_output.sizes() == at::IntArrayRef({s.batch, s.out_h, s.out_w, s.channels}), name,
      "_backward: grad_output must be [", s.batch, ", ", s.out_h, ", ", s.out_w, ", ",
      s.channels, "], got ", grad_output.sizes());
}

}  // namespace detkit
