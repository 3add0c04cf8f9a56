// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// 8 consecutive scales (or biases) as floats, for the 256-bit loops (kernel_avx2.cpp, gemm_int16.cpp). A file
// includes it after its `#pragma GCC target` and <immintrin.h>, after kernels.h; it sits in an anonymous namespace,
// so each file gets a copy compiled for its own target (as kernel_simd.h), never one shared at link time.

#pragma once

namespace qmv {
namespace {

// 8 consecutive scales (or biases) of dtype `type` from element i, as floats.
__attribute__((always_inline)) inline __m256 load8(const void* base, int type, int64_t i) {
  switch (type) {
    case kF32:
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    case kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
    default: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

}  // namespace
}  // namespace qmv
