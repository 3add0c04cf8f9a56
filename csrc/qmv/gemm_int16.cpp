// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// Prefill's quantized matrix product straight from the 4-bit codes: out (M x N) = x (M x K) times the
// dequantized w (N x K) transposed, for many rows of x (a prompt chunk), with x rounded to int16 one step per
// (row, group) exactly as the int16 matvec kernels round it (qmv.cpp quantize_x). A float32 GEMM does 8
// multiply-adds per 256-bit FMA; vpdpwssd (AVX512-VNNI) does 16 int16 ones, and both issue twice a cycle on
// Zen 4 and on Intel's AVX-512 cores, so this product can run at up to twice the machine's float32 GEMM peak,
// and it never writes the dequantized weights (10 % of a prefill layer's time before). Without VNNI, vpmaddwd
// and an add do the same sums (the AVX2 build of this file).
//
// Register blocking as in a BLAS micro-kernel, turned for integers: a packed panel holds 32 output rows (4
// vectors of 8 lanes) of one K block, each 32-bit lane a pair of codes (k, k + 1) as int16; a row of x
// supplies its pair (x[k], x[k + 1]) broadcast to all 8 lanes, so one vpdpwssd adds 2 products to each of 8
// outputs. A tile of MR rows of x times 32 outputs keeps MR x 4 int32 accumulators in registers (AVX-512VL:
// 4 x 4 of its 32 ymm registers; AVX2: 2 x 4 of 16). At the end of each group the int32 sums are scaled
// into the float32 outputs: scale * (step * sum(code * xq) - 7.5 * xerr) + bias * xsum, the int16 matvec's
// arithmetic (kernels.h Problem::xq: the codes centred by the error term). Every output goes through the same
// operations in the same order whatever the tile, the number of rows or the thread, so a row of x gets the
// same bits alone or in any chunk.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"  // before the target pragma: its inline helpers must stay baseline code

#pragma GCC push_options
#if defined(QMV_GEMM_EVEX)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#include "scales_simd.h"  // load8

namespace qmv {
namespace {

constexpr int kStrip = 32;  // output rows per packed panel: 4 vectors of 8 lanes
constexpr int kVecs = kStrip / 8;
#if defined(QMV_GEMM_EVEX)
constexpr int kMR = 4;  // 16 accumulators + 4 broadcasts + 1 panel vector (6 rows: GCC 12 spills)
#else
constexpr int kMR = 2;  // 8 accumulators + 2 broadcasts + a panel vector and a product: 12 of 16
#endif

__attribute__((always_inline)) inline __m256i dot(__m256i acc, __m256i w, __m256i x) {
#if defined(QMV_GEMM_EVEX)
  // Written out: GCC 12 gives the intrinsic only ymm0-15, then copies the accumulators in and out of
  // ymm16-31 around every instruction.
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
  return acc;
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}

// Rows of x per pass over a strip's K: x's int16 rows then stay in L3 while every strip reads them (256 rows of
// K = 14,336: 7 MB), at the cost of packing each panel once per block of rows. 2,048 x 14,336 x 5,120 on 2 Zen 4
// cores: 1.33-1.37 s in one block, 0.99-1.04 s in blocks of 256 (K = 5,120: no difference).
constexpr int kMBlock = 256;

// K block: a multiple of the group size, 256 elements or one group if larger. The panel (32 x 256 int16,
// 16 KiB) stays in L1 while every tile of rows of x goes over it.
int k_block(int group_size) {
  return group_size >= 256 ? group_size : 256 / group_size * group_size;
}

// Rows [n0, n0 + 32) of w's 4-bit codes over K range [k0, k0 + kc) into the panel:
// wp[((q * 4) + j) * 8 + l] = code[n0 + 8 j + l, k0 + 2 q] | code[n0 + 8 j + l, k0 + 2 q + 1] << 16.
// Rows at or past N repeat row N - 1 (their outputs are computed and dropped).
void pack(const GemmProblem& p, int n0, int k0, int kc, int32_t* wp) {
  __m256i idx[kVecs];
  for (int j = 0; j < kVecs; ++j) {
    alignas(32) int32_t rows[8];
    for (int l = 0; l < 8; ++l)
      rows[l] = static_cast<int32_t>((std::min(n0 + 8 * j + l, p.N - 1) - n0) * p.w_stride);
    idx[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(rows));
  }
  const int* base = reinterpret_cast<const int*>(p.w + static_cast<int64_t>(n0) * p.w_stride + k0 / 8);
  const __m256i low4 = _mm256_set1_epi32(0xf);
  for (int wi = 0; wi < kc / 8; ++wi) {  // one word: 8 codes, 4 pairs
    for (int j = 0; j < kVecs; ++j) {
      const __m256i v = _mm256_i32gather_epi32(base + wi, idx[j], 4);
      for (int q = 0; q < 4; ++q) {  // byte q: codes 2 q (low nibble) and 2 q + 1, to the lane's two halves
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(v, 8 * q), low4);
        const __m256i hi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8 * q + 4), low4), 16);
        _mm256_store_si256(reinterpret_cast<__m256i*>(wp + ((wi * 4 + q) * kVecs + j) * 8), _mm256_or_si256(lo, hi));
      }
    }
  }
}

