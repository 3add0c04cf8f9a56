// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// Portable kernel: no intrinsics, baseline x86-64 (or any other architecture). x in natural order.

#include "kernels.h"

namespace qmv {
namespace {

template <int M, int BITS>
void rows_scalar(const Problem& p, int n0, int n1) {
  constexpr int per_word = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int G = p.K / p.group_size;
  const int words_per_group = p.group_size / per_word;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* w = p.w + n * p.w_stride;
    float tot[M];
    for (int m = 0; m < M; ++m) tot[m] = 0.0f;
    for (int g = 0; g < G; ++g) {
      float acc[M];
      for (int m = 0; m < M; ++m) acc[m] = 0.0f;
      const uint32_t* wg = w + static_cast<int64_t>(g) * words_per_group;
      const int k0 = g * p.group_size;
      for (int i = 0; i < words_per_group; ++i) {
        uint32_t word = wg[i];
        for (int j = 0; j < per_word; ++j) {
          float q = static_cast<float>((word >> (BITS * j)) & mask);
          int k = k0 + i * per_word + j;
          for (int m = 0; m < M; ++m) acc[m] += q * p.xp[static_cast<int64_t>(m) * p.K + k];
        }
      }
      float s = load_scale(p.scales, p.scale_type, n * p.s_stride + g);
      float b = load_scale(p.biases, p.scale_type, n * p.b_stride + g);
      for (int m = 0; m < M; ++m) tot[m] += s * acc[m] + b * p.xsum[static_cast<int64_t>(m) * G + g];
    }
    for (int m = 0; m < M; ++m) p.out[static_cast<int64_t>(m) * p.N + n] = tot[m];
  }
}

void rows(const Problem& p, int n0, int n1) {
  dispatch(p, [&](auto m, auto bits) { rows_scalar<decltype(m)::value, decltype(bits)::value>(p, n0, n1); });
}

}  // namespace

Kernel kernel_scalar() {
  return {"scalar", 0, rows};
}

}  // namespace qmv
