// Autocast rules for the detkit ops, so they run inside torch.autocast.
//
// Every op runs in float32 under autocast, on every device (torchvision does
// the same for deform_conv2d and roi_align; dcnv3_core / dcnv4_core follow). The reason is the sampling
// positions: cast to bfloat16 an offset near 20 px moves in steps of 1/8 px
// (float16: 1/64 px), and a RoI coordinate near 500 px in steps of 2 px, so a
// low-precision op would sample visibly off the learned positions
// (docs/ops.md, "Mixed precision", has the measured errors). The op's output
// is float32; the next autocast op casts it down again. Calling the CUDA
// kernels with float16 / bfloat16 tensors directly stays possible (they
// accumulate in float32). The CPU kernels are float32/float64 only.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace detkit {
namespace {

template <c10::DeviceType device>
c10::optional<at::Tensor> cast_optional(at::ScalarType dtype, const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return at::autocast::cached_cast(dtype, *t, device);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& offset,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detkit::deform_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef)>();
  const at::ScalarType dtype = at::kFloat;
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, offset, device),
                 at::autocast::cached_cast(dtype, weight, device),
                 cast_optional<device>(dtype, mask), cast_optional<device>(dtype, bias), stride,
                 padding, dilation);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor deform_roi_pool_autocast(const at::Tensor& input, const at::Tensor& rois,
                                    const c10::optional<at::Tensor>& offset,
                                    const c10::optional<at::Tensor>& mask, int64_t pooled_height,
                                    int64_t pooled_width, double spatial_scale,
                                    int64_t sampling_ratio, double gamma) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detkit::deform_roi_pool", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&, int64_t, int64_t,
                                         double, int64_t, double)>();
  const at::ScalarType dtype = at::kFloat;
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, rois, device), cast_optional<device>(dtype, offset),
                 cast_optional<device>(dtype, mask), pooled_height, pooled_width, spatial_scale,
                 sampling_ratio, gamma);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor dcnv3_core_autocast(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                               int64_t group_channels, double offset_scale, bool remove_center) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detkit::dcnv3_core", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef, int64_t, int64_t, double, bool)>();
  const at::ScalarType dtype = at::kFloat;
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, offset, device),
                 at::autocast::cached_cast(dtype, mask, device), kernel_size, stride, padding,
                 dilation, group, group_channels, offset_scale, remove_center);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor dcnv4_core_autocast(const at::Tensor& input, const at::Tensor& offset_mask,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t group,
                               int64_t group_channels, double offset_scale, bool remove_center) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detkit::dcnv4_core", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                         int64_t, int64_t, double, bool)>();
  const at::ScalarType dtype = at::kFloat;
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, offset_mask, device), kernel_size, stride,
                 padding, dilation, group, group_channels, offset_scale, remove_center);
}

}  // namespace
}  // namespace detkit

TORCH_LIBRARY_IMPL(detkit, AutocastCUDA, m) {
  m.impl("deform_conv2d",
         &detkit::deform_conv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("deform_roi_pool",
         &detkit::deform_roi_pool_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("dcnv3_core",
         &detkit::dcnv3_core_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("dcnv4_core",
         &detkit::dcnv4_core_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(detkit, AutocastCPU, m) {
  m.impl("deform_conv2d",
         &detkit::deform_conv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("deform_roi_pool",
         &detkit::deform_roi_pool_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("dcnv3_core",
         &detkit::dcnv3_core_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("dcnv4_core",
         &detkit::dcnv4_core_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}
