// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// Portable prefill kernels (prefill.h): plain loops, baseline x86-64 or any other architecture. The
// same blocking and the same online softmax as the AVX2 kernels, without vectors.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "prefill.h"

namespace qmv {
namespace {

void dequantize_rows(const DequantProblem& p, int n0, int n1) {
  const int per_word = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1;
  const int G = p.K / p.group_size;
  const int words_per_group = p.group_size / per_word;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* w = p.w + n * p.w_stride;
    float* out = p.out + static_cast<int64_t>(n) * p.K;
    for (int g = 0; g < G; ++g) {
      const float s = load_scale(p.scales, p.scale_type, n * p.s_stride + g);
      const float b = load_scale(p.biases, p.scale_type, n * p.b_stride + g);
      for (int i = 0; i < words_per_group; ++i) {
        const uint32_t word = w[g * words_per_group + i];
        for (int j = 0; j < per_word; ++j) {
          const float prod = static_cast<float>((word >> (p.bits * j)) & mask) * s;
          *out++ = prod + b;  // two roundings, as MLX (built with -ffp-contract=off)
        }
      }
    }
  }
}

void attention_rows(const AttentionProblem& p, int b, int h, int r0, int r1) {
  const int D = p.D;
  const int rows = r1 - r0;
  const int kvh = h / (p.H / p.Hkv);
  const float* q = p.q + b * p.qs[0] + h * p.qs[1];
  const float* k = p.k + b * p.ks[0] + kvh * p.ks[1];
  const float* v = p.v + b * p.vs[0] + kvh * p.vs[1];
  const int offset = p.Lk - p.Lq;
  const int end = p.causal ? std::min(p.Lk, offset + r1) : p.Lk;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> o(static_cast<size_t>(rows) * D, 0.0f), s(kKeyBlock);
  std::vector<float> m(rows, neg_inf), l(rows, 0.0f);
  for (int k0 = 0; k0 < end; k0 += kKeyBlock) {
    const int k1 = std::min(end, k0 + kKeyBlock);
    for (int i = 0; i < rows; ++i) {
      const float* qi = q + (r0 + i) * p.qs[2];
      const int last = p.causal ? std::min(k1, offset + r0 + i + 1) : k1;  // keys [k0, last) visible
      float mx = neg_inf;
      for (int j = k0; j < last; ++j) {
        float dot = 0.0f;
        const float* kj = k + j * p.ks[2];
        for (int c = 0; c < D; ++c) dot += qi[c] * kj[c];
        s[j - k0] = dot * p.scale;
        mx = std::max(mx, s[j - k0]);
      }
      if (last <= k0) continue;  // this row sees none of the block
      const float m_new = std::max(m[i], mx);
      const float alpha = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
      float sum = 0.0f;
      float* oi = o.data() + static_cast<size_t>(i) * D;
      for (int c = 0; c < D; ++c) oi[c] *= alpha;
      for (int j = k0; j < last; ++j) {
        const float e = std::exp(s[j - k0] - m_new);
        sum += e;
        const float* vj = v + j * p.vs[2];
        for (int c = 0; c < D; ++c) oi[c] += e * vj[c];
      }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
    }
  }
  for (int i = 0; i < rows; ++i) {
    float* dst = p.out + ((static_cast<int64_t>(b) * p.H + h) * p.Lq + r0 + i) * D;
    const float inv = 1.0f / l[i];
    for (int c = 0; c < D; ++c) dst[c] = o[static_cast<size_t>(i) * D + c] * inv;
  }
}


// MLX's scalar exp (simd/math.h with Simd<float, 1>): note `x + 0.5` there is a double sum.
float mlx_exp(float x_init) {
  float x = x_init * 1.442695f;
  const float ipart = static_cast<float>(std::floor(static_cast<double>(x) + 0.5));
  const float fpart = x - ipart;
  x = 1.535336188319500e-4f;
  x = std::fma(x, fpart, 1.339887440266574e-3f);
  x = std::fma(x, fpart, 9.618437357674640e-3f);
  x = std::fma(x, fpart, 5.550332471162809e-2f);
  x = std::fma(x, fpart, 2.402264791363012e-1f);
  x = std::fma(x, fpart, 6.931472028550421e-1f);
  x = std::fma(x, fpart, 1.000000000000000f);
  const uint32_t ebits = static_cast<uint32_t>(static_cast<int>(ipart) + 127) << 23;
  float epart;
  std::memcpy(&epart, &ebits, sizeof epart);
  float result = std::isnan(x_init) ? x_init : epart * x;
  if (x_init > 88.0f) result = std::numeric_limits<float>::infinity();
  if (x_init < -88.0f) result = 0.0f;
  return result;
}

void swiglu_range(const float* gate, const float* up, float* out, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float g = gate[i];
    const float y = 1.0f / (1.0f + mlx_exp(std::fabs(g)));
    const float sig = g < 0.0f ? y : 1.0f - y;
    out[i] = (g * sig) * up[i];
  }
}

