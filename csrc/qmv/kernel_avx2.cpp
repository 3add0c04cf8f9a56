// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX2 + FMA kernel (8 float lanes), for x86-64 CPUs without AVX-512. Compiled with a target
// pragma; qmv.cpp calls it only when the CPU reports avx2, fma and f16c at run time. The row loop is
// kernel_simd.h's; this file supplies its vector operations.
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

struct Avx2 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int rows_per_block(int M) { return M == 1 ? 4 : (M == 2 ? 2 : 1); }

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float s) { return _mm256_set1_ps(s); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static I codes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  I low4 = _mm256_set1_epi32(0xf);
  F low(I q) const { return _mm256_cvtepi32_ps(_mm256_and_si256(q, low4)); }
  F high(I q) const { return _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)); }
  static F to_float(I q) { return _mm256_cvtepi32_ps(q); }

  static void scales(const Problem& p, int n, int g0, int count, float* sc) {
    for (int j = 0; j < count; ++j) sc[j] = load_scale(p.scales, p.scale_type, n * p.s_stride + g0 + j);
  }
  template <int M>
  static void biases(const Problem& p, int n, int G, float* bd) {
    for (int g = 0; g < G; ++g) {
      const float b = load_scale(p.biases, p.scale_type, n * p.b_stride + g);
      for (int m = 0; m < M; ++m) bd[m] += b * p.xsum[m * G + g];
    }
  }
};

}  // namespace
}  // namespace qmv

#include "kernel_simd.h"

#pragma GCC pop_options

namespace qmv {

Kernel kernel_avx2() {
  return {"avx2", 2 * Avx2::kLanes, rows<Avx2>};
}

}  // namespace qmv
