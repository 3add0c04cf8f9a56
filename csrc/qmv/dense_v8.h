// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// dense_simd.h's vector type on 256-bit vectors, for dense_avx2.cpp (16 registers) and dense_avx512vl.cpp (the same
// code with AVX-512VL's 32 registers: larger register blocks). Included inside each file's target pragma.

#pragma once

#include <immintrin.h>

#include "dense_simd.h"

namespace qmv {
namespace {

template <int kRegisters>
struct V8 {
  using vec = __m256;
  static constexpr int kLanes = 8;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec loadx(const float* p) { return _mm256_loadu_ps(p); }
  template <int T>
  static vec load(const void* w, int64_t i) {
    if constexpr (T == kDenseF32) {
      return _mm256_loadu_ps(static_cast<const float*>(w) + i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
      if constexpr (T == kDenseBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      else return _mm256_cvtph_ps(h);
    }
  }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void prefetch(const char* p) { _mm_prefetch(p, _MM_HINT_T1); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  // R x M accumulators, R weight vectors and one of x in kRegisters registers.
  template <int M>
  static constexpr int rows_per_block() {
    if constexpr (kRegisters >= 32) return M <= 6 ? 4 : 3;
    return M <= 2 ? 4 : M == 3 ? 3 : M <= 6 ? 2 : 1;
  }
};

}  // namespace
}  // namespace qmv
