// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The row loop of the float AVX-512 kernel (kernel_avx512.cpp), templated on a struct of vector
// operations V (kernel_avx2.cpp has its own loop, tuned for Zen 3). The kernel file includes it after
// kernels.h, after its `#pragma GCC target` and <immintrin.h>, and after defining V: everything here is
// then compiled with that file's target, and it sits in an anonymous namespace (and is instantiated for
// that file's V only), so the AVX-512 copy stays in its own translation unit and none is shared at link
// time: AVX-512 code can never stand in for the AVX2 or the baseline one.
//
// Per group of each output row the dot products accumulate in vector registers; the group's scale is
// applied with one FMA per vector, and the biases cost one dot product with the group sums of x. The
// weights are read in chunks of V::kLanes bytes: kLanes 8-bit codes (x in natural order), or 2 * kLanes
// 4-bit codes whose low nibbles are the even-indexed codes and high nibbles the odd ones (x prepared
// with each chunk of 2 * kLanes elements split into its even then its odd elements: Kernel::x_chunk).
//
// V provides (F: a vector of kLanes floats; I: kLanes int32 lanes):
//   kLanes                       floats per vector, weight bytes per chunk
//   rows_per_block(M)            rows of w computed together for M rows of x (constexpr)
//   zero(), set1(s), load(p)     float vectors (load: unaligned)
//   store(p, a)                  a to p (unaligned)
//   fma(a, b, c)                 a * b + c
//   reduce(a)                    the sum of a's lanes
//   codes(p)                     kLanes bytes -> I, one byte per lane, zero-extended
//   low(q), high(q)              4-bit: the low / high nibbles of q as floats (members: they may use
//                                constants that V holds; block() makes one V per call)
//   to_float(q)                  8-bit: q as floats
//   scales(p, n, g0, count, sc)  sc[j] = scale[n, g0 + j] for j < count (sc: 64-byte aligned, kScaleBlock)
//   biases<M>(p, n, G, bd)       bd[m] = sum_g bias[n, g] * xsum[m, g] for m < M

#pragma once

