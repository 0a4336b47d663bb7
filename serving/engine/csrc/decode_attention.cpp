// Decode attention: each row's one new query token against its own cached keys and values, all rows
// of a step in one call. Rows are independent (their own KV slot and length), query heads that share
// a KV head are computed together, so each key and value row is read once per row of the step.
//
// Why by hand: with one query token per row, PyTorch's CPU SDPA spends its time on per-call and
// per-head overhead rather than on the few kFLOPs per position; at 32 rows it was ~35 % of a decode
// step (~35 ns per position, KV head and row) and ~50 us a layer at one row. Sums, softmax and the
// weighted values are fp32 (keys/values may be bf16); a row reads positions [0, length) only, so the
// cache beyond a row's length is never read and needs no mask.
//
// Built by serving/engine/cpu_kernels.py; called through ctypes.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace loraloop;

constexpr int64_t kAhead = 8;  // key rows prefetched ahead


// e^x for x <= 0 (scores minus their maximum): Cephes' expf polynomial, relative error ~2e-7.
inline f32x16 exp16(f32x16 x) {
  const f32x16 floor_value = f32x16{} - 87.0f;
  x = x < floor_value ? floor_value : x;  // e^-87 is still a normal float; nothing here is that small anyway
  const f32x16 t = x * 1.44269504088896341f;
  const i32x16 n = __builtin_convertvector(t - 0.5f, i32x16);  // t <= 0: truncating t - 0.5 rounds to nearest
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (n + 127) << 23;
  f32x16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// One row and one KV head: the G query heads at q (head stride q_head_stride) over positions [0, length)
// of k and v ([capacity, 16 * NV] each), written to out ([G, 16 * NV]). G and NV are compile-time
// constants so the queries and the G x NV accumulators live in vector registers.
template <int G, int NV, typename T>
void attend(const T* q, int64_t q_head_stride, const T* k, const T* v, int64_t length, float scale, T* out,
            std::vector<float>& scores) {
  constexpr int64_t dim = 16 * NV;
  const int64_t padded = (length + 15) / 16 * 16;
  scores.resize(G * padded);
  f32x16 qs[G][NV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) qs[g][j] = load16(q + g * q_head_stride + 16 * j) * scale;
  constexpr int64_t row_bytes = dim * int64_t(sizeof(T));
  for (int64_t p = 0; p < length; ++p) {
    // A row's keys and values are short streams (a few kB) the hardware prefetcher barely warms up on:
    // ask for the keys a few positions ahead, and for this position's values, read after the softmax.
    for (int64_t byte = 0; byte < row_bytes; byte += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(k + (p + kAhead) * dim) + byte);
      __builtin_prefetch(reinterpret_cast<const char*>(v + p * dim) + byte);
    }
    f32x16 key[NV];
    for (int j = 0; j < NV; ++j) key[j] = load16(k + p * dim + 16 * j);
    for (int g = 0; g < G; ++g) {
      f32x16 acc = qs[g][0] * key[0];
      for (int j = 1; j < NV; ++j) acc += qs[g][j] * key[j];
      scores[g * padded + p] = sum16(acc);
    }
  }
  float inverse_sum[G];
  for (int g = 0; g < G; ++g) {
    float* s = scores.data() + g * padded;
    float top = s[0];
    for (int64_t p = 1; p < length; ++p) top = std::max(top, s[p]);
    for (int64_t p = length; p < padded; ++p) s[p] = top;  // padding: computed, never used
    f32x16 sum = {};
    for (int64_t p = 0; p < padded; p += 16) {
      f32x16 e = exp16(load16(s + p) - top);
      std::memcpy(s + p, &e, sizeof e);
      if (p + 16 > length)
        for (int64_t lane = length - p; lane < 16; ++lane) e[lane] = 0.0f;
      sum += e;
    }
    inverse_sum[g] = 1.0f / sum16(sum);
  }
  f32x16 acc[G][NV] = {};
  for (int64_t p = 0; p < length; ++p) {
    f32x16 value[NV];
    for (int j = 0; j < NV; ++j) value[j] = load16(v + p * dim + 16 * j);
    for (int g = 0; g < G; ++g) {
      const float w = scores[g * padded + p];
      for (int j = 0; j < NV; ++j) acc[g][j] += w * value[j];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j)
      for (int lane = 0; lane < 16; ++lane) store(out, g * dim + 16 * j + lane, acc[g][j][lane] * inverse_sum[g]);
}

template <typename T>
using Attend = void (*)(const T*, int64_t, const T*, const T*, int64_t, float, T*, std::vector<float>&);

template <int NV, typename T>
Attend<T> pick_group(int64_t group) {
  switch (group) {
    case 1: return attend<1, NV, T>;
    case 2: return attend<2, NV, T>;
    case 3: return attend<3, NV, T>;
    case 4: return attend<4, NV, T>;
    case 5: return attend<5, NV, T>;
    case 6: return attend<6, NV, T>;
    case 7: return attend<7, NV, T>;
    case 8: return attend<8, NV, T>;
    default: return nullptr;
  }
}

template <typename T>
Attend<T> pick(int64_t group, int64_t dim) {
  switch (dim) {
    case 16: return pick_group<1, T>(group);
    case 32: return pick_group<2, T>(group);
    case 64: return pick_group<4, T>(group);
    case 128: return pick_group<8, T>(group);
    default: return nullptr;
  }
}

template <typename T>
void run(int64_t rows, const int64_t* slots, const int64_t* lengths, const T* q, int64_t q_row_stride,
         int64_t q_head_stride, const T* k_cache, const T* v_cache, int64_t kv_heads, int64_t capacity, int64_t dim,
         int64_t group, T* out, int64_t out_row_stride, float scale) {
  const Attend<T> attend_one = pick<T>(group, dim);  // the caller checked `decode_attention_supports`
  const int64_t units = rows * kv_heads;
#pragma omp parallel if (units > 1)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = u / kv_heads, h = u % kv_heads;
      const int64_t kv_offset = (slots[b] * kv_heads + h) * capacity * dim;
      attend_one(q + b * q_row_stride + h * group * q_head_stride, q_head_stride, k_cache + kv_offset,
                 v_cache + kv_offset, lengths[b], scale, out + b * out_row_stride + h * group * dim, scores);
    }
  }
}

}  // namespace

