// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// dense_simd.h on 256-bit vectors (AVX2, FMA, F16C). dense.cpp calls it only when the CPU reports them.

#include "dense.h"  // before the target pragma

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "dense_v8.h"

namespace qmv {

// Passes of 4 rows of x: with 16 registers, blocks of more rows have room for 1 or 2 output rows, and each load of x
// (from L2 beyond a few rows) then serves 1 or 2 products. Zen 4 running this build, bf16 14336 x 5120, best of 7,
// alternated: 6 / 8 / 12 rows 10.0-17.2 / 16.7-32.9 / 19.2-19.8 ms in passes of up to 8 rows, 6.4-7.7 / 8.8-10.4 /
// 13.2-13.3 in passes of 4 (1-4 rows: the same code).
DenseKernels dense_avx2() {
  return {"avx2", &dense_simd::rows<V8<16>>, &dense_simd::widen<V8<16>>, 4};
}

}  // namespace qmv

#pragma GCC pop_options
