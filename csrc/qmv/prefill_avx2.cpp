// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX2 + FMA prefill kernels (prefill.h). Compiled with a target pragma; prefill.cpp calls them only
// when the CPU reports avx2, fma and f16c at run time.
//
// GELU and LogSumExp: MLX's erf and exp, operation for operation (prefill.h), 8 lanes at a time.
//
// Dequantize: one uint32 word of 4-bit codes -> 8 lanes (broadcast, per-lane shift, mask), 8-bit
// codes -> 8 lanes from 8 bytes (vpmovzxbd); then a multiply and an add (two roundings, as MLX).
//
// Attention: attention_simd.h's kernel on 256-bit vectors (register blocks of 6 rows x 16 floats).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code
#include "prefill.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

namespace qmv {
namespace {

///////////////////////////////////////////////////////////////////////////////
// Dequantize
///////////////////////////////////////////////////////////////////////////////

inline void put8(float* dst, __m256i q, __m256 s, __m256 b) {
  _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s), b));
}

void dequantize_rows(const DequantProblem& p, int n0, int n1) {
  const int G = p.K / p.group_size;
  const int words_per_group = p.group_size * p.bits / 32;
  const __m256i mask = _mm256_set1_epi32((1 << p.bits) - 1);
  const __m256i shifts4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i shifts2lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shifts2hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* w = p.w + n * p.w_stride;
    float* out = p.out + static_cast<int64_t>(n) * p.K;
    for (int g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(load_scale(p.scales, p.scale_type, n * p.s_stride + g));
      const __m256 b = _mm256_set1_ps(load_scale(p.biases, p.scale_type, n * p.b_stride + g));
      const uint32_t* wg = w + static_cast<int64_t>(g) * words_per_group;
      float* og = out + static_cast<int64_t>(g) * p.group_size;
      if (p.bits == 4) {
        for (int i = 0; i < words_per_group; ++i) {
          const __m256i v = _mm256_set1_epi32(static_cast<int>(wg[i]));
          put8(og + 8 * i, _mm256_and_si256(_mm256_srlv_epi32(v, shifts4), mask), s, b);
        }
      } else if (p.bits == 8) {
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(wg);
        for (int i = 0; i < p.group_size; i += 8) {
          const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + i));
          put8(og + i, _mm256_cvtepu8_epi32(raw), s, b);
        }
      } else {  // 2 bits
        for (int i = 0; i < words_per_group; ++i) {
          const __m256i v = _mm256_set1_epi32(static_cast<int>(wg[i]));
          put8(og + 16 * i, _mm256_and_si256(_mm256_srlv_epi32(v, shifts2lo), mask), s, b);
          put8(og + 16 * i + 8, _mm256_and_si256(_mm256_srlv_epi32(v, shifts2hi), mask), s, b);
        }
      }
    }
  }
}

///////////////////////////////////////////////////////////////////////////////
// Attention
///////////////////////////////////////////////////////////////////////////////

// 2^t for t <= 0 (0 below -126, -inf included): t = n + f, n = round(t), 2^f = e^(f ln 2) by the
// Cephes expf polynomial on |f ln 2| <= ln(2)/2 (~1 ulp), then n added to the exponent bits.
inline __m256 exp2_ps(__m256 t) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 under = _mm256_cmp_ps(t, lo, _CMP_LT_OQ);
  t = _mm256_max_ps(t, lo);
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), e));
  return _mm256_andnot_ps(under, y);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

struct Avx2F {
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMR = 6;  // 6 x 2 accumulators, 2 loads of B and a broadcast: 15 of the 16 ymm registers
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F exp2(F t) { return exp2_ps(t); }
  static F below(F v, F idx, float t, float fill) {
    return _mm256_blendv_ps(v, _mm256_set1_ps(fill), _mm256_cmp_ps(idx, _mm256_set1_ps(t), _CMP_LT_OQ));
  }
  static F finite_or_zero(F v) {
    const F inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, inf, _CMP_EQ_OQ));
  }
};

#include "attention_simd.h"

void attention_rows(const AttentionProblem& p, int b, int h, int r0, int r1) {
  attention_rows_t<Avx2F>(p, b, h, r0, r1);
}

