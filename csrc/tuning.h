// Run-time knobs of the kernels, defined in detkit.cpp and settable from
// Python for tests (detkit._C._set_cuda_columns_budget); not a public API.
#pragma once

#include <cstdint>

namespace detkit {

// Bytes of im2col columns (plus the GEMM output) that the CUDA deform_conv2d
// processes per chunk of images; 256 MiB unless changed. A budget below one
// image's columns gives chunks of one image.
int64_t cuda_columns_budget_bytes();

// Sets the budget (bytes >= 1) and returns the previous one.
int64_t set_cuda_columns_budget_bytes(int64_t bytes);

}  // namespace detkit
