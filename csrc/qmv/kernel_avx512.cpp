// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX-512 kernel (16 float lanes). Compiled with a target pragma, not with -m flags or -march=native:
// qmv.cpp calls it only when the CPU reports avx512f/bw/vl, fma and f16c at run time. The row loop is
// kernel_simd.h's; this file supplies its vector operations.
//
// 4-bit: 16 packed bytes (32 codes) -> 16 int32 lanes holding one byte each. vpermps with a table
// {0.f, 1.f, ..., 15.f} looks at the low 4 bits of each lane only, so it turns the low nibbles into
// floats without masking; a 4-bit shift gives the high nibbles. The low nibbles are the even-indexed
// codes, so x is prepared with each 32-element chunk split into its even then its odd elements.
// 8-bit: 16 bytes -> 16 int32 -> 16 floats, x in natural order.
// Scales and biases are loaded 16 groups at a time (masked), and the bias term is a vector dot product.

#include <cstdint>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include <immintrin.h>

namespace qmv {
namespace {

inline __mmask16 first_lanes(int count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

inline __m512 load_scales16(const void* base, int type, int64_t i, int count) {
  const __mmask16 k = first_lanes(count);
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

struct Avx512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int rows_per_block(int M) { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float s) { return _mm512_set1_ps(s); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce(F v) { return _mm512_reduce_add_ps(v); }

  static I codes(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  F table = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  F low(I q) const { return _mm512_permutexvar_ps(q, table); }
  F high(I q) const { return _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table); }
  static F to_float(I q) { return _mm512_cvtepi32_ps(q); }

  static void scales(const Problem& p, int n, int g0, int count, float* sc) {
    for (int j = 0; j < count; j += 16)
      _mm512_store_ps(sc + j, load_scales16(p.scales, p.scale_type, n * p.s_stride + g0 + j, count - j));
  }
  template <int M>
  static void biases(const Problem& p, int n, int G, float* bd) {
    __m512 a[M];
    for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps();
    for (int gi = 0; gi < G; gi += 16) {
      const int cnt = G - gi < 16 ? G - gi : 16;
      const __mmask16 k = first_lanes(cnt);
      __m512 b = load_scales16(p.biases, p.scale_type, n * p.b_stride + gi, cnt);
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(k, p.xsum + m * G + gi), a[m]);
    }
    for (int m = 0; m < M; ++m) bd[m] = _mm512_reduce_add_ps(a[m]);
  }
};

}  // namespace
}  // namespace qmv

#include "kernel_simd.h"

#pragma GCC pop_options

// The int16 form ("avx512-int16"; Kernel::int16, Problem::xq): for 4-bit weights with groups of 64 or a
// multiple of 128 and K a multiple of 128, x is rounded to int16 with one step per group, as in the
// avx2-int16 kernel (kernel_avx2.cpp), and multiplied with AVX512-VNNI's vpdpwssd: 32 pairs of int16
// products summed into 16 int32 lanes and accumulated in one instruction. 64 weight bytes (128 codes) hold
// 4 codes per 16-bit lane; four shift-and-masks give 4 vectors of 32 codes, shared by all rows of x, and
// each row of x then costs 4 vpdpwssd per 64 weight bytes (the float loop: 8 conversions or permutes and 8
// FMAs per row). A group's products are summed exactly in int32 and applied with one FMA by
// scale * step; with groups of 64, one vector holds two groups (int32 lanes 0-7 the first, 8-15 the
// second), and the scale vector holds each group's product in its half. Every (row, row of x) pair goes
// through the same operations in the same order whatever the rows of x or the K blocking, so a row of a
// batch gets the result it gets alone, bit for bit, as in the float loop (kernel_simd.h).

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

#include <immintrin.h>

namespace qmv {
namespace {

constexpr int kChunk16 = 128;               // elements of x per 64 weight bytes
constexpr __mmask16 kHigh8 = 0xff00;        // int32 lanes of the second group of 64

// bd[m] = sum_g bias[n, g] * xsum[m, g] - 7.5 * sum_g scale[n, g] * xerr[m, g]: the bias term with the
// centring of the codes on 7.5 (kernels.h, Problem::xq).
template <int M>
inline void bias_centre16(const Problem& p, int n, float* bd) {
  const int G = p.K / p.group_size;
  __m512 a[M], e[M];
  for (int m = 0; m < M; ++m) a[m] = e[m] = _mm512_setzero_ps();
  for (int g = 0; g < G; g += 16) {
    const int cnt = G - g < 16 ? G - g : 16;
    const __mmask16 k = first_lanes(cnt);
    const __m512 b = load_scales16(p.biases, p.scale_type, n * p.b_stride + g, cnt);
    const __m512 s = load_scales16(p.scales, p.scale_type, n * p.s_stride + g, cnt);
    for (int m = 0; m < M; ++m) {
      a[m] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(k, p.xsum + m * G + g), a[m]);
      e[m] = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(k, p.xerr + m * G + g), e[m]);
    }
  }
  for (int m = 0; m < M; ++m) bd[m] = _mm512_reduce_add_ps(a[m]) - 7.5f * _mm512_reduce_add_ps(e[m]);
}

// Units [u0, u1) of row n for all M rows of x, added to the running totals tot (M vectors of 16
// floats). A unit is the span one scale vector covers: 128 elements (two groups of 64, or one of 128)
// or, for larger groups, one group of GS / 128 chunks. pf: rows ahead to prefetch (0: this row again).
template <int M, int GS>  // GS: 64, 128, or 0 (another multiple of 128)
inline void block16(const Problem& p, int n, int u0, int u1, int pf, float* tot) {
  constexpr int kGroupsPerUnit = GS == 64 ? 2 : 1;
  const int G = p.K / p.group_size;
  const int cpu = GS == 0 ? p.group_size / kChunk16 : 1;  // chunks per unit
  const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w + static_cast<int64_t>(n) * p.w_stride);
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;
  alignas(64) float sc[kScaleBlock];
  Avx512::scales(p, n, u0 * kGroupsPerUnit, (u1 - u0) * kGroupsPerUnit, sc);
  const __m512i low4 = _mm512_set1_epi16(0xf);