namespace qmv {
namespace {

constexpr int kScaleBlock = 256;  // most groups in one K block (scales on the stack)
constexpr int kXBytes = 24 * 1024;  // x bytes per K block: half a typical L1d
constexpr int kXBytesOneRow = 256 * 1024;
constexpr int kRowBlock = 256;  // rows swept per K block (when x needs several K blocks)

// Groups [g0, g1) of rows n .. n+R-1 for all M rows of x, added to the running totals tot (R rows of M
// vectors of kLanes floats, kept across K blocks). pf: rows ahead to prefetch (0: none).
template <class V, int M, int R, int BITS>
inline void block(const Problem& p, int n, int g0, int g1, int pf, float* tot) {
  using F = typename V::F;
  constexpr int L = V::kLanes;
  constexpr int CE = BITS == 4 ? 2 * L : L;  // codes per chunk of L bytes
  const int cpg = p.group_size / CE;
  const int64_t K = p.K;
  const uint8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const uint8_t*>(p.w + (n + r) * p.w_stride);
  // The same bytes pf rows ahead (pf = 0: this row again, already cached; no branch in the loop).
  const int64_t pf_off = static_cast<int64_t>(pf) * p.w_stride * 4;

  const V ops{};
  F t[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) t[r][m] = V::load(tot + (r * M + m) * L);

  alignas(64) float sc[R][kScaleBlock];  // g1 - g0 <= kScaleBlock
  for (int r = 0; r < R; ++r) V::scales(p, n + r, g0, g1 - g0, sc[r]);
  for (int g = g0; g < g1; ++g) {
    F acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = V::zero();
    for (int c = 0; c < cpg; ++c) {
      const int64_t ci = static_cast<int64_t>(g) * cpg + c;
      const float* xc = p.xp + ci * CE;
      for (int r = 0; r < R; ++r) {
        if ((ci & (64 / L - 1)) == 0) prefetch_l2(wr[r] + pf_off + ci * L);  // once per 64-byte line
        const auto q = V::codes(wr[r] + ci * L);
        if constexpr (BITS == 4) {
          const F lo = ops.low(q);
          const F hi = ops.high(q);
          for (int m = 0; m < M; ++m) {
            acc[r][m] = V::fma(lo, V::load(xc + m * K), acc[r][m]);
            acc[r][m] = V::fma(hi, V::load(xc + m * K + L), acc[r][m]);
          }
        } else {
          const F f = V::to_float(q);
          for (int m = 0; m < M; ++m) acc[r][m] = V::fma(f, V::load(xc + m * K), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const F s = V::set1(sc[r][g - g0]);
      for (int m = 0; m < M; ++m) t[r][m] = V::fma(s, acc[r][m], t[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) V::store(tot + (r * M + m) * L, t[r][m]);
}

// out[m, n + r] for r < count: the running totals' lanes summed, plus the bias term
// sum_g bias[n, g] * xsum[m, g].
template <class V, int M>
inline void finish(const Problem& p, int n, int count, const float* tot) {
  const int G = p.K / p.group_size;
  for (int r = 0; r < count; ++r) {
    float bd[M];
    V::template biases<M>(p, n + r, G, bd);
    for (int m = 0; m < M; ++m)
      p.out[m * static_cast<int64_t>(p.N) + n + r] = V::reduce(V::load(tot + (r * M + m) * V::kLanes)) + bd[m];
  }
}

// Rows [n0, n1): with one K block, R rows at a time from start to end; with several (x too long for L1
// with several rows of x), blocks of kRowBlock rows swept once per K block, so that x is read from L1 for
// every row however many rows x has. Each (row, row of x) pair goes through the same operations in the
// same order whatever M, R or the K blocking (the running totals are kept across K blocks): a row of a
// batch gets bit for bit the result it gets alone, so batched greedy decoding picks the same tokens as
// one-by-one decoding.
template <class V, int M, int R, int BITS>
void rows_mr(const Problem& p, int n0, int n1) {
  constexpr int L = V::kLanes;
  const int G = p.K / p.group_size;
  // One row of x streams well from L2 (split K only when it would not fit there); several rows of
  // x are read once per row of w, so they must come from L1.
  int kg = (M == 1 ? kXBytesOneRow : kXBytes) / (M * p.group_size * 4);
  kg = kg < 1 ? 1 : (kg > kScaleBlock ? kScaleBlock : kg);
  // Prefetch the rows that come next in this order: with one K block, the rows of the whole range;
  // with several, the next rows of this row block in the same K block.
  const int64_t row_bytes = (kg >= G ? p.K : static_cast<int64_t>(kg) * p.group_size) * BITS / 8;
  if (kg >= G) {
    prefetch_start(p, n0, n1, row_bytes);
    alignas(64) float tot[R * M * L];
    int n = n0;
    for (; n + R <= n1; n += R) {
      for (float& v : tot) v = 0.0f;
      block<V, M, R, BITS>(p, n, 0, G, prefetch_rows<R>(n, n1, row_bytes), tot);
      finish<V, M>(p, n, R, tot);
    }
    for (; n < n1; ++n) {
      for (int i = 0; i < M * L; ++i) tot[i] = 0.0f;
      block<V, M, 1, BITS>(p, n, 0, G, prefetch_rows<1>(n, n1, row_bytes), tot);
      finish<V, M>(p, n, 1, tot);
    }
    return;
  }
  // The row block's totals (128 KiB with 8 rows of x and 16 lanes): per thread, not on the stack.
  alignas(64) static thread_local float tot[kRowBlock * kMaxRows * L];
  for (int nb = n0; nb < n1; nb += kRowBlock) {
    const int nb1 = nb + kRowBlock < n1 ? nb + kRowBlock : n1;
    for (int i = 0; i < (nb1 - nb) * M * L; ++i) tot[i] = 0.0f;
    for (int g0 = 0; g0 < G; g0 += kg) {
      const int g1 = g0 + kg < G ? g0 + kg : G;
      int n = nb;
      for (; n + R <= nb1; n += R)
        block<V, M, R, BITS>(p, n, g0, g1, prefetch_rows<R>(n, nb1, row_bytes), tot + (n - nb) * M * L);
      for (; n < nb1; ++n)
        block<V, M, 1, BITS>(p, n, g0, g1, prefetch_rows<1>(n, nb1, row_bytes), tot + (n - nb) * M * L);
    }
    finish<V, M>(p, nb, nb1 - nb, tot);
  }
}

// The kernel's RowsFn.
template <class V>
void rows(const Problem& p, int n0, int n1) {
  dispatch(p, [&](auto m, auto bits) {
    constexpr int M = decltype(m)::value;
    rows_mr<V, M, V::rows_per_block(M), decltype(bits)::value>(p, n0, n1);
  });
}

}  // namespace
}  // namespace qmv
