// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX2 + FMA prefill kernels (prefill.h). Compiled with a target pragma; prefill.cpp calls them only
// when the CPU reports avx2, fma and f16c at run time.
//
// Dequantize: one uint32 word of 4-bit codes -> 8 lanes (broadcast, per-lane shift, mask), 8-bit
// codes -> 8 lanes from 8 bytes (vpmovzxbd); then a multiply and an add (two roundings, as MLX).
//
// Attention: per task (a block of up to 64 query rows of one head) and key block (256 keys):
//   S = Q Kᵀ   Q pre-scaled by scale * log2(e), Kᵀ packed into 16-key panels (D x 16);
//   online softmax in base 2 on S's rows (running max m and sum l per row, the output rescaled by
//              2^(m_old - m_new) when the max grows);
//   O += P V   V read in place (its rows are contiguous along D).
// Both products run one register-blocked micro-kernel: 6 rows x 16 columns of C in 12 accumulators,
// one broadcast of A and two loads of B per step of the inner dimension (the classic BLAS layout for
// 16 ymm registers). Scores live in an L2-sized block (64 x 256 floats); nothing of size Lq x Lk is
// ever written. Causal: key blocks past the task's last query are skipped, and a block that straddles
// the diagonal has its masked scores set to -inf before the softmax.

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

constexpr int kMR = 6;   // micro-kernel rows
constexpr int kNR = 16;  // micro-kernel columns

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

// C[MR x 16] = (ACC ? C : 0) + A[MR x K] B[K x 16]; A rows lda apart, B rows ldb apart (16 contiguous
// floats each), C rows ldc apart.
template <int MR, bool ACC>
inline void micro(const float* a, int64_t lda, const float* b, int64_t ldb, int K, float* c, int64_t ldc) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c0[i] = ACC ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    c1[i] = ACC ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(b + k * ldb + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, c0[i]);
    _mm256_storeu_ps(c + i * ldc + 8, c1[i]);
  }
}

// C[rows x 16] (+)= A[rows x K] B[K x 16], rows in strips of kMR.
template <bool ACC>
void strips(int rows, const float* a, int64_t lda, const float* b, int64_t ldb, int K, float* c, int64_t ldc) {
  int i = 0;
  for (; i + kMR <= rows; i += kMR) micro<kMR, ACC>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc);
  const float* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (rows - i) {
    case 5: return micro<5, ACC>(ai, lda, b, ldb, K, ci, ldc);
    case 4: return micro<4, ACC>(ai, lda, b, ldb, K, ci, ldc);
    case 3: return micro<3, ACC>(ai, lda, b, ldb, K, ci, ldc);
    case 2: return micro<2, ACC>(ai, lda, b, ldb, K, ci, ldc);
    case 1: return micro<1, ACC>(ai, lda, b, ldb, K, ci, ldc);
    default: return;
  }
}

struct Scratch {
  std::vector<float> q, kt, s, o, m, l;
};

