// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// AVX2 + FMA kernel (8 float lanes), for x86-64 CPUs without AVX-512 (AMD Zen 2/3, most desktop
// Intel). Compiled with a target pragma; qmv.cpp calls it only when the CPU reports avx2, fma and f16c
// at run time. Its own loop (not kernel_simd.h's), tuned on a 2-core Zen 3 EPYC, where decode is held
// to the vector ALUs about as much as to memory: every micro-op per weight byte counts. Two kernels share
// this file: "avx2" (exact float arithmetic, described here) and "avx2-int16", which for 4-bit weights with
// groups of 64 or 128 rounds x to int16 (block16 below; the one that reaches the bandwidth bound on Zen 3)
// and otherwise runs the float loop.
//
// 4-bit: 8 packed bytes (16 codes) -> 8 int32 lanes b, one byte each (vpmovzxbd from memory). With the
// low nibble lo (the even-indexed code) and the high nibble hi (the odd one), b = lo + 16 hi, so
//   x_even * lo + x_odd * hi = (x_even - x_odd / 16) * lo + (x_odd / 16) * b,
// and x is prepared in that form (Kernel::fold): each 16-element chunk becomes 8 values
// x_even - x_odd / 16, then 8 values x_odd / 16. A chunk then costs one mask, two conversions and two
// FMAs per row of x (no shift). 8-bit: 8 bytes -> 8 floats, x in natural order. Several rows of x are
// stored chunk-major (Kernel::interleave), so one pointer with constant offsets walks them all.
//
// Per group of every output row and row of x, the dot products accumulate in one vector; the group's
// scale is applied with one FMA into a running total per (row, row of x); the biases cost one vector
// dot product with the group sums of x. Each (row, row of x) pair goes through exactly the same
// operations in the same order whatever the number of rows of x, the rows computed together or the
// K blocking (the running totals are kept across K blocks): a row of a batch gets bit for bit the
// result it gets alone, so batched greedy decoding picks the same tokens as one-by-one decoding.

#include <cstdint>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code

#pragma GCC push_options
#if defined(QMV_EVEX_VNNI)  // kernel_avx512vl_vnni.cpp: the same vpdpwssd on 256 bits from AVX512-VNNI + VL
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
#elif defined(QMV_AVX_VNNI)  // kernel_avx2_vnni.cpp: this file again, with AVX-VNNI's vpdpwssd in the int16 dot products
#pragma GCC target("avx2,fma,f16c,avxvnni")
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include <immintrin.h>

#include "scales_simd.h"  // load8

namespace qmv {
namespace {

constexpr int kScaleBlock = 256;       // most groups in one K block (scales on the stack)
constexpr int kXBytes = 24 * 1024;     // x bytes per K block with several rows of x: half the L1d
constexpr int kXBytesOneRow = 256 * 1024;  // one row of x streams well from L2
constexpr int kRowBlock = 128;         // rows swept per K block (when x needs several K blocks)
constexpr int kLanes = 8;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sc[j] = scale[n, g0 + j] for j < count.
inline void load_scales(const Problem& p, int n, int g0, int count, float* sc) {
  const int64_t base = static_cast<int64_t>(n) * p.s_stride + g0;
  int j = 0;
  for (; j + kLanes <= count; j += kLanes) _mm256_store_ps(sc + j, load8(p.scales, p.scale_type, base + j));
  for (; j < count; ++j) sc[j] = load_scale(p.scales, p.scale_type, base + j);
}

// bd[m] = sum_g bias[n, g] * xsum[m, g] for m < M.
template <int M>
inline void bias_dot(const Problem& p, int n, float* bd) {
  const int G = p.K / p.group_size;
  const int64_t base = static_cast<int64_t>(n) * p.b_stride;
  __m256 a[M];
  for (int m = 0; m < M; ++m) a[m] = _mm256_setzero_ps();
  int g = 0;
  for (; g + kLanes <= G; g += kLanes) {
    const __m256 b = load8(p.biases, p.scale_type, base + g);
    for (int m = 0; m < M; ++m) a[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(p.xsum + m * G + g), a[m]);
  }
  for (int m = 0; m < M; ++m) bd[m] = hsum(a[m]);
  for (; g < G; ++g) {
    const float b = load_scale(p.biases, p.scale_type, base + g);
    for (int m = 0; m < M; ++m) bd[m] += b * p.xsum[m * G + g];
  }
}

// Groups [g0, g1) of rows n .. n+R-1 for all M rows of x, added to the running totals tot (R rows of
// M vectors of 8 floats). pf: rows ahead to prefetch (0: none).
template <int M, int R, int BITS>
inline void block(const Problem& p, int n, int g0, int g1, int pf, float* tot) {
  constexpr int CE = BITS == 4 ? 2 * kLanes : kLanes;  // x elements per chunk of 8 weight bytes
  constexpr bool kInRegisters = M * R <= 6;            // else the totals stay in memory (L1)
  const int cpg = p.group_size / CE;
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint8_t*>(p.w + (n + r) * p.w_stride);
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;
  alignas(32) float sc[R][kScaleBlock];
  for (int r = 0; r < R; ++r) load_scales(p, n + r, g0, g1 - g0, sc[r]);
  const __m256i low4 = _mm256_set1_epi32(0xf);

  __m256 t[R][M];
  if constexpr (kInRegisters)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) t[r][m] = _mm256_load_ps(tot + (r * M + m) * kLanes);

