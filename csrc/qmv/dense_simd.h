// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The dense (float-weight) matvec and widening over a vector type V (dense_avx2.cpp: 8 lanes, dense_avx512.cpp:
// 16), included inside each file's target pragma. V provides: kLanes, zero(), loadx(const float*),
// load<type>(const void* w, int64_t i) (lanes i.. of w widened to float), fma(a, b, c), fma1 (its scalar form, for the
// tail columns), hsum(v), store(float*, v). The files build with -ffp-contract=off: every fused multiply-add is written.
//
// Register blocks of R output rows x M rows of x: each block's weights are read once for all M rows. Every
// (output row, row of x) pair accumulates in its own vector in k order, then a horizontal sum, then the tail
// columns in order: the same operations whatever M and R.

#pragma once

#include <cstdint>

#include "dense.h"

namespace qmv::dense_simd {

// With at most this many rows of x (bandwidth-bound), each row's bytes this far ahead are prefetched into L2, so that
// memory and arithmetic overlap (rows of a task are contiguous: the stream runs on into the next rows). Zen 4, bf16,
// 8 products of 14336 x 5120, alternated builds: 1 / 2 / 4 rows 43-49 / 47-55 / 49-61 ms without, 39-41 / 39-42 /
// 42-51 with; from 6 rows on (compute-bound) no difference.
constexpr int kDensePrefetchRows = 4;
constexpr int64_t kDensePrefetchBytes = 32 << 10;

template <typename V, int T, int M, int R>
inline void block(const DenseProblem& p, int64_t n) {
  const int K = p.K;
  const int Kv = K - K % V::kLanes;
  typename V::vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = V::zero();
  constexpr int64_t esize = T == kF32 ? 4 : 2;
  constexpr int line = static_cast<int>(64 / esize);  // elements per cache line
  const char* base = static_cast<const char*>(p.w);
  for (int k = 0; k < Kv; k += V::kLanes) {
    if constexpr (M <= kDensePrefetchRows) {
      if (k % line == 0)
        for (int r = 0; r < R; ++r) V::prefetch(base + ((n + r) * K + k) * esize + kDensePrefetchBytes);
    }
    typename V::vec w[R];
    for (int r = 0; r < R; ++r) w[r] = V::template load<T>(p.w, (n + r) * K + k);
    for (int m = 0; m < M; ++m) {
      const typename V::vec xv = V::loadx(p.x + static_cast<int64_t>(m) * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = V::fma(w[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s = V::hsum(acc[r][m]);
      for (int k = Kv; k < K; ++k) s = V::fma1(load_scale(p.w, T, (n + r) * K + k), p.x[static_cast<int64_t>(m) * K + k], s);
      p.out[m * p.ldo + n + r] = s;
    }
}

template <typename V, int T, int M>
inline void rows_m(const DenseProblem& p, int64_t n0, int64_t n1) {
  constexpr int R = V::template rows_per_block<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<V, T, M, R>(p, n);
  for (; n < n1; ++n) block<V, T, M, 1>(p, n);
}

template <typename V, int T>
inline void rows_t(const DenseProblem& p, int64_t n0, int64_t n1) {
  switch (p.M) {
    case 1: return rows_m<V, T, 1>(p, n0, n1);
    case 2: return rows_m<V, T, 2>(p, n0, n1);
    case 3: return rows_m<V, T, 3>(p, n0, n1);
    case 4: return rows_m<V, T, 4>(p, n0, n1);
    case 5: return rows_m<V, T, 5>(p, n0, n1);
    case 6: return rows_m<V, T, 6>(p, n0, n1);
    case 7: return rows_m<V, T, 7>(p, n0, n1);
    default: return rows_m<V, T, 8>(p, n0, n1);
  }
}

template <typename V>
void rows(const DenseProblem& p, int64_t n0, int64_t n1) {
  if (p.type == kBF16) return rows_t<V, kBF16>(p, n0, n1);
  if (p.type == kF16) return rows_t<V, kF16>(p, n0, n1);
  return rows_t<V, kF32>(p, n0, n1);
}

template <typename V>
void widen(const void* src, int type, float* dst, int64_t i0, int64_t i1) {
  int64_t i = i0;
  if (type == kBF16) {
    for (; i + V::kLanes <= i1; i += V::kLanes) V::store(dst + i, V::template load<kBF16>(src, i));
    for (; i < i1; ++i) dst[i] = load_scale(src, kBF16, i);
  } else {
    for (; i + V::kLanes <= i1; i += V::kLanes) V::store(dst + i, V::template load<kF16>(src, i));
    for (; i < i1; ++i) dst[i] = load_scale(src, kF16, i);
  }
}

}  // namespace qmv::dense_simd