// MLX's exp (simd/math.h) for any x: ipart = floor(double(x) + 0.5) is floor(x) + (x - floor(x) >= 0.5), the
// difference exact or rounded to a side that does not change the comparison (x in (-1, 0): 0.5 is a float there).
inline __m256 mlx_exp8(__m256 x_init) {
  const __m256 x = _mm256_mul_ps(x_init, _mm256_set1_ps(1.442695f));
  const __m256 fl = _mm256_floor_ps(x);
  const __m256 up = _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(x, fl), _mm256_set1_ps(0.5f), _CMP_GE_OQ), _mm256_set1_ps(1.0f));
  const __m256 ipart = _mm256_add_ps(fl, up);
  const __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 y = _mm256_set1_ps(1.535336188319500e-4f);
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(1.339887440266574e-3f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(9.618437357674640e-3f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(5.550332471162809e-2f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(2.402264791363012e-1f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(6.931472028550421e-1f));
  y = _mm256_fmadd_ps(y, fpart, _mm256_set1_ps(1.000000000000000f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(e), y);
  r = _mm256_blendv_ps(r, x_init, _mm256_cmp_ps(x_init, x_init, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x_init, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_andnot_ps(_mm256_cmp_ps(x_init, _mm256_set1_ps(-88.0f), _CMP_LT_OQ), r);
}

inline __m256 swiglu8(__m256 g, __m256 u) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 y = _mm256_div_ps(one, _mm256_add_ps(one, mlx_exp8(_mm256_andnot_ps(sign, g))));
  const __m256 sig = _mm256_blendv_ps(_mm256_sub_ps(one, y), y, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}

void swiglu_range(const float* gate, const float* up, float* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(out + i, swiglu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < i1) {
    alignas(32) float g[8] = {}, u[8] = {}, o[8];
    std::copy(gate + i, gate + i1, g);
    std::copy(up + i, up + i1, u);
    _mm256_store_ps(o, swiglu8(_mm256_load_ps(g), _mm256_load_ps(u)));
    std::copy(o, o + (i1 - i), out + i);
  }
}

///////////////////////////////////////////////////////////////////////////////
// GELU and LogSumExp
///////////////////////////////////////////////////////////////////////////////

// nn.gelu with MLX's erf (prefill_scalar.cpp gelu_range, 8 lanes at a time).
inline __m256 gelu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 v = _mm256_div_ps(x, _mm256_set1_ps(static_cast<float>(1.4142135623730951)));
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), _mm256_andnot_ps(sign, v), one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = _mm256_xor_ps(mlx_exp8(_mm256_mul_ps(_mm256_xor_ps(v, sign), v)), sign);
  const __m256 res = _mm256_fmadd_ps(_mm256_mul_ps(e, t), r, one);
  const __m256 erf = _mm256_blendv_ps(_mm256_xor_ps(res, sign), res, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
  return _mm256_div_ps(_mm256_mul_ps(x, _mm256_add_ps(one, erf)), _mm256_set1_ps(2.0f));
}

void gelu_range(const float* x, float* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(out + i, gelu8(_mm256_loadu_ps(x + i)));
  if (i < i1) {
    alignas(32) float v[8] = {}, o[8];
    std::copy(x + i, x + i1, v);
    _mm256_store_ps(o, gelu8(_mm256_load_ps(v)));
    std::copy(o, o + (i1 - i), out + i);
  }
}

template <int Type>
inline __m256 load8f(const void* x, int64_t i) {
  if constexpr (Type == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (Type == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// The last n % 8 values (< 8), padded with -inf (no effect on the maximum; exp gives 0, never summed).
template <int Type>
inline __m256 load_tail(const void* x, int64_t i, int64_t n) {
  alignas(32) float v[8];
  for (int j = 0; j < 8; ++j) v[j] = i + j < n ? load_scale(x, Type, i + j) : -std::numeric_limits<float>::infinity();
  return _mm256_load_ps(v);
}

template <int Type>
float logsumexp_t(const void* x, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = load8f<Type>(x, i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  if (n8 < n) {
    const __m256 v = load_tail<Type>(x, n8, n);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  // MLX's running maximum keeps the first NaN it meets; which NaN does not matter (log(NaN) + NaN is NaN).
  const float maximum = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : hmax(vmax);
  const __m256 m = _mm256_set1_ps(maximum);
  constexpr int kBlock = 1024;  // exponentials 8 lanes at a time into L1, then summed in order
  alignas(32) float e[kBlock];
  float normalizer = 0.0f;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, n - i0));
    int j = 0;
    for (; j + 8 <= nb; j += 8) _mm256_store_ps(e + j, mlx_exp8(_mm256_sub_ps(load8f<Type>(x, i0 + j), m)));
    if (j < nb) _mm256_store_ps(e + j, mlx_exp8(_mm256_sub_ps(load_tail<Type>(x, i0 + j, n), m)));
    for (int k = 0; k < nb; ++k) normalizer = normalizer + e[k];
  }
  return std::isinf(maximum) ? maximum : std::log(normalizer) + maximum;
}

float logsumexp(const void* x, int type, int64_t n) {
  if (type == kF16) return logsumexp_t<kF16>(x, n);
  if (type == kBF16) return logsumexp_t<kBF16>(x, n);
  return logsumexp_t<kF32>(x, n);
}

// D a multiple of 8 (the caller checks 16).
void dots(const float* q, int rows, int D, const float* keys, int nk, float* s, int64_t s_stride) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* q0 = q + r * D;
    for (int k = 0; k < nk; ++k) {
      const float* kk = keys + static_cast<int64_t>(k) * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 8) {
        const __m256 kv = _mm256_loadu_ps(kk + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + d), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + d), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + d), kv, a3);
      }
      s[r * s_stride + k] = hsum(a0);
      s[(r + 1) * s_stride + k] = hsum(a1);
      s[(r + 2) * s_stride + k] = hsum(a2);
      s[(r + 3) * s_stride + k] = hsum(a3);
    }
  }
  for (; r < rows; ++r)
    for (int k = 0; k < nk; ++k) {
      const float* kk = keys + static_cast<int64_t>(k) * D;
      __m256 a = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), _mm256_loadu_ps(kk + d), a);
      s[r * s_stride + k] = hsum(a);
    }
}

