// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// Float weights on the CPU (dense.cpp): out = x @ w.T for a few rows of float32 x and w stored as float32,
// bfloat16 or float16 (the checkpoint's dtype, widened exactly as it is read), and the widening of a whole
// bfloat16/float16 matrix to float32 for the BLAS GEMM of a prompt chunk. Nothing here depends on MLX.

#pragma once

#include <cstdint>

#include "kernels.h"  // ScaleType (the weights' dtype), load_scale

namespace qmv {

struct DenseProblem {
  int M;             // rows of x (1..DenseKernels::max_rows): one pass over the weights
  int K;             // input features
  const float* x;    // M rows of K floats, contiguous
  const void* w;     // output rows of K elements, contiguous, dtype `type`
  int type;          // ScaleType: kF32, kF16 or kBF16
  float* out;        // M rows of ldo floats
  int64_t ldo;
};

// out[m, n] = sum_k x[m, k] * w[n, k] for output rows [n0, n1). Each (n, m) pair goes through the same
// operations in the same order whatever M and the rows computed together: a row of x gets the same bits alone
// and in a batch.
using DenseRowsFn = void (*)(const DenseProblem&, int64_t n0, int64_t n1);
// dst[i] = float(src[i]) for i in [i0, i1) (bfloat16 or float16 src: exact).
using WidenFn = void (*)(const void* src, int type, float* dst, int64_t i0, int64_t i1);

struct DenseKernels {
  const char* name;
  DenseRowsFn rows;
  WidenFn widen;
  int max_rows;  // rows of x in one pass (<= kMaxRows): as many as the register blocks serve well
};

DenseKernels dense_avx2();    // 8 lanes: AVX2, FMA, F16C
DenseKernels dense_avx512vl();  // 8 lanes in 32 registers: AVX-512VL, FMA, F16C
DenseKernels dense_avx512();  // 16 lanes: AVX-512F/BW, FMA, F16C

}  // namespace qmv