// The panel's scales and biases for its groups: sb[(gl * 2) * 32 + r] = scale[n0 + r, g0 + gl],
// sb[(gl * 2 + 1) * 32 + r] = bias (rows past N repeat row N - 1, as in pack).
void pack_scales(const GemmProblem& p, int n0, int g0, int groups, float* sb) {
  for (int r = 0; r < kStrip; ++r) {
    const int64_t n = std::min(n0 + r, p.N - 1);
    for (int gl = 0; gl < groups; ++gl) {
      const int64_t g = g0 + gl;
      sb[(gl * 2) * kStrip + r] = load_scale(p.scales, p.scale_type, n * p.s_stride + g);
      sb[(gl * 2 + 1) * kStrip + r] = load_scale(p.biases, p.scale_type, n * p.b_stride + g);
    }
  }
}

// MR rows of x (from row i0) times the panel, over the K block's groups; c: the MR rows' 32 running outputs.
template <int MR>
void tile(const GemmProblem& p, const int32_t* wp, const float* sb, int i0, int k0, int kc, float* c) {
  const int G = p.K / p.group_size;
  const int pairs = p.group_size / 2;
  const int g0 = k0 / p.group_size;
  const int16_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = p.xq + static_cast<int64_t>(i0 + i) * p.K + k0;
  for (int gl = 0; gl < kc / p.group_size; ++gl) {
    __m256i acc[MR][kVecs];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm256_setzero_si256();
    const int32_t* wg = wp + static_cast<int64_t>(gl) * pairs * kStrip;
    const int off = gl * p.group_size;
    for (int q = 0; q < pairs; ++q) {
      __m256i xb[MR];
      for (int i = 0; i < MR; ++i) {
        int32_t two;
        std::memcpy(&two, xr[i] + off + 2 * q, 4);
        xb[i] = _mm256_set1_epi32(two);
      }
      for (int j = 0; j < kVecs; ++j) {
        const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(wg + (q * kVecs + j) * 8));
        for (int i = 0; i < MR; ++i) acc[i][j] = dot(acc[i][j], w, xb[i]);
      }
    }
    const int g = g0 + gl;
    const float* s = sb + (gl * 2) * kStrip;
    const float* b = s + kStrip;
    for (int i = 0; i < MR; ++i) {
      const int64_t at = static_cast<int64_t>(i0 + i) * G + g;
      const __m256 step = _mm256_set1_ps(p.xscale[at]);
      const __m256 err = _mm256_set1_ps(7.5f * p.xerr[at]);
      const __m256 xs = _mm256_set1_ps(p.xsum[at]);
      float* ci = c + i * kStrip;
      for (int j = 0; j < kVecs; ++j) {
        const __m256 t = _mm256_fmsub_ps(step, _mm256_cvtepi32_ps(acc[i][j]), err);
        __m256 o = _mm256_fmadd_ps(_mm256_load_ps(s + 8 * j), t, _mm256_load_ps(ci + 8 * j));
        o = _mm256_fmadd_ps(_mm256_load_ps(b + 8 * j), xs, o);
        _mm256_store_ps(ci + 8 * j, o);
      }
    }
  }
}