  for (int g = g0; g < g1; ++g) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int c = 0; c < cpg; ++c) {
      const int64_t ci = static_cast<int64_t>(g) * cpg + c;
      const float* xc = p.xp + ci * M * CE;  // interleaved: row m at xc + m * CE
      for (int r = 0; r < R; ++r) {
        if (pf && (ci & 7) == 0) prefetch_l2(wr[r] + pf_off + ci * 8);  // once per 64-byte line
        const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[r] + ci * 8)));
        if constexpr (BITS == 4) {
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, low4));
          const __m256 b = _mm256_cvtepi32_ps(q);
          for (int m = 0; m < M; ++m) {
            acc[r][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xc + m * CE), acc[r][m]);
            acc[r][m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xc + m * CE + kLanes), acc[r][m]);
          }
        } else {
          const __m256 f = _mm256_cvtepi32_ps(q);
          for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xc + m * CE), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sc[r][g - g0]);
      for (int m = 0; m < M; ++m) {
        if constexpr (kInRegisters) {
          t[r][m] = _mm256_fmadd_ps(s, acc[r][m], t[r][m]);
        } else {
          float* tp = tot + (r * M + m) * kLanes;
          _mm256_store_ps(tp, _mm256_fmadd_ps(s, acc[r][m], _mm256_load_ps(tp)));
        }
      }
    }
  }
  if constexpr (kInRegisters)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) _mm256_store_ps(tot + (r * M + m) * kLanes, t[r][m]);
}

// bd[m] = sum_g bias[n, g] * xsum[m, g] - 7.5 * sum_g scale[n, g] * xerr[m, g] for m < M: the bias term
// of the int16 form, with its centring (Problem::xerr).
template <int M>
inline void bias_centre(const Problem& p, int n, float* bd) {
  const int G = p.K / p.group_size;
  const int64_t bbase = static_cast<int64_t>(n) * p.b_stride, sbase = static_cast<int64_t>(n) * p.s_stride;
  __m256 a[M], e[M];
  for (int m = 0; m < M; ++m) a[m] = e[m] = _mm256_setzero_ps();
  int g = 0;
  for (; g + kLanes <= G; g += kLanes) {
    const __m256 b = load8(p.biases, p.scale_type, bbase + g);
    const __m256 s = load8(p.scales, p.scale_type, sbase + g);
    for (int m = 0; m < M; ++m) {
      a[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(p.xsum + m * G + g), a[m]);
      e[m] = _mm256_fmadd_ps(s, _mm256_loadu_ps(p.xerr + m * G + g), e[m]);
    }
  }
  float bs[M], es[M];
  for (int m = 0; m < M; ++m) bs[m] = hsum(a[m]), es[m] = hsum(e[m]);
  for (; g < G; ++g) {
    const float b = load_scale(p.biases, p.scale_type, bbase + g);
    const float s = load_scale(p.scales, p.scale_type, sbase + g);
    for (int m = 0; m < M; ++m) bs[m] += b * p.xsum[m * G + g], es[m] += s * p.xerr[m * G + g];
  }
  for (int m = 0; m < M; ++m) bd[m] = bs[m] - 7.5f * es[m];
}

