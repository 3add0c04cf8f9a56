// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX-512 kernel (16 float lanes). Compiled with a target pragma, not with -m flags or -march=native:
// qmv.cpp calls it only when the CPU reports avx512f/bw/vl, fma and f16c at run time.
//
// 4-bit: 16 packed bytes (32 codes) -> 16 int32 lanes holding one byte each. vpermps with a table
// {0.f, 1.f, ..., 15.f} looks at the low 4 bits of each lane only, so it turns the low nibbles into
// floats without masking; a 4-bit shift gives the high nibbles. The low nibbles are the even-indexed
// codes, so x is prepared with each 32-element chunk split into its even then its odd elements.
// 8-bit: 16 bytes -> 16 int32 -> 16 floats, x in natural order.
// Per group of each output row the dot products accumulate in vector registers; the group's scale
// is applied with one FMA per vector, and the biases cost one dot product with the group sums of x.

#include <cstdint>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include <immintrin.h>

namespace qmv {
namespace {

constexpr int kScaleBlock = 256;  // most groups in one K block (scales on the stack)
constexpr int kXBytes = 24 * 1024;  // x bytes per K block: half a typical L1d
constexpr int kXBytesOneRow = 256 * 1024;
constexpr int kRowBlock = 256;  // rows swept per K block (when x needs several K blocks)

inline __m512 load_scales16(const void* base, int type, int64_t i, int count) {
  const __mmask16 k = count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
  switch (type) {
    case kF32:
      return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + i);
    case kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + i));
    default: {
      __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// Rows n .. n+R-1 for all M rows of x.
// Groups [g0, g1) of rows n .. n+R-1; the first K block (g0 == 0) stores, later ones add.
template <int M, int R, int BITS>
inline void block(const Problem& p, int n, int g0, int g1, int pf) {
  constexpr int CE = BITS == 4 ? 32 : 16;  // codes per 16-byte chunk
  const int G = p.K / p.group_size;
  const int cpg = p.group_size / CE;
  const int64_t K = p.K;
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint8_t*>(p.w + (n + r) * p.w_stride);
  // The same bytes pf rows ahead (pf = 0: this row again, already cached; no branch in the loop).
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;

  // Bias term: sum_g bias[n, g] * xsum[m, g], with the first K block.
  float bd[R][M] = {};
  for (int r = 0; r < R && g0 == 0; ++r) {
    __m512 a[M];
    for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps();
    for (int gi = 0; gi < G; gi += 16) {
      const int cnt = G - gi < 16 ? G - gi : 16;
      const __mmask16 k = cnt >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << cnt) - 1);
      __m512 b = load_scales16(p.biases, p.scale_type, (n + r) * p.b_stride + gi, cnt);
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(k, p.xsum + m * G + gi), a[m]);
    }
    for (int m = 0; m < M; ++m) bd[r][m] = _mm512_reduce_add_ps(a[m]);
  }

  const __m512 table =
      _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  __m512 tot[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) tot[r][m] = _mm512_setzero_ps();

  alignas(64) float sc[R][kScaleBlock];  // g1 - g0 <= kScaleBlock
  {
    const int gb = g0, gn = g1 - g0;
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < gn; j += 16)
        _mm512_store_ps(sc[r] + j, load_scales16(p.scales, p.scale_type, (n + r) * p.s_stride + gb + j, gn - j));
    for (int g = gb; g < gb + gn; ++g) {
      __m512 acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int c = 0; c < cpg; ++c) {
        const int64_t ci = static_cast<int64_t>(g) * cpg + c;
        const float* xc = p.xp + ci * CE;
        for (int r = 0; r < R; ++r) {
          if ((ci & 3) == 0) prefetch_l2(wr[r] + pf_off + ci * 16);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + ci * 16)));
          if constexpr (BITS == 4) {
            const __m512 lo = _mm512_permutexvar_ps(v, table);
            const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
            for (int m = 0; m < M; ++m) {
              acc[r][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xc + m * K), acc[r][m]);
              acc[r][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xc + m * K + 16), acc[r][m]);
            }
          } else {
            const __m512 f = _mm512_cvtepi32_ps(v);
            for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(f, _mm512_loadu_ps(xc + m * K), acc[r][m]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(sc[r][g - gb]);
        for (int m = 0; m < M; ++m) tot[r][m] = _mm512_fmadd_ps(s, acc[r][m], tot[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float* o = p.out + m * static_cast<int64_t>(p.N) + n + r;
      const float v = _mm512_reduce_add_ps(tot[r][m]) + bd[r][m];
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
    case 2: return rows_mr<2, 4, BITS>(p, n0, n1);
    case 3: return rows_mr<3, 2, BITS>(p, n0, n1);
    case 4: return rows_mr<4, 2, BITS>(p, n0, n1);
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

Kernel kernel_avx512() {
  return {"avx512", 32, rows};
}

}  // namespace qmv
