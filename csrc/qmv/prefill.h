// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The prefill kernels (many tokens at once), next to the decode matvec: nothing here depends on MLX.
//
// - Dequantize: out[n, k] = scale[n, g(k)] * q[n, k] + bias[n, g(k)] in float32, for the 2/4/8-bit
//   affine codes MLX packs into uint32 words (low bits first), the product and the sum rounded apart:
//   bit for bit what MLX's CPU gives (`mx.dequantize`, pixtral_mlx.cpu.dequantize_affine). A prefill chunk then multiplies the float32 weights with one BLAS GEMM.
// - Attention: softmax(scale * q kᵀ [+ causal mask]) v for float32 q (B, H, Lq, D), k and v
//   (B, Hkv, Lk, D), H a multiple of Hkv (GQA). One task is one block of query rows of one head: it
//   walks the keys in blocks, keeps a running max and sum per row (the "online" softmax of
//   FlashAttention), and never holds more scores than one block of queries against one block of keys.
//   Causal: query i sits at key position Lk - Lq + i and sees keys up to it; key blocks past a query
//   block's last row are never computed.
// - SwiGLU: out = silu(gate) * up = (gate * sigmoid(gate)) * up in float32, with MLX's CPU sigmoid and exp
//   (mlx/backend/cpu/unary_ops.h, simd/math.h: 1 / (1 + exp(|x|)), exp as 2**round(x log2 e) times a Cephes
//   polynomial evaluated with fma) operation for operation, every other product and sum rounded apart: bit for
//   bit what mlx-lm's compiled `swiglu` and `nn.silu(g) * u` give on MLX's CPU, over every core.
// - GELU: x * (1 + erf(x / sqrt 2)) / 2 in float32 (MLX's `nn.gelu`, the exact one, compiled), with MLX's CPU erf
//   (simd/math.h: the Abramowitz-Stegun polynomial through fma, and MLX's exp) operation for operation: bit for bit
//   MLX's CPU result, 8 lanes at a time over every core (MLX's CPU runs it one element at a time: ~26 ns each).
// - LogSumExp: log(sum(exp(x))) over a row of float32, float16 or bfloat16 values, as MLX's CPU LogSumExp
//   (mlx/backend/cpu/logsumexp.cpp, one lane on x86) computes it: the maximum in float32 (NaN if any value is
//   NaN), exp(x - max) with MLX's exp, the exponentials summed one after another in index order in float32, then
//   log(sum) + max (the maximum itself when it is infinite). The exponentials go 8 lanes at a time; only the sum
//   keeps MLX's order, so the result is bit for bit MLX's (a decode step's sampler sees the same log-probabilities).

#pragma once

#include <cstdint>

namespace qmv {

struct DequantProblem {
  int N;           // rows (output features)
  int K;           // columns (input features)
  int group_size;  // a multiple of 32 / bits
  int bits;        // 2, 4 or 8
  const uint32_t* w;  // N rows, w_stride words apart
  int64_t w_stride;
  const void* scales;  // N rows of K / group_size, s_stride elements apart, dtype scale_type (kernels.h)
  const void* biases;
  int64_t s_stride;
  int64_t b_stride;
  int scale_type;
  float* out;  // N rows of K floats
};

// Dequantizes rows [n0, n1).
using DequantFn = void (*)(const DequantProblem&, int n0, int n1);

struct AttentionProblem {
  int B, H, Hkv, Lq, Lk, D;
  // Element strides of q, k, v by (batch, head, position); the last dimension is contiguous.
  const float* q;
  int64_t qs[3];
  const float* k;
  int64_t ks[3];
  const float* v;
  int64_t vs[3];
  float scale;
  bool causal;
  float* out;  // (B, H, Lq, D), contiguous
};

constexpr int kQueryBlock = 64;   // query rows per task
constexpr int kKeyBlock = 256;    // keys per step of the online softmax
constexpr int kMaxHeadDim = 256;

// One task: batch b, head h, query rows [r0, r1) (at most kQueryBlock of them).
using AttentionFn = void (*)(const AttentionProblem&, int b, int h, int r0, int r1);

// Decode attention over a quantized KV cache (mlx-lm's QuantizedKVCache: keys and values packed along head_dim,
// affine 4/8-bit, scales and biases per group): one query per (batch, head), softmax(scale q kᵀ) v, GQA. One task
// is one (batch, kv head): its keys are dequantized kQuantKeyBlock at a time into a small buffer (the dequantize
// kernel, bit for bit MLX's values), scored against the kv head's query heads, then the values the same way.
struct QuantAttentionProblem {
  int B, H, Hkv, L, D, group_size, bits, scale_type;
  const float* q;  // (B, H, 1, D), contiguous
  // Packed codes (B, Hkv, L, D * bits / 32) and scales, biases (B, Hkv, L, D / group_size): element strides by
  // (batch, kv head, position); each row contiguous.
  const uint32_t* kw;
  int64_t kws[3];
  const void* kscales;
  const void* kbiases;
  int64_t kss[3];
  int64_t kbs[3];
  const uint32_t* vw;
  int64_t vws[3];
  const void* vscales;
  const void* vbiases;
  int64_t vss[3];
  int64_t vbs[3];
  float scale;
  float* out;  // (B, H, 1, D), contiguous
};

constexpr int kQuantKeyBlock = 64;

// rows query rows (D apart) against nk dequantized keys (D apart): s[r * s_stride + k] = q_r . k_k
using DotsFn = void (*)(const float* q, int rows, int D, const float* keys, int nk, float* s, int64_t s_stride);
// o[r * D + d] += sum_k p[r * p_stride + k] * v[k * D + d]
using AxpysFn = void (*)(const float* p, int rows, int64_t p_stride, const float* v, int nk, int D, float* o);

// In place, each of rows rows of n floats (stride apart): softmax (max subtracted, float32).
using SoftmaxFn = void (*)(float* s, int rows, int n, int64_t stride);

// out[i] = silu(gate[i]) * up[i] for i in [i0, i1).
using SwigluFn = void (*)(const float* gate, const float* up, float* out, int64_t i0, int64_t i1);

// out[i] = gelu(x[i]) for i in [i0, i1).
using GeluFn = void (*)(const float* x, float* out, int64_t i0, int64_t i1);

// logsumexp of the n values at x (type a ScaleType), as a float (the caller casts it to the input's dtype).
using LogSumExpFn = float (*)(const void* x, int type, int64_t n);

struct PrefillKernels {
  const char* name;
  DequantFn dequantize;
  AttentionFn attention;
  SwigluFn swiglu;
  GeluFn gelu;
  DotsFn dots;
  AxpysFn axpys;
  SoftmaxFn softmax;
  LogSumExpFn logsumexp;
  int head_dim_multiple;  // the attention kernel needs D % this == 0
};

PrefillKernels prefill_scalar();
PrefillKernels prefill_avx2();  // requires avx2, fma, f16c at run time
PrefillKernels prefill_avx512();  // the same, with the attention on 512 bits: requires avx512f, avx512bw, avx512vl too

}  // namespace qmv