// out[m, n + r] for r < count from the running totals and the bias term.
template <int M>
inline void finish(const Problem& p, int n, int count, const float* tot) {
  for (int r = 0; r < count; ++r) {
    float bd[M];
    if ((p.xq != nullptr || p.xq8 != nullptr) && p.bits == 4) {
      bias_centre<M>(p, n + r, bd);
    } else {
      bias_dot<M>(p, n + r, bd);
    }
    for (int m = 0; m < M; ++m)
      p.out[m * static_cast<int64_t>(p.N) + n + r] = hsum(_mm256_load_ps(tot + (r * M + m) * kLanes)) + bd[m];
  }
}

// The int16 form (Kernel::int16, 4-bit, group_size a multiple of 64): x rounded to int16 with one step
// per group (Problem::xq, xscale). 32 weight bytes (64 codes) hold 4 codes per 16-bit lane; four
// shift-and-masks give 4 vectors of 16 codes, each multiplied with its 16 int16 x values by vpmaddwd
// (pairs of products summed into 8 int32 lanes). A group's products are summed exactly in int32
// (|code * x| <= 15 * 32767: no overflow below groups of 2^14), converted once, and added to the
// running total with one FMA by scale * step. Per 64 weights that is 7 integer ops shared by every row
// of x and 4 vpmaddwd + 4 adds per row of x, against 16 conversions and 8 FMAs per row in float: on a
// Zen 3 core 1.6x the weights per second for one row of x and 2x for 2 to 8 rows. As in float, each
// (row, row of x) pair goes through the same operations in the same order however many rows of x
// come together, so a row of a batch gets the result it gets alone, bit for bit.
// One row of w's 32 bytes as four vectors of 16 codes: lane l of qj holds code 4 l + j.
struct Codes16 {
  __m256i q0, q1, q2, q3;
};

__attribute__((always_inline)) inline Codes16 unpack16(const uint8_t* w, __m256i low4) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return {_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
          _mm256_and_si256(_mm256_srli_epi16(v, 8), low4), _mm256_srli_epi16(v, 12)};
}

// acc plus the 64 products of those codes with one row of x's 64 int16 values (xq's layout), summed into 8
// int32 lanes. With AVX-VNNI one vpdpwssd does a vpmaddwd and its add; the int32 sums are exact either way
// (no overflow below groups of 2^14), so both give the same bits.
__attribute__((always_inline)) inline __m256i dot16(__m256i acc, const Codes16& q, const __m256i* x) {
#if defined(QMV_EVEX_VNNI)
  acc = _mm256_dpwssd_epi32(acc, q.q0, _mm256_load_si256(x));
  acc = _mm256_dpwssd_epi32(acc, q.q1, _mm256_load_si256(x + 1));
  acc = _mm256_dpwssd_epi32(acc, q.q2, _mm256_load_si256(x + 2));
  return _mm256_dpwssd_epi32(acc, q.q3, _mm256_load_si256(x + 3));
#elif defined(QMV_AVX_VNNI)
  acc = _mm256_dpwssd_avx_epi32(acc, q.q0, _mm256_load_si256(x));
  acc = _mm256_dpwssd_avx_epi32(acc, q.q1, _mm256_load_si256(x + 1));
  acc = _mm256_dpwssd_avx_epi32(acc, q.q2, _mm256_load_si256(x + 2));
  return _mm256_dpwssd_avx_epi32(acc, q.q3, _mm256_load_si256(x + 3));
#else
  const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(q.q0, _mm256_load_si256(x)),
                                     _mm256_madd_epi16(q.q2, _mm256_load_si256(x + 2)));
  const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(q.q1, _mm256_load_si256(x + 1)),
                                     _mm256_madd_epi16(q.q3, _mm256_load_si256(x + 3)));
  return _mm256_add_epi32(acc, _mm256_add_epi32(a, b));
