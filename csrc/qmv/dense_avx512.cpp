// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// dense_simd.h on 512-bit vectors (AVX-512F/BW, FMA, F16C). dense.cpp calls it only when the CPU reports them and
// the decode kernel in use is a 512-bit one (CPUs that split 512-bit operations into halves run the AVX2 file).

#include "dense.h"  // before the target pragma

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include <immintrin.h>

#include "dense_simd.h"

namespace qmv {
namespace {

struct V16 {
  using vec = __m512;
  static constexpr int kLanes = 16;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec loadx(const float* p) { return _mm512_loadu_ps(p); }
  template <int T>
  static vec load(const void* w, int64_t i) {
    if constexpr (T == kF32) {
      return _mm512_loadu_ps(static_cast<const float*>(w) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
      if constexpr (T == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      else return _mm512_cvtph_ps(h);
    }
  }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static float hsum(vec v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void prefetch(const char* p) { _mm_prefetch(p, _MM_HINT_T1); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  // 32 registers: R x M accumulators, R weight vectors and one of x.
  template <int M>
  static constexpr int rows_per_block() {
    return M <= 6 ? 4 : 2;
  }
};

}  // namespace

DenseKernels dense_avx512() {
  return {"avx512", &dense_simd::rows<V16>, &dense_simd::widen<V16>, kMaxRows};
}

}  // namespace qmv

#pragma GCC pop_options