template <int MR>
void tail(const GemmProblem& p, const int32_t* wp, const float* sb, int i0, int rest, int k0, int kc, float* c) {
  if constexpr (MR > 0) {
    if (rest == MR) return tile<MR>(p, wp, sb, i0, k0, kc, c);
    tail<MR - 1>(p, wp, sb, i0, rest, k0, kc, c);
  }
}

void gemm_rows(const GemmProblem& p, int n0, int n1) {
  const int kb = k_block(p.group_size);
  const int groups = kb / p.group_size;
  const int mb = std::min(p.M, kMBlock);
  struct alignas(64) Line {
    float v[16];
  };
  std::vector<Line> panel_store(static_cast<size_t>(kb) * kStrip / 2 * sizeof(int32_t) / sizeof(Line) + 1);
  std::vector<Line> sb_store(static_cast<size_t>(groups) * 2 * kStrip / 16 + 1);
  std::vector<Line> c_store(static_cast<size_t>(mb) * kStrip / 16 + 1);
  int32_t* wp = reinterpret_cast<int32_t*>(panel_store.data());
  float* sb = sb_store.data()->v;
  float* c = c_store.data()->v;
  for (int m0 = 0; m0 < p.M; m0 += mb) {
    const int m1 = std::min(p.M, m0 + mb);
    for (int n = n0; n < n1; n += kStrip) {
      std::fill(c, c + static_cast<size_t>(m1 - m0) * kStrip, 0.0f);
      for (int k0 = 0; k0 < p.K; k0 += kb) {
        const int kc = std::min(kb, p.K - k0);
        pack(p, n, k0, kc, wp);
        pack_scales(p, n, k0 / p.group_size, kc / p.group_size, sb);
        int i = m0;
        for (; i + kMR <= m1; i += kMR) tile<kMR>(p, wp, sb, i, k0, kc, c + static_cast<size_t>(i - m0) * kStrip);
        if (i < m1) tail<kMR - 1>(p, wp, sb, i, m1 - i, k0, kc, c + static_cast<size_t>(i - m0) * kStrip);
      }
      const int valid = std::min(kStrip, p.N - n);
      for (int i = m0; i < m1; ++i)
        std::copy_n(c + static_cast<size_t>(i - m0) * kStrip, valid, p.out + static_cast<int64_t>(i) * p.N + n);
    }
  }
}

// The matvec on interleaved weights (kernels.h: Gemm::matvec). One 32-byte load holds word w of 8 outputs; as in the
// int16 matvec kernels, shifts and masks turn it into 4 vectors whose 32-bit lanes hold a pair of codes (w's codes j
// and j + 4) of one output each, and a row of x supplies the matching pair of its int16 values (Problem::xq's layout
// holds them side by side) broadcast to all lanes: one vpdpwssd adds 2 products to each of 8 outputs, and every row
// of x reuses the unpacked codes. A group's exact int32 sums are scaled as the prompt product scales them (`tile`:
// the same operations in the same order per output), so a row of x gets here the bits it gets from `gemm_rows`.
// Per 32 weight bytes and row of x: 4 vpdpwssd and 4 broadcasts, the unpacking shared, and the group scaling a
// vector operation for 8 outputs (the row-major kernels scale each output's partial sums apart, then sum lanes).