void dots(const float* q, int rows, int D, const float* keys, int nk, float* s, int64_t s_stride) {
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < nk; ++k) {
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc += q[r * D + d] * keys[static_cast<int64_t>(k) * D + d];
      s[r * s_stride + k] = acc;
    }
}

void axpys(const float* p, int rows, int64_t p_stride, const float* v, int nk, int D, float* o) {
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < nk; ++k) {
      const float pk = p[r * p_stride + k];
      for (int d = 0; d < D; ++d) o[r * D + d] += pk * v[static_cast<int64_t>(k) * D + d];
    }
}

void softmax(float* s, int rows, int n, int64_t stride) {
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * stride;
    const float m = *std::max_element(sr, sr + n);
    float sum = 0.0f;
    for (int k = 0; k < n; ++k) sum += (sr[k] = std::exp(sr[k] - m));
    const float inv = 1.0f / sum;
    for (int k = 0; k < n; ++k) sr[k] *= inv;
  }
}

// MLX's erf (simd/math.h) with one lane.
float mlx_erf(float v) {
  const float t = 1.0f / std::fma(0.3275911f, std::fabs(v), 1.0f);
  float r = std::fma(1.061405429f, t, -1.453152027f);
  r = std::fma(r, t, 1.421413741f);
  r = std::fma(r, t, -0.284496736f);
  r = std::fma(r, t, 0.254829592f);
  const float e = -mlx_exp(-v * v);
  const float result = std::fma(e * t, r, 1.0f);
  return v > 0 ? result : -result;
}

// nn.gelu: x * (1 + erf(x / sqrt(2))) / 2, sqrt(2) a float32 constant.
void gelu_range(const float* x, float* out, int64_t i0, int64_t i1) {
  const float sqrt2 = static_cast<float>(1.4142135623730951);
  for (int64_t i = i0; i < i1; ++i) out[i] = x[i] * (1.0f + mlx_erf(x[i] / sqrt2)) / 2.0f;
}

// MLX's logsumexp.cpp with one lane (its x86 build), line for line.
float logsumexp(const void* x, int type, int64_t n) {
  float maximum = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float v = load_scale(x, type, i);
    if (std::isnan(v) || std::isnan(maximum)) {
      maximum = std::isnan(maximum) ? maximum : v;
    } else if (v > maximum) {
      maximum = v;
    }
  }
  float normalizer = 0.0f;
  for (int64_t i = 0; i < n; ++i) normalizer = normalizer + mlx_exp(load_scale(x, type, i) - maximum);
  return std::isinf(maximum) ? maximum : std::log(normalizer) + maximum;
}

}  // namespace

PrefillKernels prefill_scalar() {
  return {"scalar", dequantize_rows, attention_rows, swiglu_range, gelu_range, dots, axpys, softmax, logsumexp, 1};
}

}  // namespace qmv
