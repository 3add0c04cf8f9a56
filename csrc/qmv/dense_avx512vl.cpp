// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// dense_simd.h on 256-bit vectors with AVX-512VL's 32 registers (larger register blocks: each load of x serves 3 or 4
// output rows), for CPUs that run 512-bit operations as two halves (AMD Zen 4, decode kernel avx512vl-*). dense.cpp
// calls it only when the CPU reports avx512f/vl, fma and f16c.

#include "dense.h"  // before the target pragma

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma,f16c")

#include "dense_v8.h"

namespace qmv {

DenseKernels dense_avx512vl() {
  return {"avx512vl", &dense_simd::rows<V8<32>>, &dense_simd::widen<V8<32>>, kMaxRows};
}

}  // namespace qmv

#pragma GCC pop_options