#endif
}

template <int M, int R, int CPG>
inline void block16(const Problem& p, int n, int g0, int g1, int pf, float* tot) {
  constexpr bool kInRegisters = M * R <= 8;  // (8: the compiler spills less than a store per group)
  const int G = p.K / p.group_size;
  const int cpg = CPG > 0 ? CPG : p.group_size / 64;  // chunks of 64 per group (a constant for 64, 128)
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint8_t*>(p.w + (n + r) * p.w_stride);
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;
  alignas(32) float sc[R][kScaleBlock];
  for (int r = 0; r < R; ++r) load_scales(p, n + r, g0, g1 - g0, sc[r]);
  const __m256i low4 = _mm256_set1_epi16(0xf);

  __m256 t[R][M];
  if constexpr (kInRegisters)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) t[r][m] = _mm256_load_ps(tot + (r * M + m) * kLanes);

  // Adds a group's int32 sums d, of row r and row m of x, to the running total.
  auto add_group = [&](int r, int m, int g, __m256i d) __attribute__((always_inline)) {
    const __m256 s = _mm256_set1_ps(sc[r][g - g0] * p.xscale[m * G + g]);
    if constexpr (kInRegisters) {
      t[r][m] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d), t[r][m]);
    } else {
      float* tp = tot + (r * M + m) * kLanes;
      _mm256_store_ps(tp, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d), _mm256_load_ps(tp)));
    }
  };

  for (int g = g0; g < g1; ++g) {
    if constexpr (CPG == 1) {  // one chunk per group: each row of x's sums go to its total at once
      const __m256i* xc = reinterpret_cast<const __m256i*>(p.xq + static_cast<int64_t>(g) * M * 64);
      for (int r = 0; r < R; ++r) {
        prefetch_l2(wr[r] + pf_off + g * 32);  // pf = 0: this row again (cached), no branch
        const Codes16 q = unpack16(wr[r] + g * 32, low4);
        for (int m = 0; m < M; ++m) add_group(r, m, g, dot16(_mm256_setzero_si256(), q, xc + 4 * m));
      }
      continue;
    }
    __m256i acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_si256();
    for (int c = 0; c < cpg; ++c) {
      const int64_t ci = static_cast<int64_t>(g) * cpg + c;
      const __m256i* xc = reinterpret_cast<const __m256i*>(p.xq + ci * M * 64);  // row m at xc + 4 m
      for (int r = 0; r < R; ++r) {
        prefetch_l2(wr[r] + pf_off + ci * 32);
        const Codes16 q = unpack16(wr[r] + ci * 32, low4);
        for (int m = 0; m < M; ++m) acc[r][m] = dot16(acc[r][m], q, xc + 4 * m);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) add_group(r, m, g, acc[r][m]);
  }
  if constexpr (kInRegisters)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) _mm256_store_ps(tot + (r * M + m) * kLanes, t[r][m]);
}

// acc plus the 64 products of those codes (lo: the even ones, hi: the odd ones, one per byte) with one row of x's
// 64 int8 values (xq8's layout), summed 4 a lane into 8 int32 lanes. With AVX512-VNNI two vpdpbusd; without, two
// vpmaddubsw (byte pairs into int16: at most 2 * 15 * 127, no saturation), an int16 add (at most 7620) and a
// vpmaddwd by ones: the same exact int32 sums, so the same bits.
__attribute__((always_inline)) inline __m256i dot8(__m256i acc, __m256i lo, __m256i hi, const __m256i* x) {
#if defined(QMV_EVEX_VNNI)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, _mm256_load_si256(x)), hi, _mm256_load_si256(x + 1));
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256(x)),
                                         _mm256_maddubs_epi16(hi, _mm256_load_si256(x + 1)));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// One row of w's 32 bytes (64 codes) against row m's 64 int8 values of x (Problem::xq8: the even-indexed
