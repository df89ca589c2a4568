// The loops are compiled several times for different x86 vector ISAs
// (target_clones); the loader picks the best one for the running CPU, so the
// build stays portable while AVX2 / AVX-512 machines get their vector units.
#include "channel_loops.h"

// The clones are chosen by ISA level (x86-64-v4: AVX-512, v3: AVX2/FMA), not by CPU model:
// "arch=haswell" / "arch=skylake-avx512" clones are picked by the processor's model, so an
// AMD CPU with AVX2 and AVX-512 ran the baseline clone. The levels need GCC 12; older GCC
// selects by feature.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DETKIT_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DETKIT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DETKIT_VECTOR_CLONES
#endif

namespace detkit {
namespace cpu {
namespace {

template <typename T>
inline __attribute__((always_inline)) void gather_impl(T* dst, const T* s00, const T* s01,
                                                       const T* s10, const T* s11, int64_t n,
                                                       T w00, T w01, T w10, T w11,
                                                       bool accumulate) {
  if (accumulate) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t)
      dst[t] += w00 * s00[t] + w01 * s01[t] + w10 * s10[t] + w11 * s11[t];
  } else {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t)
      dst[t] = w00 * s00[t] + w01 * s01[t] + w10 * s10[t] + w11 * s11[t];
  }
}

template <typename T>
inline __attribute__((always_inline)) void scatter_impl(const T* grad, T* d00, T* d01, T* d10,
                                                        T* d11, int64_t n, T w00, T w01,
                                                        T w10, T w11) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const T g = grad[t];
    d00[t] += w00 * g;
    d01[t] += w01 * g;
    d10[t] += w10 * g;
    d11[t] += w11 * g;
  }
}

template <typename T>
inline __attribute__((always_inline)) void reduce_impl(const T* grad, const T* s00,
                                                       const T* s01, const T* s10,
                                                       const T* s11, int64_t n, T ly, T lx,
                                                       T sums[3]) {
  const T hy = 1 - ly, hx = 1 - lx;
  const T w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
  T value = 0, d_y = 0, d_x = 0;
#pragma omp simd reduction(+ : value, d_y, d_x)
  for (int64_t t = 0; t < n; ++t) {
    const T g = grad[t];
    const T v00 = s00[t], v01 = s01[t], v10 = s10[t], v11 = s11[t];
    value += g * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11);
    d_y += g * (hx * (v10 - v00) + lx * (v11 - v01));
    d_x += g * (hy * (v01 - v00) + ly * (v11 - v10));
  }
  sums[0] += value;
  sums[1] += d_y;
  sums[2] += d_x;
}

}  // namespace

#define DETKIT_DEFINE_LOOPS(T)                                                               \
  DETKIT_VECTOR_CLONES void gather_bilinear(T* dst, const T* s00, const T* s01,              \
                                            const T* s10, const T* s11, int64_t n, T w00,    \
                                            T w01, T w10, T w11, bool accumulate) {          \
    gather_impl<T>(dst, s00, s01, s10, s11, n, w00, w01, w10, w11, accumulate);              \
  }                                                                                          \
  DETKIT_VECTOR_CLONES void scatter_bilinear(const T* grad, T* d00, T* d01, T* d10, T* d11,  \
                                             int64_t n, T w00, T w01, T w10, T w11) {        \
    scatter_impl<T>(grad, d00, d01, d10, d11, n, w00, w01, w10, w11);                        \
  }                                                                                          \
  DETKIT_VECTOR_CLONES void reduce_bilinear_grad(const T* grad, const T* s00, const T* s01,  \
                                                 const T* s10, const T* s11, int64_t n,      \
                                                 T ly, T lx, T sums[3]) {                    \
    reduce_impl<T>(grad, s00, s01, s10, s11, n, ly, lx, sums);                               \
  }

DETKIT_DEFINE_LOOPS(float)
DETKIT_DEFINE_LOOPS(double)

#undef DETKIT_DEFINE_LOOPS

}  // namespace cpu
}  // namespace detkit