extern "C" {

// Whether this shape has a compiled variant: 1 to 8 query heads per KV head, head_dim 16, 32, 64 or 128.
int64_t decode_attention_supports(int64_t group, int64_t dim) { return pick<float>(group, dim) != nullptr; }

// q: [rows, heads, dim] (any row and head strides, unit element stride); k_cache, v_cache: one layer's
// [slots, kv_heads, capacity, dim], contiguous; out: [rows, heads * dim] rows; heads = kv_heads * group;
// dim a multiple of 16; bf16: 1 when all of them hold bf16, 0 for fp32.
void decode_attention(int64_t rows, const int64_t* slots, const int64_t* lengths, const void* q, int64_t q_row_stride,
                      int64_t q_head_stride, const void* k_cache, const void* v_cache, int64_t kv_heads,
                      int64_t capacity, int64_t dim, int64_t group, void* out, int64_t out_row_stride, float scale,
                      int64_t bf16) {
  if (bf16)
    run(rows, slots, lengths, static_cast<const uint16_t*>(q), q_row_stride, q_head_stride,
        static_cast<const uint16_t*>(k_cache), static_cast<const uint16_t*>(v_cache), kv_heads, capacity, dim, group,
        static_cast<uint16_t*>(out), out_row_stride, scale);
  else
    run(rows, slots, lengths, static_cast<const float*>(q), q_row_stride, q_head_stride,
        static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), kv_heads, capacity, dim, group,
        static_cast<float*>(out), out_row_stride, scale);
}
}