void attention_rows(const AttentionProblem& p, int b, int h, int r0, int r1) {
  static thread_local Scratch t;
  const int D = p.D;
  const int rows = r1 - r0;
  const int kvh = h / (p.H / p.Hkv);
  const float* q = p.q + b * p.qs[0] + h * p.qs[1];
  const float* k = p.k + b * p.ks[0] + kvh * p.ks[1];
  const float* v = p.v + b * p.vs[0] + kvh * p.vs[1];
  const int offset = p.Lk - p.Lq;
  const int end = p.causal ? std::min(p.Lk, offset + r1) : p.Lk;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  t.q.resize(static_cast<size_t>(kQueryBlock) * D);
  t.kt.resize(static_cast<size_t>(kKeyBlock) * D);
  t.s.resize(static_cast<size_t>(kQueryBlock) * kKeyBlock);
  t.o.assign(static_cast<size_t>(rows) * D, 0.0f);
  t.m.assign(rows, neg_inf);
  t.l.assign(rows, 0.0f);
  float* qs = t.q.data();
  float* kt = t.kt.data();
  float* s = t.s.data();
  float* o = t.o.data();

  // Q in base-2 logits: softmax(x) = 2^(x log2 e - max) / sum.
  const __m256 qscale = _mm256_set1_ps(p.scale * 1.44269504088896341f);
  for (int i = 0; i < rows; ++i) {
    const float* src = q + (r0 + i) * p.qs[2];
    for (int c = 0; c < D; c += 8)
      _mm256_storeu_ps(qs + i * D + c, _mm256_mul_ps(_mm256_loadu_ps(src + c), qscale));
  }

  for (int k0 = 0; k0 < end; k0 += kKeyBlock) {
    const int nk = std::min(end, k0 + kKeyBlock) - k0;
    const int panels = (nk + kNR - 1) / kNR;
    // Kᵀ in panels of 16 keys: kt[(panel * D + c) * 16 + j] = k[k0 + panel * 16 + j][c], zero past nk.
    for (int pn = 0; pn < panels; ++pn) {
      float* dst = kt + static_cast<int64_t>(pn) * D * kNR;
      for (int j = 0; j < kNR; ++j) {
        const int key = pn * kNR + j;
        if (key < nk) {
          const float* src = k + static_cast<int64_t>(k0 + key) * p.ks[2];
          for (int c = 0; c < D; ++c) dst[c * kNR + j] = src[c];
        } else {
          for (int c = 0; c < D; ++c) dst[c * kNR + j] = 0.0f;
        }
      }
    }
    for (int pn = 0; pn < panels; ++pn)
      strips<false>(rows, qs, D, kt + static_cast<int64_t>(pn) * D * kNR, kNR, D, s + pn * kNR, kKeyBlock);

    for (int i = 0; i < rows; ++i) {
      float* si = s + i * kKeyBlock;
      // Keys [k0, k0 + last) visible to this row.
      const int last = p.causal ? std::min(nk, offset + r0 + i + 1 - k0) : nk;
      if (last <= 0) {
        std::memset(si, 0, sizeof(float) * nk);
        continue;
      }
      const int last8 = (last + 7) / 8 * 8;  // <= kKeyBlock
      for (int j = last; j < last8; ++j) si[j] = neg_inf;
      __m256 mv = _mm256_set1_ps(neg_inf);
      for (int j = 0; j < last8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(si + j));
      const float m_old = t.m[i];
      const float m_new = std::max(m_old, hmax(mv));
      const __m256 mb = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < last8; j += 8) {
        const __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(si + j), mb));
        _mm256_storeu_ps(si + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      for (int j = last8; j < nk; ++j) si[j] = 0.0f;
      const float alpha = m_old == neg_inf ? 0.0f : std::exp2(m_old - m_new);
      t.l[i] = t.l[i] * alpha + hsum(sum);
      t.m[i] = m_new;
      if (alpha != 1.0f) {
        const __m256 a = _mm256_set1_ps(alpha);
        float* oi = o + i * D;
        for (int c = 0; c < D; c += 8) _mm256_storeu_ps(oi + c, _mm256_mul_ps(_mm256_loadu_ps(oi + c), a));
      }
    }

    const float* vb = v + static_cast<int64_t>(k0) * p.vs[2];
    for (int c = 0; c < D; c += kNR) strips<true>(rows, s, kKeyBlock, vb + c, p.vs[2], nk, o + c, D);
  }

  for (int i = 0; i < rows; ++i) {
    float* dst = p.out + ((static_cast<int64_t>(b) * p.H + h) * p.Lq + r0 + i) * D;
    const __m256 inv = _mm256_set1_ps(1.0f / t.l[i]);
    for (int c = 0; c < D; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_loadu_ps(o + i * D + c), inv));
  }
}


// MLX's exp (simd/math.h) for x >= 0 or NaN, the one use here (sigmoid's exp(|x|)). MLX rounds
// floor(double(x) + 0.5); for x >= 0 that is floor(x) + (x - floor(x) >= 0.5), the difference exact in float.
inline __m256 mlx_exp_nonneg(__m256 x_init) {
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
  return r;
}

inline __m256 swiglu8(__m256 g, __m256 u) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 y = _mm256_div_ps(one, _mm256_add_ps(one, mlx_exp_nonneg(_mm256_andnot_ps(sign, g))));
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
  return {"avx2", dequantize_rows, attention_rows, swiglu_range, dots, axpys, softmax, kNR};
}

}  // namespace qmv

#pragma GCC pop_options