void axpys(const float* p, int rows, int64_t p_stride, const float* v, int nk, int D, float* o) {
  for (int r = 0; r < rows; ++r) {
    float* orow = o + r * D;
    for (int d0 = 0; d0 < D; d0 += 32) {  // 4 accumulators in registers over all the keys
      const int n = std::min(32, D - d0);
      __m256 acc[4];
      for (int j = 0; j < n / 8; ++j) acc[j] = _mm256_loadu_ps(orow + d0 + 8 * j);
      for (int k = 0; k < nk; ++k) {
        const __m256 pk = _mm256_set1_ps(p[r * p_stride + k]);
        const float* vk = v + static_cast<int64_t>(k) * D + d0;
        for (int j = 0; j < n / 8; ++j) acc[j] = _mm256_fmadd_ps(pk, _mm256_loadu_ps(vk + 8 * j), acc[j]);
      }
      for (int j = 0; j < n / 8; ++j) _mm256_storeu_ps(orow + d0 + 8 * j, acc[j]);
    }
  }
}

// e^(x - max) as 2^((x - max) log2 e) by exp2_ps (~1 ulp), 8 lanes at a time.
void softmax(float* s, int rows, int n, int64_t stride) {
  const __m256 log2e = _mm256_set1_ps(1.4426950408889634f);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * stride;
    const int n8 = n / 8 * 8;
    __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int k = 0; k < n8; k += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sr + k));
    float m = hmax(mv);
    for (int k = n8; k < n; ++k) m = std::max(m, sr[k]);
    const __m256 mb = _mm256_set1_ps(m * 1.4426950408889634f);
    __m256 sum = _mm256_setzero_ps();
    for (int k = 0; k < n8; k += 8) {
      const __m256 e = exp2_ps(_mm256_fmsub_ps(_mm256_loadu_ps(sr + k), log2e, mb));
      _mm256_storeu_ps(sr + k, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (int k = n8; k < n; ++k) total += (sr[k] = std::exp2(sr[k] * 1.4426950408889634f - m * 1.4426950408889634f));
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int k = 0; k < n8; k += 8) _mm256_storeu_ps(sr + k, _mm256_mul_ps(_mm256_loadu_ps(sr + k), inv));
    for (int k = n8; k < n; ++k) sr[k] *= 1.0f / total;
  }
}

}  // namespace

PrefillKernels prefill_avx2() {
  return {"avx2", dequantize_rows, attention_rows, swiglu_range, gelu_range, dots, axpys, softmax, logsumexp, 16};
}

}  // namespace qmv

#pragma GCC pop_options
