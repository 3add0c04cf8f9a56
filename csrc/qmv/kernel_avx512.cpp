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

namespace qmv {

Kernel kernel_avx512() {
  return {"avx512", 2 * Avx512::kLanes, rows<Avx512>};
}

}  // namespace qmv