  __m512 t[M];
  for (int m = 0; m < M; ++m) t[m] = _mm512_load_ps(tot + m * 16);
  for (int u = u0; u < u1; ++u) {
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int c = u * cpu; c < (u + 1) * cpu; ++c) {
      prefetch_l2(w + pf_off + c * 64);
      const __m512i v = _mm512_loadu_si512(w + c * 64);
      const __m512i q0 = _mm512_and_si512(v, low4);
      const __m512i q1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m512i q2 = _mm512_and_si512(_mm512_srli_epi16(v, 8), low4);
      const __m512i q3 = _mm512_srli_epi16(v, 12);
      const __m512i* xc = reinterpret_cast<const __m512i*>(p.xq + static_cast<int64_t>(c) * M * kChunk16);
      for (int m = 0; m < M; ++m) {
        __m512i d = _mm512_dpwssd_epi32(acc[m], q0, _mm512_load_si512(xc + 4 * m));
        d = _mm512_dpwssd_epi32(d, q1, _mm512_load_si512(xc + 4 * m + 1));
        d = _mm512_dpwssd_epi32(d, q2, _mm512_load_si512(xc + 4 * m + 2));
        acc[m] = _mm512_dpwssd_epi32(d, q3, _mm512_load_si512(xc + 4 * m + 3));
      }
    }
    const int j = (u - u0) * kGroupsPerUnit;  // the unit's first group in sc
    if constexpr (GS == 64) {
      const __m512 ws = _mm512_mask_blend_ps(kHigh8, _mm512_set1_ps(sc[j]), _mm512_set1_ps(sc[j + 1]));
      for (int m = 0; m < M; ++m) {
        const float* xs = p.xscale + m * G + 2 * u;
        const __m512 s = _mm512_mul_ps(ws, _mm512_mask_blend_ps(kHigh8, _mm512_set1_ps(xs[0]), _mm512_set1_ps(xs[1])));
        t[m] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(acc[m]), t[m]);
      }
    } else {
      const __m512 ws = _mm512_set1_ps(sc[j]);
      for (int m = 0; m < M; ++m) {
        const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(p.xscale[m * G + u]));
        t[m] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(acc[m]), t[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) _mm512_store_ps(tot + m * 16, t[m]);
}

