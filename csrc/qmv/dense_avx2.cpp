// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// dense_simd.h on 256-bit vectors (AVX2, FMA, F16C). dense.cpp calls it only when the CPU reports them.

#include "dense.h"  // before the target pragma

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "dense_v8.h"

namespace qmv {

DenseKernels dense_avx2() {
  return {"avx2", &dense_simd::rows<V8<16>>, &dense_simd::widen<V8<16>>};
}

}  // namespace qmv

#pragma GCC pop_options