// elements, then the odd ones): the low nibbles are the even codes, the high nibbles the odd ones.
template <int M, int CPG>
inline void block8(const Problem& p, int n, int g0, int g1, int pf, float* tot) {
  const int G = p.K / p.group_size;
  const int cpg = CPG > 0 ? CPG : p.group_size / 64;  // chunks of 64 per group (a constant for 64, 128)
  const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w + static_cast<int64_t>(n) * p.w_stride);
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;
  alignas(32) float sc[kScaleBlock];
  load_scales(p, n, g0, g1 - g0, sc);
  const __m256i low4 = _mm256_set1_epi8(0xf);
  __m256 t[M];
  for (int m = 0; m < M; ++m) t[m] = _mm256_load_ps(tot + m * kLanes);
  for (int g = g0; g < g1; ++g) {
    __m256i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
    for (int c = 0; c < cpg; ++c) {
      const int64_t ci = static_cast<int64_t>(g) * cpg + c;
      prefetch_l2(w + pf_off + ci * 32);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ci * 32));
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m256i* xc = reinterpret_cast<const __m256i*>(p.xq8 + ci * M * 64);
      for (int m = 0; m < M; ++m) acc[m] = dot8(acc[m], lo, hi, xc + 2 * m);
    }
    for (int m = 0; m < M; ++m) {
      const __m256 s = _mm256_set1_ps(sc[g - g0] * p.xscale[m * G + g]);
      t[m] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[m]), t[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm256_store_ps(tot + m * kLanes, t[m]);
}

// The float block or the int16 one (only for 4-bit).
template <int M, int R, int BITS, int XBYTES>
inline void run_block(const Problem& p, int n, int g0, int g1, int pf, float* tot) {
  if constexpr (XBYTES == 1 && BITS == 4) {
    if (p.group_size == 64) return block8<M, 1>(p, n, g0, g1, pf, tot);
    if (p.group_size == 128) return block8<M, 2>(p, n, g0, g1, pf, tot);
    return block8<M, 0>(p, n, g0, g1, pf, tot);
  }
  if constexpr (XBYTES == 2 && BITS == 4) {
    if (p.group_size == 64) {
      block16<M, R, 1>(p, n, g0, g1, pf, tot);
    } else if (p.group_size == 128) {
      block16<M, R, 2>(p, n, g0, g1, pf, tot);
    } else {
      block16<M, R, 0>(p, n, g0, g1, pf, tot);
    }
  } else {
    block<M, R, BITS>(p, n, g0, g1, pf, tot);
  }
}

// Rows [n0, n1): with one K block, R rows at a time from start to end; with several (x too long for
// L1 with several rows of x), blocks of kRowBlock rows swept once per K block.
template <int M, int R, int BITS, int XBYTES = 4>
void rows_mr(const Problem& p, int n0, int n1) {
  const int G = p.K / p.group_size;
  constexpr int kXItem = XBYTES;  // bytes per element of x: 4 float, 2 int16, 1 int8
  int kg = (M == 1 ? kXBytesOneRow : kXBytes) / (M * p.group_size * kXItem);
  kg = kg < 1 ? 1 : (kg > kScaleBlock ? kScaleBlock : kg);
  const int64_t row_bytes = (kg >= G ? p.K : static_cast<int64_t>(kg) * p.group_size) * BITS / 8;
  if (kg >= G) {
    prefetch_start(p, n0, n1, row_bytes);
    alignas(32) float tot[R * M * kLanes];
    int n = n0;
    for (; n + R <= n1; n += R) {
      for (float& v : tot) v = 0.0f;
      run_block<M, R, BITS, XBYTES>(p, n, 0, G, prefetch_rows<R>(n, n1, row_bytes), tot);
      finish<M>(p, n, R, tot);
    }
    for (; n < n1; ++n) {
      for (int i = 0; i < M * kLanes; ++i) tot[i] = 0.0f;
      run_block<M, 1, BITS, XBYTES>(p, n, 0, G, prefetch_rows<1>(n, n1, row_bytes), tot);
      finish<M>(p, n, 1, tot);
    }
    return;
  }
  alignas(32) float tot[kRowBlock * M * kLanes];
  for (int nb = n0; nb < n1; nb += kRowBlock) {
    const int nb1 = nb + kRowBlock < n1 ? nb + kRowBlock : n1;
    for (int i = 0; i < (nb1 - nb) * M * kLanes; ++i) tot[i] = 0.0f;
    for (int g0 = 0; g0 < G; g0 += kg) {
      const int g1 = g0 + kg < G ? g0 + kg : G;
      int n = nb;
      for (; n + R <= nb1; n += R)
        run_block<M, R, BITS, XBYTES>(p, n, g0, g1, prefetch_rows<R>(n, nb1, row_bytes), tot + (n - nb) * M * kLanes);
      for (; n < nb1; ++n)
        run_block<M, 1, BITS, XBYTES>(p, n, g0, g1, prefetch_rows<1>(n, nb1, row_bytes), tot + (n - nb) * M * kLanes);
    }
    finish<M>(p, nb, nb1 - nb, tot);
  }
}

