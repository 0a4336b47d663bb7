// Rotary position embedding on a step's queries and keys, in place, and each decode row's new key and value
// into its KV slot: one call per layer. Rounding as transformers' apply_rotary_pos_emb in the model's dtype:
// x * cos and rotate_half(x) * sin each rounded, then their sum (bf16 products are exact in fp32, so each
// rounding is PyTorch's; no fused multiply-add, which would round once instead of twice).
//
// Why by hand: in eager PyTorch this is a concatenation, two multiplications, an addition and two
// index_copy_ calls a layer, ~10-20 us each whatever the row count: 3-4 ms of a 10-12 ms single-stream step.
//
// Built by serving/engine/cpu_kernels.py; called through ctypes.
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

using namespace loraloop;

// One head in place: x * cos + rotate_half(x) * sin, with sin's first half negated in the table.
template <typename T>
[[gnu::optimize("fp-contract=off")]] void rotate_head(T* x, const T* cos, const T* sin_signed, int64_t dim) {
  const int64_t half = dim / 2;
  T original[256];  // head_dim <= 256 (checked by the caller)
  std::memcpy(original, x, dim * sizeof(T));
  if (half % 16 == 0) {
    for (int64_t c = 0; c < dim; c += 16) {
      const f32x16 a = rounded16(load16(original + c) * load16(cos + c), x);
      const f32x16 b = rounded16(load16(original + (c < half ? c + half : c - half)) * load16(sin_signed + c), x);
      store16(x + c, rounded16(a + b, x));
    }
    return;
  }
  for (int64_t c = 0; c < dim; ++c) {
    T a, b;
    store(&a, 0, load(original, c) * load(cos, c));
    store(&b, 0, load(original, c < half ? c + half : c - half) * load(sin_signed, c));
    store(x, c, load(&a, 0) + load(&b, 0));
  }
}

template <typename T>
void run(int64_t tokens, int64_t decode_rows, T* qkv, int64_t qkv_stride, const int64_t* positions, const T* cos,
         const T* sin_signed, int64_t q_heads, int64_t kv_heads, int64_t dim, T* k_cache, T* v_cache, int64_t capacity,
         const int64_t* slots, const int64_t* write_positions) {
  const int64_t rotated = q_heads + kv_heads;  // q's heads, then k's; v's follow unrotated
#pragma omp parallel for if (tokens >= 64)
  for (int64_t t = 0; t < tokens; ++t) {
    T* row = qkv + t * qkv_stride;
    const T* c = cos + positions[t] * dim;
    const T* s = sin_signed + positions[t] * dim;
    for (int64_t h = 0; h < rotated; ++h) rotate_head(row + h * dim, c, s, dim);
    if (t < decode_rows) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at = ((slots[t] * kv_heads + h) * capacity + write_positions[t]) * dim;
        std::memcpy(k_cache + at, row + (q_heads + h) * dim, dim * sizeof(T));
        std::memcpy(v_cache + at, row + (rotated + h) * dim, dim * sizeof(T));
      }
    }
  }
}

}  // namespace

extern "C" {

// qkv: [tokens, (q_heads + 2 kv_heads) * dim] rows (q, k, v heads side by side), rotated in place;
// positions: [tokens]; cos, sin_signed: [positions, dim] tables (sin's first half negated); the first
// decode_rows tokens also go to k_cache/v_cache [slots, kv_heads, capacity, dim] at (slots[t],
// write_positions[t]); bf16: 1 when all hold bf16, 0 for fp32.
void rope_and_store(int64_t tokens, int64_t decode_rows, void* qkv, int64_t qkv_stride, const int64_t* positions,
                    const void* cos, const void* sin_signed, int64_t q_heads, int64_t kv_heads, int64_t dim,
                    void* k_cache, void* v_cache, int64_t capacity, const int64_t* slots,
                    const int64_t* write_positions, int64_t bf16) {
  if (bf16)
    run(tokens, decode_rows, static_cast<uint16_t*>(qkv), qkv_stride, positions, static_cast<const uint16_t*>(cos),
        static_cast<const uint16_t*>(sin_signed), q_heads, kv_heads, dim, static_cast<uint16_t*>(k_cache),
        static_cast<uint16_t*>(v_cache), capacity, slots, write_positions);
  else
    run(tokens, decode_rows, static_cast<float*>(qkv), qkv_stride, positions, static_cast<const float*>(cos),
        static_cast<const float*>(sin_signed), q_heads, kv_heads, dim, static_cast<float*>(k_cache),
        static_cast<float*>(v_cache), capacity, slots, write_positions);
}
}
