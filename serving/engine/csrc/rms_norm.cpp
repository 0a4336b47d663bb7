// The residual add and RMSNorm between a layer's blocks, in one call: x += delta, then
// out = round(round(x * rstd) * weight), rounding where transformers' LlamaRMSNorm rounds (normalise in
// fp32, round to the model's dtype, then scale), so the engine keeps its numerics.
//
// Why by hand: at a few rows PyTorch's rms_norm is ~12 us (several ops inside) and the add ~1 us, for
// ~1 us of work; 61 of them a step were ~5 % of a single stream's time.
//
// Built by serving/engine/cpu_kernels.py; called through ctypes.
#include <cmath>
#include <cstdint>

#include "common.h"

namespace {

using namespace loraloop;

template <typename T>
inline T rounded(float v) {  // v in T's precision (a no-op for fp32)
  T t;
  store(&t, 0, v);
  return t;
}

template <typename T>
void norm_row(int64_t dim, T* x, const T* delta, const T* weight, T* out, float eps) {
  if (delta != nullptr)
    for (int64_t c = 0; c < dim; ++c) x[c] = rounded<T>(load(x, c) + load(delta, c));
  float squares = 0.0f;
  int64_t c0 = 0;
  if (dim >= 16) {  // 16 partial sums (PyTorch's vectorised sum also reorders)
    f32x16 partial = {};
    for (; c0 + 16 <= dim; c0 += 16) {
      const f32x16 v = load16(x + c0);
      partial += v * v;
    }
    squares = sum16(partial);
  }
  for (int64_t c = c0; c < dim; ++c) squares += load(x, c) * load(x, c);
  const float rstd = 1.0f / std::sqrt(squares / float(dim) + eps);
  for (int64_t c = 0; c < dim; ++c) {
    const T normalised = rounded<T>(load(x, c) * rstd);
    out[c] = rounded<T>(load(&normalised, 0) * load(weight, c));
  }
}

template <typename T>
void run(int64_t rows, int64_t dim, T* x, int64_t x_stride, const T* delta, int64_t delta_stride, const T* weight,
         T* out, int64_t out_stride, float eps) {
#pragma omp parallel for if (rows >= 16)
  for (int64_t t = 0; t < rows; ++t)
    norm_row(dim, x + t * x_stride, delta == nullptr ? nullptr : delta + t * delta_stride, weight, out + t * out_stride,
             eps);
}

}  // namespace

extern "C" {

// x: [rows, dim] rows (updated in place when delta is not null); delta: [rows, dim] rows or null;
// weight: [dim]; out: [rows, dim] rows; bf16: 1 when all hold bf16, 0 for fp32.
void add_rms_norm(int64_t rows, int64_t dim, void* x, int64_t x_stride, const void* delta, int64_t delta_stride,
                  const void* weight, void* out, int64_t out_stride, float eps, int64_t bf16) {
  if (bf16)
    run(rows, dim, static_cast<uint16_t*>(x), x_stride, static_cast<const uint16_t*>(delta), delta_stride,
        static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), out_stride, eps);
  else
    run(rows, dim, static_cast<float*>(x), x_stride, static_cast<const float*>(delta), delta_stride,
        static_cast<const float*>(weight), static_cast<float*>(out), out_stride, eps);
}
}
