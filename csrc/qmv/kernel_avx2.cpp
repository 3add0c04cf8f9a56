// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX2 + FMA kernel (8 float lanes), for x86-64 CPUs without AVX-512. Compiled with a target
// pragma; qmv.cpp calls it only when the CPU reports avx2, fma and f16c at run time.
//
// 4-bit: 8 packed bytes (16 codes) -> 8 int32 lanes; a mask gives the low nibbles (the even-indexed
// codes), a shift the high ones, so x is prepared with each 16-element chunk split into its even then
// its odd elements. 8-bit: 8 bytes -> 8 floats, x in natural order.

#include <cstdint>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

namespace qmv {
namespace {

constexpr int kScaleBlock = 256;  // most groups in one K block (scales on the stack)
constexpr int kXBytes = 24 * 1024;  // x bytes per K block: half a typical L1d
constexpr int kXBytesOneRow = 256 * 1024;
constexpr int kRowBlock = 256;  // rows swept per K block (when x needs several K blocks)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Groups [g0, g1) of rows n .. n+R-1; the first K block (g0 == 0) stores, later ones add.
template <int M, int R, int BITS>
inline void block(const Problem& p, int n, int g0, int g1, int pf) {
  constexpr int CE = BITS == 4 ? 16 : 8;  // codes per 8-byte chunk
  const int G = p.K / p.group_size;
  const int cpg = p.group_size / CE;
  const int64_t K = p.K;
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint8_t*>(p.w + (n + r) * p.w_stride);
  // The same bytes pf rows ahead (pf = 0: this row again, already cached; no branch in the loop).
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;

  float bd[R][M] = {};
  for (int r = 0; r < R && g0 == 0; ++r) {
    for (int g = 0; g < G; ++g) {
      const float b = load_scale(p.biases, p.scale_type, (n + r) * p.b_stride + g);
      for (int m = 0; m < M; ++m) bd[r][m] += b * p.xsum[m * G + g];
    }
  }

  const __m256i low4 = _mm256_set1_epi32(0xf);
  __m256 tot[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) tot[r][m] = _mm256_setzero_ps();

  float sc[R][kScaleBlock];  // g1 - g0 <= kScaleBlock
  {
    const int gb = g0, gn = g1 - g0;
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < gn; ++j) sc[r][j] = load_scale(p.scales, p.scale_type, (n + r) * p.s_stride + gb + j);
    for (int g = gb; g < gb + gn; ++g) {
      __m256 acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
      for (int c = 0; c < cpg; ++c) {
        const int64_t ci = static_cast<int64_t>(g) * cpg + c;
        const float* xc = p.xp + ci * CE;
        for (int r = 0; r < R; ++r) {
          if ((ci & 7) == 0) prefetch_l2(wr[r] + pf_off + ci * 8);
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[r] + ci * 8)));
          if constexpr (BITS == 4) {
            const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low4));
            const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
            for (int m = 0; m < M; ++m) {
              acc[r][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xc + m * K), acc[r][m]);
              acc[r][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xc + m * K + 8), acc[r][m]);
            }
          } else {
            const __m256 f = _mm256_cvtepi32_ps(v);
            for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xc + m * K), acc[r][m]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_set1_ps(sc[r][g - gb]);
        for (int m = 0; m < M; ++m) tot[r][m] = _mm256_fmadd_ps(s, acc[r][m], tot[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float* o = p.out + m * static_cast<int64_t>(p.N) + n + r;
      const float v = hsum(tot[r][m]) + bd[r][m];
      *o = g0 == 0 ? v : *o + v;
    }
}

// Rows [n0, n1) in blocks of kRowBlock rows; within a block, K in pieces whose x (M rows) fits the L1
// cache, so that x is read from L1 for every row however many rows x has.
template <int M, int R, int BITS>
void rows_mr(const Problem& p, int n0, int n1) {
  const int G = p.K / p.group_size;
  // One row of x streams well from L2 (split K only when it would not fit there); several rows of
  // x are read once per row of w, so they must come from L1.
  int kg = (M == 1 ? kXBytesOneRow : kXBytes) / (M * p.group_size * 4);
  kg = kg < 1 ? 1 : (kg > kScaleBlock ? kScaleBlock : kg);
  // Prefetch the rows that come next in this order: with one K block, the rows of the whole range;
  // with several, the next rows of this row block in the same K block.
  const int64_t row_bytes = (kg >= G ? p.K : static_cast<int64_t>(kg) * p.group_size) * BITS / 8;
  if (kg >= G) prefetch_start(p, n0, n1, row_bytes);
  for (int nb = n0; nb < n1; nb += kRowBlock) {
    const int nb1 = nb + kRowBlock < n1 ? nb + kRowBlock : n1;
    const int limit = kg >= G ? n1 : nb1;
    for (int g0 = 0; g0 < G; g0 += kg) {
      const int g1 = g0 + kg < G ? g0 + kg : G;
      int n = nb;
      for (; n + R <= nb1; n += R) block<M, R, BITS>(p, n, g0, g1, prefetch_rows<R>(n, limit, row_bytes));
      for (; n < nb1; ++n) block<M, 1, BITS>(p, n, g0, g1, prefetch_rows<1>(n, limit, row_bytes));
    }
  }
}

template <int BITS>
void rows_bits(const Problem& p, int n0, int n1) {
  switch (p.M) {
    case 1: return rows_mr<1, 4, BITS>(p, n0, n1);
    case 2: return rows_mr<2, 2, BITS>(p, n0, n1);
    case 3: return rows_mr<3, 1, BITS>(p, n0, n1);
    case 4: return rows_mr<4, 1, BITS>(p, n0, n1);
    case 5: return rows_mr<5, 1, BITS>(p, n0, n1);
    case 6: return rows_mr<6, 1, BITS>(p, n0, n1);
    case 7: return rows_mr<7, 1, BITS>(p, n0, n1);
    default: return rows_mr<8, 1, BITS>(p, n0, n1);
  }
}

void rows(const Problem& p, int n0, int n1) {
  if (p.bits == 4) {
    rows_bits<4>(p, n0, n1);
  } else {
    rows_bits<8>(p, n0, n1);
  }
}

}  // namespace
}  // namespace qmv

#pragma GCC pop_options

namespace qmv {

Kernel kernel_avx2() {
  return {"avx2", 16, rows};
}

}  // namespace qmv
