// LoRA for a step whose rows each use their own adapter slot, in one call (the SGMV idea of Punica and
// S-LoRA, for a CPU): y[t, group member m] += (x[t] @ A[s_t][:, m*r:(m+1)*r]) @ B_m[s_t], for every
// token t whose slot s_t is not 0 (the base model).
//
// Why by hand: in eager PyTorch the same work is 4-10 small ops per projection group (gather, dtype
// casts, two batched matmuls, scatter-add), ~20 us each on a small CPU whatever their size; a mixed
// 8-adapter step at 32 rows spent ~23 ms on them against ~38 ms for the whole base step. Here each
// group costs one call: tokens are grouped by slot, so each slot's A and B are read once per chunk
// of its tokens, and sums are kept in fp32 (weights and activations may be bf16).
//
// Built by serving/engine/cpu_kernels.py; called through ctypes.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using namespace loraloop;

constexpr int kMaxMembers = 4;
constexpr int64_t kChunk = 16;  // tokens of one slot per work item: their sums stay in L1/L2
constexpr int64_t kAhead = 8;   // rows prefetched ahead in a tile

struct Group {  // one fused projection group of one layer; filled by cpu_kernels.py
  int64_t in_features;
  int64_t a_cols;  // members * rank: A is [slots, in_features, a_cols]
  int64_t members;
  int64_t rank;
  int64_t num_slots;
  int64_t weight_bf16;  // 1: A and B hold bf16, 0: fp32
  const void* a;
  const void* b[kMaxMembers];  // B_m is [slots, rank, outs[m]]
  int64_t outs[kMaxMembers];
  int64_t y_offsets[kMaxMembers];  // where member m's outputs start in a row of y
};

inline void add_to(float* p, int64_t i, float v) { p[i] += v; }
inline void add_to(uint16_t* p, int64_t i, float v) { store(p, i, load(p, i) + v); }  // in fp32, then rounded

// out[j][c] = sum_i lhs[j][i] * rhs[i][c] for TB rows and 16 * NV columns: the TB x NV accumulators stay
// in vector registers and each rhs row is loaded once for all TB rows.
template <int TB, int NV, typename W>
inline void tile(const float* lhs, int64_t lhs_stride, int64_t depth, const W* rhs, int64_t rhs_stride, float* out,
                 int64_t out_stride) {
  f32x16 acc[TB][NV] = {};
  // Rows of a column block are a row stride apart, which the hardware prefetcher follows late: ask for
  // a few rows ahead (cold weights ran 2x slower than cached ones without this) or, when the block is
  // only a few rows deep (B: the rank), for the same row of the next column block.
  const int64_t ahead = depth > 2 * kAhead ? kAhead * rhs_stride : 16 * NV;
  for (int64_t i = 0; i < depth; ++i) {
    const char* next = reinterpret_cast<const char*>(rhs + i * rhs_stride + ahead);
    for (int v = 0; v < NV * 16 * int(sizeof(W)); v += 64) __builtin_prefetch(next + v);
    f32x16 r[NV];
    for (int v = 0; v < NV; ++v) r[v] = load16(rhs + i * rhs_stride + 16 * v);
    for (int j = 0; j < TB; ++j) {
      const float l = lhs[j * lhs_stride + i];
      for (int v = 0; v < NV; ++v) acc[j][v] += l * r[v];
    }
  }
  for (int j = 0; j < TB; ++j)
    for (int v = 0; v < NV; ++v) std::memcpy(out + j * out_stride + 16 * v, &acc[j][v], sizeof(f32x16));
}

// Rows in tiles as tall as the 32 vector registers allow (TB x NV accumulators, NV for the rhs row), so
// each rhs load and widening serves as many rows as possible: prompt chunks are many rows of one slot.
template <int TB, int NV, typename W>
inline void tile_rest(const float* l, int64_t lhs_stride, int64_t rest, int64_t depth, const W* rhs,
                      int64_t rhs_stride, float* o, int64_t out_stride) {
  if constexpr (TB > 0) {
    if (rest == TB) return tile<TB, NV>(l, lhs_stride, depth, rhs, rhs_stride, o, out_stride);
    tile_rest<TB - 1, NV>(l, lhs_stride, rest, depth, rhs, rhs_stride, o, out_stride);
  }
}

