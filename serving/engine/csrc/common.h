// Shared by the CPU kernels (built by serving/engine/cpu_kernels.py): bf16 <-> fp32 and 16-float vectors.
#pragma once
#include <cstdint>
#include <cstring>

namespace loraloop {

// bf16 is the top half of an fp32: widening is a shift; narrowing rounds to nearest even, as PyTorch.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  const uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = uint16_t(u >> 16);
}

// 16 floats: GCC's vector extension, lowered to one zmm (AVX-512) or two ymm (AVX2) registers.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const uint16_t* p) {
  u16x16 half;
  std::memcpy(&half, p, sizeof half);
  const u32x16 wide = __builtin_convertvector(half, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

// 16 values rounded to T's precision (round to nearest even, NaN stays NaN: as `store`), kept as fp32.
inline f32x16 rounded16(f32x16 v, const float*) { return v; }
inline f32x16 rounded16(f32x16 v, const uint16_t*) {
  u32x16 u;
  std::memcpy(&u, &v, sizeof u);
  const u32x16 nearest = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const u32x16 quiet = (u | 0x00400000u) & 0xffff0000u;
  u = (u & 0x7fffffffu) > 0x7f800000u ? quiet : nearest;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
inline void store16(uint16_t* p, f32x16 v) {  // v already rounded: its top halves
  u32x16 u;
  std::memcpy(&u, &v, sizeof u);
  const u16x16 top = __builtin_convertvector(u >> 16, u16x16);
  std::memcpy(p, &top, sizeof top);
}

// A tree of halves: independent adds, not one 15-long chain (the compiler may not reorder float sums).
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
inline float sum16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

}  // namespace loraloop
