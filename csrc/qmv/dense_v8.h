// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// dense_simd.h's vector type on 256-bit vectors, for dense_avx2.cpp (16 registers) and dense_avx512vl.cpp (the same
// code with AVX-512VL's 32 registers: larger register blocks). Included inside each file's target pragma.

#pragma once

#include <immintrin.h>

#include "dense_simd.h"
#include "scales_simd.h"  // load8

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
    return load8(w, T, i);
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