template <int NV, typename W>
inline void tile_rows(const float* lhs, int64_t lhs_stride, int64_t rows, int64_t depth, const W* rhs,
                      int64_t rhs_stride, float* out, int64_t out_stride) {
  constexpr int kTall = NV == 4 ? 6 : 8;
  int64_t j = 0;
  for (; j + kTall <= rows; j += kTall)
    tile<kTall, NV>(lhs + j * lhs_stride, lhs_stride, depth, rhs, rhs_stride, out + j * out_stride, out_stride);
  tile_rest<kTall - 1, NV>(lhs + j * lhs_stride, lhs_stride, rows - j, depth, rhs, rhs_stride, out + j * out_stride,
                           out_stride);
}

// out[rows x cols] = lhs[rows x depth] @ rhs[depth x cols] (rhs row-major, W = float or bf16). Column
// blocks are as wide as the registers allow (64), so each rhs row is read in as few pieces as possible.
template <typename W>
void small_gemm(const float* lhs, int64_t lhs_stride, int64_t rows, int64_t depth, const W* rhs, int64_t rhs_stride,
                int64_t cols, float* out, int64_t out_stride) {
  int64_t c0 = 0;
  for (; c0 + 64 <= cols; c0 += 64) tile_rows<4>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride);
  switch ((cols - c0) / 16) {
    case 3: tile_rows<3>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride); break;
    case 2: tile_rows<2>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride); break;
    case 1: tile_rows<1>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride); break;
    default: break;
  }
  c0 += (cols - c0) / 16 * 16;
  for (; c0 < cols; ++c0)  // fewer than 16 columns left
    for (int64_t j = 0; j < rows; ++j) {
      float sum = 0.0f;
      for (int64_t i = 0; i < depth; ++i) sum += lhs[j * lhs_stride + i] * load(rhs, i * rhs_stride + c0);
      out[j * out_stride + c0] = sum;
    }
}

template <typename Act, typename W>
void one_chunk(const Group& g, int64_t slot, const int64_t* rows, int64_t k, const Act* x, int64_t x_stride,
               Act* y, int64_t y_stride) {
  std::vector<float> xf(k * g.in_features);  // this chunk's inputs in fp32, contiguous
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < g.in_features; ++i) xf[j * g.in_features + i] = load(x, rows[j] * x_stride + i);
  std::vector<float> h(k * g.a_cols);
  const W* a = static_cast<const W*>(g.a) + slot * g.in_features * g.a_cols;
  small_gemm(xf.data(), g.in_features, k, g.in_features, a, g.a_cols, g.a_cols, h.data(), g.a_cols);
  for (int64_t m = 0; m < g.members; ++m) {
    const int64_t out = g.outs[m];
    const W* b = static_cast<const W*>(g.b[m]) + slot * g.rank * out;
    std::vector<float> z(k * out);
    small_gemm(h.data() + m * g.rank, g.a_cols, k, g.rank, b, out, out, z.data(), out);
    for (int64_t j = 0; j < k; ++j) {
      Act* y_row = y + rows[j] * y_stride + g.y_offsets[m];
      const float* z_j = z.data() + j * out;
      for (int64_t c = 0; c < out; ++c) add_to(y_row, c, z_j[c]);
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 activations and factors on a CPU with AVX512-BF16: vdpbf16ps multiplies 16 pairs of depth-adjacent
// bf16 values and adds both products to 16 fp32 sums, twice a fused multiply-add's work on widened values
// and no widening; y += z is 16 columns at a time too (vcvtneps2bf16 rounds). The rhs is row-major as
// stored, so each pair of rows (depth i, i + 1) is interleaved in registers by one permute, and each lhs pair
// is one 32-bit broadcast. The intermediate x @ A is rounded to bf16 before it meets B, as PyTorch's bf16
// matmuls (and PEFT) round it. The bundled model's 120 groups on a 2-core AMD EPYC (Zen 4): 256 tokens of
// one slot 11.4 against 24.4 ms on the widening path, 50 tokens 3.4 against 6.5, 32 rows over 8 slots 5.0
// against 6.5 (reading 78 MB of factors: near the memory's pace), one row 0.8 against 1.2.
alignas(64) constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// out[j][c] = sum_i lhs[j][i] * rhs[i][c] for TB rows and 16 * NV columns (the last vector's columns masked
// by `last`); depth even.
template <int TB, int NV>
inline void tile_bf16(const uint16_t* lhs, int64_t lhs_stride, int64_t depth, const uint16_t* rhs, int64_t rhs_stride,
                      float* out, int64_t out_stride, __mmask16 last) {
  // Every loop over j and v is unrolled in full, so the sums live in registers (GCC kept them on the stack,
  // a store after every vdpbf16ps, until told).
  __m512 acc[TB][NV];
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const int64_t ahead = depth > 2 * kAhead ? kAhead * rhs_stride : 16 * NV;
  for (int64_t i = 0; i < depth; i += 2) {
    const uint16_t* row = rhs + i * rhs_stride;
    for (int v = 0; v < NV * 32; v += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(row + ahead) + v);
      __builtin_prefetch(reinterpret_cast<const char*>(row + rhs_stride + ahead) + v);
    }
    __m512bh r[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xffff);
      const __m256i r0 = _mm256_maskz_loadu_epi16(mask, row + 16 * v);
      const __m256i r1 = _mm256_maskz_loadu_epi16(mask, row + rhs_stride + 16 * v);
      const __m512i both = _mm512_inserti64x4(_mm512_zextsi256_si512(r0), r1, 1);
      r[v] = (__m512bh)_mm512_permutexvar_epi16(interleave, both);
    }
#pragma GCC unroll 8
    for (int j = 0; j < TB; ++j) {
      int32_t pair;
      std::memcpy(&pair, lhs + j * lhs_stride + i, sizeof pair);
      const __m512bh l = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], l, r[v]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < TB; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(out + j * out_stride + 16 * v, acc[j][v]);
    _mm512_mask_storeu_ps(out + j * out_stride + 16 * (NV - 1), last, acc[j][NV - 1]);
  }
}