// out[m, n + r] for r < count from the running totals (count rows of M vectors) and the bias term.
template <int M>
inline void finish16(const Problem& p, int n, int count, const float* tot) {
  for (int r = 0; r < count; ++r) {
    float bd[M];
    bias_centre16<M>(p, n + r, bd);
    for (int m = 0; m < M; ++m)
      p.out[m * static_cast<int64_t>(p.N) + n + r] = _mm512_reduce_add_ps(_mm512_load_ps(tot + (r * M + m) * 16)) + bd[m];
  }
}

// Rows [n0, n1), one at a time (one stream of weights per core prefetches best): with one K block, from
// start to end; with several (x too long for L1 with several rows of x), blocks of kRowBlock rows swept
// once per K block.
template <int M, int GS>
void rows16_mr(const Problem& p, int n0, int n1) {
  const int unit = GS == 0 ? p.group_size : kChunk16;  // elements per unit
  const int U = p.K / unit;
  constexpr int kGroupsPerUnit = GS == 64 ? 2 : 1;
  int ku = (M == 1 ? kXBytesOneRow : kXBytes) / (M * unit * 2);
  ku = ku < 1 ? 1 : (ku > kScaleBlock / kGroupsPerUnit ? kScaleBlock / kGroupsPerUnit : ku);
  const int64_t row_bytes = static_cast<int64_t>(ku >= U ? U : ku) * unit / 2;
  if (ku >= U) {
    prefetch_start(p, n0, n1, row_bytes);
    alignas(64) float tot[M * 16];
    for (int n = n0; n < n1; ++n) {
      for (float& v : tot) v = 0.0f;
      block16<M, GS>(p, n, 0, U, prefetch_rows<1>(n, n1, row_bytes), tot);
      finish16<M>(p, n, 1, tot);
    }
    return;
  }
  // The row block's totals (128 KiB with 8 rows of x): per thread, not on the stack.
  alignas(64) static thread_local float tot[kRowBlock * kMaxRows * 16];
  for (int nb = n0; nb < n1; nb += kRowBlock) {
    const int nb1 = nb + kRowBlock < n1 ? nb + kRowBlock : n1;
    for (int i = 0; i < (nb1 - nb) * M * 16; ++i) tot[i] = 0.0f;
    for (int u0 = 0; u0 < U; u0 += ku) {
      const int u1 = u0 + ku < U ? u0 + ku : U;
      for (int n = nb; n < nb1; ++n)
        block16<M, GS>(p, n, u0, u1, prefetch_rows<1>(n, nb1, row_bytes), tot + (n - nb) * M * 16);
    }
    finish16<M>(p, nb, nb1 - nb, tot);
  }
}

void rows_int16(const Problem& p, int n0, int n1) {
  if (p.xq == nullptr) return rows<Avx512>(p, n0, n1);  // 8-bit, groups of 32, K not a multiple of 128
  dispatch(p, [&](auto m, auto) {
    constexpr int M = decltype(m)::value;
    if (p.group_size == 64) {
      rows16_mr<M, 64>(p, n0, n1);
    } else if (p.group_size == 128) {
      rows16_mr<M, 128>(p, n0, n1);
    } else {
      rows16_mr<M, 0>(p, n0, n1);
    }
  });
}

}  // namespace
}  // namespace qmv

#pragma GCC pop_options

namespace qmv {

Kernel kernel_avx512() {
  return {"avx512", 2 * Avx512::kLanes, rows<Avx512>};
}

Kernel kernel_avx512_int16() {
  Kernel k{"avx512-int16", 2 * Avx512::kLanes, rows_int16};
  k.int16 = true;
  k.int16_chunk = kChunk16;
  return k;
}

}  // namespace qmv
