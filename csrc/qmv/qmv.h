// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// QuantizedMatvec: an MLX primitive for out = x @ dequantize(w, scales, biases).T with x holding a
// few rows (1..8) and w 4- or 8-bit affine quantized -- the one-token (and few-token) decode matvec.
// CPU only: eval_cpu runs a SIMD kernel picked at run time (AVX-512, AVX2 or scalar) with the output
// rows split over a small thread pool. Same result as mx.quantized_matmul(x, w, scales, biases,
// transpose=True, group_size, bits) up to float32 rounding.

#pragma once

#include <functional>
#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace qmv {

constexpr int kMaxRowsOfX = 8;

mx::array quantized_matvec(
    const mx::array& x,       // (..., K) float32, at most 8 rows in all
    const mx::array& w,       // (N, K * bits / 32) uint32
    const mx::array& scales,  // (N, K / group_size) float32, float16 or bfloat16
    const mx::array& biases,  // like scales
    int group_size,
    int bits,
    bool interleaved = false,  // w, scales, biases in kernels.h's interleaved layout (4-bit, int16 kernels)
    mx::StreamOrDevice s = {});

class QuantizedMatvec : public mx::Primitive {
 public:
  QuantizedMatvec(mx::Stream stream, int group_size, int bits, bool interleaved = false)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits), interleaved_(interleaved) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const char* name() const override {
    return "QuantizedMatvec";
  }

  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
  bool interleaved_;
};

// kernels.h's interleaved layout of a (N, C) array (N a multiple of 8; 2- or 4-byte elements): each block of 8 rows
// transposed, row 8 b + r's column c at flat index (8 b) * C + 8 c + r. A copy made over the thread pool (the same
// values as MLX's reshape / transpose / reshape, several times faster at load).
mx::array interleave(const mx::array& a, mx::StreamOrDevice s = {});