template <int TB, int NV>
inline void tile_bf16_rest(const uint16_t* l, int64_t lhs_stride, int64_t rest, int64_t depth, const uint16_t* rhs,
                           int64_t rhs_stride, float* o, int64_t out_stride, __mmask16 last) {
  if constexpr (TB > 0) {
    if (rest == TB) return tile_bf16<TB, NV>(l, lhs_stride, depth, rhs, rhs_stride, o, out_stride, last);
    tile_bf16_rest<TB - 1, NV>(l, lhs_stride, rest, depth, rhs, rhs_stride, o, out_stride, last);
  }
}

template <int NV>
inline void tile_bf16_rows(const uint16_t* lhs, int64_t lhs_stride, int64_t rows, int64_t depth, const uint16_t* rhs,
                           int64_t rhs_stride, float* out, int64_t out_stride, __mmask16 last) {
  constexpr int kTall = NV == 4 ? 6 : 8;  // TB x NV sums + NV rhs + lhs + the permute's index: <= 32 registers
  int64_t j = 0;
  for (; j + kTall <= rows; j += kTall)
    tile_bf16<kTall, NV>(lhs + j * lhs_stride, lhs_stride, depth, rhs, rhs_stride, out + j * out_stride, out_stride,
                         last);
  tile_bf16_rest<kTall - 1, NV>(lhs + j * lhs_stride, lhs_stride, rows - j, depth, rhs, rhs_stride,
                                out + j * out_stride, out_stride, last);
}

// out[rows x cols] = lhs[rows x depth] @ rhs[depth x cols], all bf16 but out (fp32); depth even.
void small_gemm_bf16(const uint16_t* lhs, int64_t lhs_stride, int64_t rows, int64_t depth, const uint16_t* rhs,
                     int64_t rhs_stride, int64_t cols, float* out, int64_t out_stride) {
  int64_t c0 = 0;
  for (; c0 + 64 <= cols; c0 += 64)
    tile_bf16_rows<4>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride, 0xffff);
  const int64_t rest = cols - c0;  // 0..63 columns: up to 4 vectors, the last one partial
  const __mmask16 last = __mmask16((1u << ((rest - 1) % 16 + 1)) - 1u);
  switch ((rest + 15) / 16) {
    case 4: tile_bf16_rows<4>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride, last); break;
    case 3: tile_bf16_rows<3>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride, last); break;
    case 2: tile_bf16_rows<2>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride, last); break;
    case 1: tile_bf16_rows<1>(lhs, lhs_stride, rows, depth, rhs + c0, rhs_stride, out + c0, out_stride, last); break;
    default: break;
  }
}

// dst = bf16(src), 16 at a time by vcvtneps2bf16 (round to nearest even, as PyTorch; NaN stays NaN).
inline void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) store(dst, i, src[i]);
}

// y[c] = bf16(y[c] + z[c]): the sum in fp32, one rounding, 16 columns at a time.
inline void add_rounded(uint16_t* y, const float* z, int64_t n) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 sum = load16(y + c) + load16(z + c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), (__m256i)_mm512_cvtneps_pbh(sum));
  }
  for (; c < n; ++c) add_to(y, c, z[c]);
}

