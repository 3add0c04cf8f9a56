// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX-512 prefill kernels (prefill.h): attention_simd.h's fused attention on 512-bit vectors (register blocks of
// 8 rows x 32 floats: 16 accumulators, 2 loads of B and a broadcast; 12 rows measured no faster); the other
// prefill kernels are the AVX2 ones. Compiled with a target pragma; prefill.cpp calls it only when the CPU
// reports avx512f/bw/vl, fma and f16c at run time (the decode kernel in use is an AVX-512 one).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code
#include "prefill.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

#include <immintrin.h>

namespace qmv {
namespace {

// 2^t for t <= 0 (0 below -126, -inf included): prefill_avx2.cpp's exp2_ps on 16 lanes (the same
// polynomial, the same rounding of t, so the same values).
inline __m512 exp2_512(__m512 t) {
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __mmask16 under = _mm512_cmp_ps_mask(t, lo, _CMP_LT_OQ);
  t = _mm512_max_ps(t, lo);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), e));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);
}

struct Avx512F {
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMR = 8;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F exp2(F t) { return exp2_512(t); }
  static F below(F v, F idx, float t, float fill) {
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(idx, _mm512_set1_ps(t), _CMP_LT_OQ), _mm512_set1_ps(fill));
  }
  static F finite_or_zero(F v) {
    const F inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, inf, _CMP_EQ_OQ), _mm512_setzero_ps());
  }
};

#include "attention_simd.h"

void attention_rows(const AttentionProblem& p, int b, int h, int r0, int r1) {
  attention_rows_t<Avx512F>(p, b, h, r0, r1);
}

}  // namespace

PrefillKernels prefill_avx512() {
  PrefillKernels k = prefill_avx2();
  k.name = "avx512";
  k.attention = attention_rows;
  return k;
}

}  // namespace qmv

#pragma GCC pop_options