// B blocks of 8 outputs from block n (B * 8 <= n1 - n): each broadcast of x serves B blocks.
template <int M, int CPG, int B>
inline void matvec_blocks(const Problem& p, int n, int64_t ahead_bytes, const char* end) {
  // Independent accumulator chains per (row of x, block): vpdpwssd's latency (~4 cycles) times its 2 issues a cycle
  // wants 8 in flight, which one or two rows of x alone would not give.
  constexpr int C = M * B >= 16 ? 1 : (M * B >= 8 ? 2 : 8 / (M * B));
  const int G = p.K / p.group_size;
  const int cpg = CPG > 0 ? CPG : p.group_size / 64;
  const int64_t words = p.K / 8;  // per row
  const __m256i low4 = _mm256_set1_epi32(0x000f000f);
  const uint32_t* wb[B];  // block b: word w of row n + 8 b + r at wb[b][8 w + r]
  for (int b = 0; b < B; ++b) wb[b] = p.w + static_cast<int64_t>(n + 8 * b) * words;
  const int64_t sb = static_cast<int64_t>(n) * G;
  __m256 o[M][B];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b) o[m][b] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m256i acc[M][B][C];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < B; ++b)
        for (int a = 0; a < C; ++a) acc[m][b][a] = _mm256_setzero_si256();
    for (int c = 0; c < cpg; ++c) {
      const int64_t ci = static_cast<int64_t>(g) * cpg + c;  // chunk of 64 elements: 8 words of each row
      for (int b = 0; b < B; ++b) {
        const char* ahead = reinterpret_cast<const char*>(wb[b] + ci * 64) + ahead_bytes;
        if (ahead < end)
          for (int l = 0; l < 256; l += 64) prefetch_l2(ahead + l);
      }
      const int32_t* xc = reinterpret_cast<const int32_t*>(p.xq + ci * M * 64);  // row m's pairs at xc + 32 m
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        __m256i q[B][4];
        for (int b = 0; b < B; ++b) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[b] + ci * 64 + 8 * i));
          q[b][0] = _mm256_and_si256(v, low4);
          q[b][1] = _mm256_and_si256(_mm256_srli_epi32(v, 4), low4);
          q[b][2] = _mm256_and_si256(_mm256_srli_epi32(v, 8), low4);
          q[b][3] = _mm256_and_si256(_mm256_srli_epi32(v, 12), low4);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {  // pair j of word i: (x[8 i + j], x[8 i + j + 4]), int32 j * 8 + i
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m256i xb = _mm256_set1_epi32(xc[32 * m + 8 * j + i]);
            for (int b = 0; b < B; ++b) acc[m][b][(4 * i + j) % C] = dot(acc[m][b][(4 * i + j) % C], q[b][j], xb);
          }
        }
      }
    }
    __m256 s[B], bias[B];
    for (int b = 0; b < B; ++b) {
      s[b] = load8(p.scales, p.scale_type, sb + 8 * b * G + 8 * g);
      bias[b] = load8(p.biases, p.scale_type, sb + 8 * b * G + 8 * g);
    }
    for (int m = 0; m < M; ++m) {  // tile's arithmetic, each row of x's terms broadcast once for the B blocks
      const int64_t at = static_cast<int64_t>(m) * G + g;
      const __m256 step = _mm256_set1_ps(p.xscale[at]);
      const __m256 err = _mm256_set1_ps(7.5f * p.xerr[at]);
      const __m256 xs = _mm256_set1_ps(p.xsum[at]);
      for (int b = 0; b < B; ++b) {
        __m256i sum = acc[m][b][0];  // the chains' exact int32 sums (the order does not change them)
        for (int a = 1; a < C; ++a) sum = _mm256_add_epi32(sum, acc[m][b][a]);
        const __m256 t = _mm256_fmsub_ps(step, _mm256_cvtepi32_ps(sum), err);
        o[m][b] = _mm256_fmadd_ps(s[b], t, o[m][b]);
        o[m][b] = _mm256_fmadd_ps(bias[b], xs, o[m][b]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b) _mm256_storeu_ps(p.out + static_cast<int64_t>(m) * p.N + n + 8 * b, o[m][b]);
}

// Blocks per pass: two from 2 rows of x on, so that each broadcast of x serves 16 outputs (with 4 or more rows the
// broadcasts would otherwise be as many loads as there are products; AVX-512VL's 32 registers hold 2 x 8
// accumulators, AVX2's 16 do not). One row of x reads one stream (14336x5120 and 131072x5120 on Zen 4: at the
// row-major kernel's GB/s, where two streams were ~5 % slower).
template <int M>
constexpr int blocks_per_pass() {
#if defined(QMV_GEMM_EVEX)
  return M >= 2 ? 2 : 1;
#else
  return 1;
#endif
}

template <int M, int CPG>
void matvec_block_rows(const Problem& p, int n0, int n1) {
  constexpr int B = blocks_per_pass<M>();
  const char* end = reinterpret_cast<const char*>(p.w + static_cast<int64_t>(n1) * (p.K / 8));
  int n = n0;
  // Prefetch the bytes a later pass reads at the same point, at least kPrefetchBytes ahead.
  const int64_t pass = static_cast<int64_t>(B) * 8 * (p.K / 8) * 4;
  const int64_t ahead = (kPrefetchBytes + pass - 1) / pass * pass;
  for (; n + 8 * B <= n1; n += 8 * B) matvec_blocks<M, CPG, B>(p, n, ahead, end);
  for (; n < n1; n += 8) matvec_blocks<M, CPG, 1>(p, n, ahead, end);
}

void matvec_rows(const Problem& p, int n0, int n1) {
  auto f = [&](auto m, auto) {
    constexpr int M = decltype(m)::value;
    if (p.group_size == 64) {
      matvec_block_rows<M, 1>(p, n0, n1);
    } else if (p.group_size == 128) {
      matvec_block_rows<M, 2>(p, n0, n1);
    } else {
      matvec_block_rows<M, 0>(p, n0, n1);
    }
  };
  dispatch_rows<4>(p, f);
}

// Gemm::prepare_x: quantize_x16 (chunk 64) and group_sums of qmv.cpp, value for value. The maximum and the rounding
// (nearest even, as nearbyint) do not depend on the order and go 8 lanes at a time; the error (a double sum) and the
// sum (a float sum) of each group are the scalar code's sums in the same order, 4 groups' chains interleaved.
void prepare_x(const float* xm, int m, int M, int K, int group_size, int16_t* xq, float* step, float* err,
               float* sums) {
  constexpr float kMax = 32767.0f;
  const int G = K / group_size;
  std::vector<float> qf(K);
  std::vector<char> finite(G);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int g = 0; g < G; ++g) {
    const float* v = xm + static_cast<int64_t>(g) * group_size;
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int k = 0; k < group_size; k += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + k), absmask);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
      amax = _mm256_max_ps(amax, a);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float mx = _mm_cvtss_f32(h);
    finite[g] = _mm256_movemask_ps(bad) == 0;
    float inv = finite[g] && mx > 0.0f ? kMax / mx : 0.0f;
    if (inv == std::numeric_limits<float>::infinity()) inv = 0.0f;  // as quantize_x: a group too small rounds to 0
    step[g] = !finite[g] ? std::numeric_limits<float>::quiet_NaN() : mx / kMax;
    float* q = qf.data() + static_cast<int64_t>(g) * group_size;
    if (inv > 0.0f) {
      const __m256 vi = _mm256_set1_ps(inv), hi = _mm256_set1_ps(kMax), lo = _mm256_set1_ps(-kMax);
      for (int k = 0; k < group_size; k += 8) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + k), vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(q + k, _mm256_max_ps(_mm256_min_ps(r, hi), lo));
      }
    } else {
      std::fill(q, q + group_size, 0.0f);
    }
  }
  for (int c = 0; c < K / 64; ++c) {  // chunk c: element i at (i % 4) * 16 + i / 4
    int16_t* dst = xq + (static_cast<int64_t>(c) * M + m) * 64;
    const float* q = qf.data() + static_cast<int64_t>(c) * 64;
    for (int i = 0; i < 64; ++i) dst[(i % 4) * 16 + i / 4] = static_cast<int16_t>(q[i]);
  }
  for (int g0 = 0; g0 < G; g0 += 4) {
    const int n = std::min(4, G - g0);
    double e[4] = {0.0, 0.0, 0.0, 0.0};
    float sm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    double st[4] = {0.0, 0.0, 0.0, 0.0};
    for (int j = 0; j < n; ++j) st[j] = static_cast<double>(step[g0 + j]);
    for (int k = 0; k < group_size; ++k)
      for (int j = 0; j < n; ++j) {
        const int64_t at = static_cast<int64_t>(g0 + j) * group_size + k;
        e[j] += st[j] * qf[at] - xm[at];
        sm[j] += xm[at];
      }
    for (int j = 0; j < n; ++j) {
      err[g0 + j] = finite[g0 + j] ? static_cast<float>(e[j]) : 0.0f;
      sums[g0 + j] = sm[j];
    }
  }
}

}  // namespace

#if defined(QMV_GEMM_EVEX)
Gemm gemm_int16_avx512vl() {
  return {"avx512vl-vnni", kStrip, gemm_rows, matvec_rows, prepare_x};
}
#else
Gemm gemm_int16_avx2() {
  return {"avx2", kStrip, gemm_rows, matvec_rows, prepare_x};
}
#endif

}  // namespace qmv

#pragma GCC pop_options