class Interleave : public mx::UnaryPrimitive {
 public:
  explicit Interleave(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  const char* name() const override {
    return "QmvInterleave";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// kernels.h's ScaleType of a float dtype (kF32 for float32 and anything else).
int scale_type(mx::Dtype t);

// Run-time configuration (process-wide).
std::string isa();                        // the kernel in use: "avx512", "avx2" or "scalar"
std::vector<std::string> supported_isas();  // what this CPU can run, best first
std::string gemm_isa();  // the many-row product from 4-bit codes in use with the kernel ("" for none)
std::string select_isa(const std::string& name);  // "" or "auto" picks the best; returns the choice
int threads();
int set_threads(int n);  // n <= 0: the default (CPUs this process may run on, at most 16)

// Backs the evaluated arrays' buffers with transparent huge pages: madvise(MADV_HUGEPAGE) on every
// whole 2 MiB page inside each buffer and, with collapse, madvise(MADV_COLLAPSE) (Linux 6.1+) to
// move the pages that already hold data now instead of whenever khugepaged gets to them. Decode
// reads every weight once per token; with 4 KiB pages the walk through them is held back by TLB
// misses (in a VM, two-level page walks): a streaming read measured 22 GB/s on 4 KiB pages and
// 28-30 GB/s on 2 MiB pages on the same 2-core Xeon.
struct HugePages {
  int64_t bytes = 0;      // bytes of the arrays
  int64_t advised = 0;    // bytes marked MADV_HUGEPAGE
  int64_t collapsed = 0;  // bytes collapsed into huge pages now
  int error = 0;          // errno of the last madvise that failed (0: none)
};
HugePages huge_pages(const std::vector<mx::array>& arrays, bool collapse);

// Runs fn(0 .. ntasks - 1) over the kernel's thread pool (threads() threads, the caller included).
void parallel_for(int ntasks, const std::function<void(int)>& fn);

///////////////////////////////////////////////////////////////////////////////
// Prefill (prefill.cpp): many-token work, same thread pool, same ISA choice (AVX2 unless the
// decode kernel was set to "scalar"; the AVX-512 CPUs run the AVX2 code).
///////////////////////////////////////////////////////////////////////////////

std::string prefill_isa();

// dequantize(w, scales, biases) as float32 (N, K): affine mode, 2/4/8 bits, group_size % 32 == 0.
mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// softmax(scale q kᵀ [causal]) v for float32 q (B, H, Lq, D), k and v (B, Hkv, Lk, D).
mx::array attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    bool causal,
    mx::StreamOrDevice s = {});

// silu(gate) * up for float32 arrays of one shape, row-contiguous: bit for bit MLX's CPU (prefill.h).
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

class Swiglu : public mx::UnaryPrimitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  const char* name() const override {
    return "QmvSwiglu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// MLX's exact nn.gelu, x * (1 + erf(x / sqrt 2)) / 2, for a float32 array: bit for bit MLX's CPU (prefill.h).
mx::array gelu(const mx::array& x, mx::StreamOrDevice s = {});

class Gelu : public mx::UnaryPrimitive {
 public:
  explicit Gelu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  const char* name() const override {
    return "QmvGelu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// logsumexp over the last axis (keepdims) of float32, float16 or bfloat16 x: bit for bit MLX's CPU `mx.logsumexp`
// (prefill.h), its rows over the thread pool.
mx::array logsumexp(const mx::array& x, mx::StreamOrDevice s = {});

class LogSumExp : public mx::UnaryPrimitive {
 public:
  explicit LogSumExp(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = 1;
    return {shape};
  }
  const char* name() const override {
    return "QmvLogSumExp";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// softmax(scale q kᵀ) v for one float32 query per head (B, H, 1, D) over mlx-lm's quantized KV cache: keys and
// values packed (B, Hkv, L, D * bits / 32) uint32 with scales and biases (B, Hkv, L, D / group_size).
mx::array quantized_decode_attention(
    const mx::array& q,
    const mx::array& kw,
    const mx::array& kscales,
    const mx::array& kbiases,
    const mx::array& vw,
    const mx::array& vscales,
    const mx::array& vbiases,
    float scale,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// softmax(scale q kᵀ) v for one float32 query per head (B, H, 1, D) over float32 k, v (B, Hkv, L, D).
mx::array decode_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    mx::StreamOrDevice s = {});

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream stream, float scale) : mx::UnaryPrimitive(stream), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  const char* name() const override {
    return "QmvDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
};

class QuantDecodeAttention : public mx::UnaryPrimitive {
 public:
  QuantDecodeAttention(mx::Stream stream, float scale, int group_size, int bits)
      : mx::UnaryPrimitive(stream), scale_(scale), group_size_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  const char* name() const override {
    return "QmvQuantDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int group_size_;
  int bits_;
};

class Dequantize : public mx::Primitive {
 public:
  Dequantize(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "QmvDequantize";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

class FlashAttention : public mx::Primitive {
 public:
  FlashAttention(mx::Stream stream, float scale, bool causal) : mx::Primitive(stream), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "QmvFlashAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool causal_;
};

///////////////////////////////////////////////////////////////////////////////
// Float weights (dense.cpp)
///////////////////////////////////////////////////////////////////////////////

// x @ w.T for float32 x (any number of rows, in passes of at most 8 over each block of weights) and w (N, K) in
// float32, bfloat16 or float16: float32 out, the products and sums in float32.
mx::array dense_matvec(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});
// w (bfloat16 or float16) as float32, the same values, over the thread pool.
mx::array widen(const mx::array& w, mx::StreamOrDevice s = {});
std::string dense_isa();  // the dense kernels in use: "avx512", "avx2" or "scalar"

class DenseMatvec : public mx::Primitive {
 public:
  explicit DenseMatvec(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "QmvDenseMatvec";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class Widen : public mx::UnaryPrimitive {
 public:
  explicit Widen(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  const char* name() const override {
    return "QmvWiden";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

}  // namespace qmv