// Rows of w computed together: enough independent accumulator chains to hide the FMA latency with one
// or two rows of x, while the accumulators and totals still fit the 16 vector registers.
constexpr int rows_per_block(int M) {
  return M == 1 ? 4 : (M <= 3 ? 2 : 1);
}

void rows(const Problem& p, int n0, int n1) {
  dispatch(p, [&](auto m, auto bits) {
    constexpr int M = decltype(m)::value;
    rows_mr<M, rows_per_block(M), decltype(bits)::value>(p, n0, n1);
  });
}

// One row of w at a time in the int16 form: its two independent add chains per row of x already keep
// the ALUs busy, and one stream of weights per core prefetches best.
void rows_int16(const Problem& p, int n0, int n1) {
  if (p.xq == nullptr) return rows(p, n0, n1);
  dispatch(p, [&](auto m, auto bits) {
    constexpr int M = decltype(m)::value;
    rows_mr<M, 1, decltype(bits)::value, 2>(p, n0, n1);
  });
}

// The int8 form (Kernel::int8, opt-in: "avx512vl-int8", "avx2-int8"): as the int16 form, with x rounded to int8
// (step max |x| / 127 per group, Problem::xq8) and AVX512-VNNI's vpdpbusd, which multiplies 32 unsigned bytes
// (the codes) with 32 signed bytes (x) and sums each 4 into 8 int32 lanes: per 32 weight bytes 3 integer ops
// shared by the rows of x and 2 vpdpbusd per row, where int16 needs 7 and 4 (plain AVX2: 5 per row, dot8). x's
// rounding moves an output 258 times as much as int16's (bounded the same way, tests/test_cpu_kernel.py).
[[maybe_unused]] void rows_int8(const Problem& p, int n0, int n1) {  // unused in avx2-vnni
  if (p.xq8 == nullptr) return rows(p, n0, n1);
  dispatch(p, [&](auto m, auto bits) {
    constexpr int M = decltype(m)::value;
    rows_mr<M, 1, decltype(bits)::value, 1>(p, n0, n1);
  });
}

}  // namespace
}  // namespace qmv

#pragma GCC pop_options

namespace qmv {

#if defined(QMV_EVEX_VNNI)
Kernel kernel_avx512vl_vnni() {
  return {"avx512vl-vnni", 2 * kLanes, rows_int16, true, true, true};
}

Kernel kernel_avx512vl_int8() {
  Kernel k{"avx512vl-int8", 2 * kLanes, rows_int8, true, true, true};
  k.int8 = true;
  return k;
}
#elif defined(QMV_AVX_VNNI)
Kernel kernel_avx2_vnni() {
  return {"avx2-vnni", 2 * kLanes, rows_int16, true, true, true};
}
#else
Kernel kernel_avx2() {
  return {"avx2", 2 * kLanes, rows, true, true};
}

Kernel kernel_avx2_int16() {
  return {"avx2-int16", 2 * kLanes, rows_int16, true, true, true};
}

Kernel kernel_avx2_int8() {
  Kernel k{"avx2-int8", 2 * kLanes, rows_int8, true, true, true};
  k.int8 = true;
  return k;
}
#endif

}  // namespace qmv