void one_chunk_bf16(const Group& g, int64_t slot, const int64_t* rows, int64_t k, const uint16_t* x, int64_t x_stride,
                    uint16_t* y, int64_t y_stride) {
  std::vector<uint16_t> xb(k * g.in_features);  // this chunk's inputs, contiguous
  for (int64_t j = 0; j < k; ++j)
    std::memcpy(xb.data() + j * g.in_features, x + rows[j] * x_stride, g.in_features * sizeof(uint16_t));
  std::vector<float> h(k * g.a_cols);
  const uint16_t* a = static_cast<const uint16_t*>(g.a) + slot * g.in_features * g.a_cols;
  small_gemm_bf16(xb.data(), g.in_features, k, g.in_features, a, g.a_cols, g.a_cols, h.data(), g.a_cols);
  std::vector<uint16_t> hb(h.size());
  round_to_bf16(h.data(), hb.data(), int64_t(h.size()));
  for (int64_t m = 0; m < g.members; ++m) {
    const int64_t out = g.outs[m];
    const uint16_t* b = static_cast<const uint16_t*>(g.b[m]) + slot * g.rank * out;
    std::vector<float> z(k * out);
    small_gemm_bf16(hb.data() + m * g.rank, g.a_cols, k, g.rank, b, out, out, z.data(), out);
    for (int64_t j = 0; j < k; ++j) add_rounded(y + rows[j] * y_stride + g.y_offsets[m], z.data() + j * out, out);
  }
}

// The pairs need an even depth in both products (every model and rank here; otherwise the path below).
bool even_depths(const Group& g) { return g.in_features % 2 == 0 && g.rank % 2 == 0; }
#endif

template <typename Act, typename W>
void run(const Group& g, int64_t tokens, const int64_t* slots, const Act* x, int64_t x_stride, Act* y,
         int64_t y_stride) {
  // Tokens grouped by slot (a counting sort), then cut into work items of at most kChunk tokens.
  std::vector<int64_t> start(g.num_slots + 1, 0);
  for (int64_t t = 0; t < tokens; ++t)
    if (slots[t] > 0 && slots[t] < g.num_slots) ++start[slots[t] + 1];
  for (int64_t s = 0; s < g.num_slots; ++s) start[s + 1] += start[s];
  std::vector<int64_t> order(start[g.num_slots]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < tokens; ++t)
    if (slots[t] > 0 && slots[t] < g.num_slots) order[fill[slots[t]]++] = t;
  struct Item {
    int64_t slot, begin, end;
  };
  std::vector<Item> items;
  for (int64_t s = 1; s < g.num_slots; ++s)
    for (int64_t b = start[s]; b < start[s + 1]; b += kChunk) items.push_back({s, b, std::min(b + kChunk, start[s + 1])});
  const int64_t n = static_cast<int64_t>(items.size());
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<Act, uint16_t> && std::is_same_v<W, uint16_t>) {
    if (even_depths(g)) {
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
      for (int64_t i = 0; i < n; ++i)
        one_chunk_bf16(g, items[i].slot, order.data() + items[i].begin, items[i].end - items[i].begin, x, x_stride, y,
                       y_stride);
      return;
    }
  }
#endif
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int64_t i = 0; i < n; ++i)
    one_chunk<Act, W>(g, items[i].slot, order.data() + items[i].begin, items[i].end - items[i].begin, x, x_stride, y,
                      y_stride);
}

}  // namespace

extern "C" {

// x, y: [tokens, *] rows with unit column stride; act_bf16: 1 when x and y hold bf16, 0 for fp32.
void lora_sgmv(const Group* g, int64_t tokens, const int64_t* slots, const void* x, int64_t x_stride, void* y,
               int64_t y_stride, int64_t act_bf16) {
  if (act_bf16 && g->weight_bf16)
    run<uint16_t, uint16_t>(*g, tokens, slots, static_cast<const uint16_t*>(x), x_stride, static_cast<uint16_t*>(y), y_stride);
  else if (act_bf16)
    run<uint16_t, float>(*g, tokens, slots, static_cast<const uint16_t*>(x), x_stride, static_cast<uint16_t*>(y), y_stride);
  else if (g->weight_bf16)
    run<float, uint16_t>(*g, tokens, slots, static_cast<const float*>(x), x_stride, static_cast<float*>(y), y_stride);
  else
    run<float, float>(*g, tokens, slots, static_cast<const float*>(x), x_stride, static_cast<float*>(y), y_stride);
}
}
