// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The MLX primitives of the prefill kernels (prefill.h): QmvDequantize and QmvFlashAttention. CPU only;
// the work is split over the decode kernel's thread pool (qmv.cpp).

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "prefill.h"
#include "qmv.h"

namespace qmv {

namespace {

PrefillKernels prefill_kernels() {
  // The decode kernel's choice decides: "scalar" (PIXTRAL_MLX_QMV_ISA=scalar, or a CPU without AVX2)
  // runs the portable code, an AVX-512 kernel (avx512*) the AVX-512 attention, anything else the AVX2 code.
  const std::string name = isa();
  if (name == "scalar") return prefill_scalar();
  return name.rfind("avx512", 0) == 0 ? prefill_avx512() : prefill_avx2();
}

// A row-major copy of a when its last dimension is not contiguous (rare: views MLX did not copy), or, with
// packed_rows, when its rows are not last-dimension floats apart either.
struct Dense {
  const float* data;
  int64_t strides[4];
  std::shared_ptr<std::vector<float>> keep;
};

Dense dense4(const mx::array& a, bool packed_rows = false) {
  Dense d;
  const auto& st = a.strides();
  const bool rows_ok = !packed_rows || a.shape(2) == 1 || st[2] == a.shape(3);
  if ((st[3] == 1 || a.shape(3) == 1) && rows_ok) {
    d.data = a.data<float>();
    for (int i = 0; i < 4; ++i) d.strides[i] = st[i];
    return d;
  }
  const int n0 = a.shape(0), n1 = a.shape(1), n2 = a.shape(2), n3 = a.shape(3);
  d.keep = std::make_shared<std::vector<float>>(a.size());
  const float* src = a.data<float>();
  float* dst = d.keep->data();
  for (int i = 0; i < n0; ++i)
    for (int j = 0; j < n1; ++j)
      for (int r = 0; r < n2; ++r)
        for (int c = 0; c < n3; ++c) *dst++ = src[i * st[0] + j * st[1] + r * st[2] + c * st[3]];
  d.data = d.keep->data();
  d.strides[3] = 1;
  d.strides[2] = n3;
  d.strides[1] = static_cast<int64_t>(n2) * n3;
  d.strides[0] = static_cast<int64_t>(n1) * n2 * n3;
  return d;
}

// A fresh output buffer of many MiB (glibc maps each anew and unmaps it when freed, so every prefill chunk
// would touch ~75,000 new 4 KiB pages a dequantized projection): asks for 2 MiB pages before the first write
// (transparent huge pages in "madvise" mode, Linux's default), ~500x fewer page faults. Advice only.
void advise_huge(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  if (nbytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + nbytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

// fn(i0, i1) over [0, n) for an elementwise kernel: blocks of at least 64K elements (a multiple of 8), at most 8
// tasks a thread, over the pool.
void parallel_elements(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t per = std::max<int64_t>(65536, ((n + 8 * threads() - 1) / (8 * threads()) + 7) / 8 * 8);
  const int ntasks = static_cast<int>((n + per - 1) / per);
  parallel_for(ntasks, [&](int t) { fn(t * per, std::min(n, (t + 1) * per)); });
}

}  // namespace

std::string prefill_isa() {
  return prefill_kernels().name;
}

///////////////////////////////////////////////////////////////////////////////
// Dequantize
///////////////////////////////////////////////////////////////////////////////

mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.dequantize: " + msg); };
  if (bits != 2 && bits != 4 && bits != 8) fail("bits must be 2, 4 or 8");
  if (group_size <= 0 || group_size % 32 != 0) fail("group_size must be a multiple of 32");
  if (w.dtype() != mx::uint32 || w.ndim() != 2) fail("w must be a 2-D uint32 array");
  const int64_t N = w.shape(0);
  const int64_t K = static_cast<int64_t>(w.shape(1)) * 32 / bits;
  if (K % group_size != 0) fail("the columns must be a multiple of group_size");
  for (const auto* a : {&scales, &biases}) {
    if (a->ndim() != 2 || a->shape(0) != N || a->shape(1) != K / group_size)
      fail("scales and biases must have shape (N, K / group_size)");
    if (a->dtype() != mx::float32 && a->dtype() != mx::float16 && a->dtype() != mx::bfloat16)
      fail("scales and biases must be float32, float16 or bfloat16");
  }
  if (scales.dtype() != biases.dtype()) fail("scales and biases must have the same dtype");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  return mx::array(
      {static_cast<int>(N), static_cast<int>(K)},
      mx::float32,
      std::make_shared<Dequantize>(stream, group_size, bits),
      {w, scales, biases});
}

std::vector<mx::Shape> Dequantize::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), static_cast<int>(static_cast<int64_t>(inputs[0].shape(1)) * 32 / bits_)}};
}

bool Dequantize::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Dequantize&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

void Dequantize::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("QmvDequantize has no GPU implementation (use mx.dequantize)");
}

void Dequantize::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& w = inputs[0];
  const auto& scales = inputs[1];
  const auto& biases = inputs[2];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  advise_huge(out.data<void>(), out.nbytes());
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  // Rows are contiguous along the columns (a row slice of a checkpoint matrix is); a view with strided
  // columns is copied first by the caller (cpu_kernel.dequantize).
  DequantProblem p;
  p.N = w.shape(0);
  p.K = out.shape(1);
  p.group_size = group_size_;
  p.bits = bits_;
  p.w = w.data<uint32_t>();
  p.w_stride = w.strides()[0];
  p.scales = scales.data<void>();
  p.biases = biases.data<void>();
  p.s_stride = scales.strides()[0];
  p.b_stride = biases.strides()[0];
  p.scale_type = scale_type(scales.dtype());
  p.out = out.data<float>();
  const bool dense = (w.strides()[1] == 1 || w.shape(1) == 1) && (scales.strides()[1] == 1 || scales.shape(1) == 1) &&
      (biases.strides()[1] == 1 || biases.shape(1) == 1);
  if (!dense) throw std::invalid_argument("qmv.dequantize: the columns of w, scales and biases must be contiguous");
  const DequantFn fn = prefill_kernels().dequantize;
  encoder.dispatch([p, fn]() {
    // About 8 tasks a thread, 16 rows at least.
    const int per = std::max(16, (p.N + 8 * threads() - 1) / (8 * threads()));
    const int ntasks = (p.N + per - 1) / per;
    parallel_for(ntasks, [&](int t) { fn(p, t * per, std::min(p.N, (t + 1) * per)); });
  });
}

///////////////////////////////////////////////////////////////////////////////
// Attention
///////////////////////////////////////////////////////////////////////////////

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.attention: " + msg); };
  for (const auto* a : {&q, &k, &v}) {
    if (a->dtype() != mx::float32) fail("q, k and v must be float32");
    if (a->ndim() != 4) fail("q, k and v must be 4-D (batch, heads, positions, head_dim)");
  }
  const int B = q.shape(0), H = q.shape(1), Lq = q.shape(2), D = q.shape(3);
  const int Hkv = k.shape(1), Lk = k.shape(2);
  if (k.shape() != v.shape()) fail("k and v must have the same shape");
  if (k.shape(0) != B || k.shape(3) != D) fail("k must have q's batch and head_dim");
  if (Hkv < 1 || H % Hkv != 0) fail("q's heads must be a multiple of k's");
  if (D < 1 || D > kMaxHeadDim || D % prefill_kernels().head_dim_multiple != 0)
    fail("head_dim must be a multiple of " + std::to_string(prefill_kernels().head_dim_multiple) + ", at most 256");
  if (Lq < 1 || Lk < 1) fail("no queries or no keys");
  if (causal && Lq > Lk) fail("causal attention needs at least as many keys as queries");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  return mx::array(
      {B, H, Lq, D}, mx::float32, std::make_shared<FlashAttention>(stream, scale, causal), {q, k, v});
}

std::vector<mx::Shape> FlashAttention::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

bool FlashAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const FlashAttention&>(other);
  return scale_ == o.scale_ && causal_ == o.causal_;
}

void FlashAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("QmvFlashAttention has no GPU implementation (use mx.fast.scaled_dot_product_attention)");
}

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  AttentionProblem p;
  p.B = q.shape(0);
  p.H = q.shape(1);
  p.Lq = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = k.shape(1);
  p.Lk = k.shape(2);
  p.scale = scale_;
  p.causal = causal_;
  p.out = out.data<float>();
  const AttentionFn fn = prefill_kernels().attention;
    // Weak copies, as MLX's own CPU ops capture their inputs: the encoder keeps the buffers alive.
  encoder.dispatch([p,
                    fn,
                    q = mx::array::unsafe_weak_copy(inputs[0]),
                    k = mx::array::unsafe_weak_copy(inputs[1]),
                    v = mx::array::unsafe_weak_copy(inputs[2])]() mutable {
    const Dense dq = dense4(q), dk = dense4(k), dv = dense4(v);
    p.q = dq.data;
    p.k = dk.data;
    p.v = dv.data;
    for (int i = 0; i < 3; ++i) {
      p.qs[i] = dq.strides[i];
      p.ks[i] = dk.strides[i];
      p.vs[i] = dv.strides[i];
    }
    const int qblocks = (p.Lq + kQueryBlock - 1) / kQueryBlock;
    const int ntasks = p.B * p.H * qblocks;
    // Causal: later query blocks see more keys; hand them out first so the long tasks start early.
    parallel_for(ntasks, [&](int t) {
      const int qb = qblocks - 1 - t / (p.B * p.H);
      const int bh = t % (p.B * p.H);
      const int r0 = qb * kQueryBlock;
      fn(p, bh / p.H, bh % p.H, r0, std::min(p.Lq, r0 + kQueryBlock));
    });
  });
}

///////////////////////////////////////////////////////////////////////////////
// SwiGLU
///////////////////////////////////////////////////////////////////////////////

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.swiglu: " + msg); };
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32) fail("gate and up must be float32");
  if (gate.shape() != up.shape()) fail("gate and up must have the same shape");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  // Row-major inputs (a no-op for the usual ones: a projection's output).
  return mx::array(
      gate.shape(),
      mx::float32,
      std::make_shared<Swiglu>(stream),
      {mx::contiguous(gate, false, stream), mx::contiguous(up, false, stream)});
}

void Swiglu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvSwiglu has no GPU implementation (use mlx-lm's swiglu)");
}

void Swiglu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& gate = inputs[0];
  const auto& up = inputs[1];
  if (!gate.flags().row_contiguous || !up.flags().row_contiguous)
    throw std::invalid_argument("qmv.swiglu: gate and up must be row-contiguous");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(gate);
  encoder.set_input_array(up);
  encoder.set_output_array(out);
  const SwigluFn fn = prefill_kernels().swiglu;
  const int64_t n = out.size();
  encoder.dispatch([fn, n, g = gate.data<float>(), u = up.data<float>(), o = out.data<float>()]() {
    parallel_elements(n, [&](int64_t i0, int64_t i1) { fn(g, u, o, i0, i1); });
  });
}

///////////////////////////////////////////////////////////////////////////////
// GELU
///////////////////////////////////////////////////////////////////////////////

mx::array gelu(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("qmv.gelu: x must be float32");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("qmv.gelu: runs on the CPU only");
  return mx::array(x.shape(), mx::float32, std::make_shared<Gelu>(stream), {mx::contiguous(x, false, stream)});
}

void Gelu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvGelu has no GPU implementation (use mlx.nn.gelu)");
}

void Gelu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  if (!x.flags().row_contiguous) throw std::invalid_argument("qmv.gelu: x must be row-contiguous");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  const GeluFn fn = prefill_kernels().gelu;
  const int64_t n = out.size();
  encoder.dispatch([fn, n, in = x.data<float>(), o = out.data<float>()]() {
    parallel_elements(n, [&](int64_t i0, int64_t i1) { fn(in, o, i0, i1); });
  });
}

///////////////////////////////////////////////////////////////////////////////
// LogSumExp
///////////////////////////////////////////////////////////////////////////////

mx::array logsumexp(const mx::array& x, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.logsumexp: " + msg); };
  if (x.dtype() != mx::float32 && x.dtype() != mx::float16 && x.dtype() != mx::bfloat16)
    fail("x must be float32, float16 or bfloat16");
  if (x.ndim() < 1 || x.size() == 0) fail("x must have at least one element");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  auto shape = x.shape();
  shape.back() = 1;
  return mx::array(shape, x.dtype(), std::make_shared<LogSumExp>(stream), {mx::contiguous(x, false, stream)});
}

void LogSumExp::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvLogSumExp has no GPU implementation (use mx.logsumexp)");
}

void LogSumExp::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  if (!x.flags().row_contiguous) throw std::invalid_argument("qmv.logsumexp: x must be row-contiguous");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  const LogSumExpFn fn = prefill_kernels().logsumexp;
  const int64_t n = x.shape(-1);
  const int rows = static_cast<int>(x.size() / n);
  const int type = scale_type(x.dtype());
  const size_t item = x.itemsize();
  const auto dtype = x.dtype();
  encoder.dispatch([fn, n, rows, type, item, dtype, in = x.data<char>(), o = out.data<char>()]() {
    // One row a task (a row's sum is one chain, in MLX's order); one row runs on the calling thread.
    parallel_for(rows, [&](int r) {
      const float v = fn(in + static_cast<int64_t>(r) * n * item, type, n);
      if (dtype == mx::float16) {
        reinterpret_cast<mx::float16_t*>(o)[r] = static_cast<mx::float16_t>(v);
      } else if (dtype == mx::bfloat16) {
        reinterpret_cast<mx::bfloat16_t*>(o)[r] = static_cast<mx::bfloat16_t>(v);
      } else {
        reinterpret_cast<float*>(o)[r] = v;
      }
    });
  });
}

///////////////////////////////////////////////////////////////////////////////
// Decode attention over a quantized KV cache
///////////////////////////////////////////////////////////////////////////////

namespace {

// One (batch, kv head) of decode attention: the kv head's rep query heads (q: rep rows of D, scaled here, as
// mlx-lm scales the queries first) against L keys and values that keys(k0, n) / values(k0, n) hand out as n rows
// of D floats, kQuantKeyBlock at a time (a block stays in L1 while the query heads go over it).
template <class Keys, class Values>
void decode_task(
    const PrefillKernels& kern, int rep, int D, int L, float scale, const float* q0, float* out, Keys keys, Values values) {
  std::vector<float> q(static_cast<size_t>(rep) * D), s(static_cast<size_t>(rep) * L), o(q.size(), 0.0f);
  for (size_t i = 0; i < q.size(); ++i) q[i] = q0[i] * scale;
  for (int k0 = 0; k0 < L; k0 += kQuantKeyBlock) {
    const int nk = std::min(kQuantKeyBlock, L - k0);
    kern.dots(q.data(), rep, D, keys(k0, nk), nk, s.data() + k0, L);
  }
  kern.softmax(s.data(), rep, L, L);  // in float32, max subtracted (mx.softmax precise=True)
  for (int k0 = 0; k0 < L; k0 += kQuantKeyBlock) {
    const int nk = std::min(kQuantKeyBlock, L - k0);
    kern.axpys(s.data() + k0, rep, L, values(k0, nk), nk, D, o.data());
  }
  std::copy(o.begin(), o.end(), out);
}

// Over the quantized cache: each block dequantized into a small buffer (the dequantize kernel, MLX's values).
void quant_attention_task(const QuantAttentionProblem& p, const PrefillKernels& kern, int b, int hk) {
  const int rep = p.H / p.Hkv, D = p.D;
  std::vector<float> buf(static_cast<size_t>(kQuantKeyBlock) * D);
  auto rows = [&](const uint32_t* w, const int64_t* ws, const void* sc, const int64_t* ss, const void* bi,
                  const int64_t* bs, int k0, int nk) -> const float* {
    DequantProblem d;
    d.N = nk;
    d.K = D;
    d.group_size = p.group_size;
    d.bits = p.bits;
    d.w = w + b * ws[0] + hk * ws[1] + k0 * ws[2];
    d.w_stride = ws[2];
    const int64_t es = p.scale_type == kF32 ? 4 : 2;
    d.scales = static_cast<const char*>(sc) + (b * ss[0] + hk * ss[1] + k0 * ss[2]) * es;
    d.biases = static_cast<const char*>(bi) + (b * bs[0] + hk * bs[1] + k0 * bs[2]) * es;
    d.s_stride = ss[2];
    d.b_stride = bs[2];
    d.scale_type = p.scale_type;
    d.out = buf.data();
    kern.dequantize(d, 0, nk);
    return buf.data();
  };
  const int64_t first = (static_cast<int64_t>(b) * p.H + static_cast<int64_t>(hk) * rep) * D;
  decode_task(
      kern, rep, D, p.L, p.scale, p.q + first, p.out + first,
      [&](int k0, int nk) { return rows(p.kw, p.kws, p.kscales, p.kss, p.kbiases, p.kbs, k0, nk); },
      [&](int k0, int nk) { return rows(p.vw, p.vws, p.vscales, p.vss, p.vbiases, p.vbs, k0, nk); });
}

// Over a float32 cache: the rows read where they are (packed: D floats apart, see dense4).
void float_attention_task(const AttentionProblem& p, const PrefillKernels& kern, int b, int hk) {
  const int rep = p.H / p.Hkv;
  const float* k = p.k + b * p.ks[0] + hk * p.ks[1];
  const float* v = p.v + b * p.vs[0] + hk * p.vs[1];
  const int64_t first = (static_cast<int64_t>(b) * p.H + static_cast<int64_t>(hk) * rep) * p.D;
  decode_task(
      kern, rep, p.D, p.Lk, p.scale, p.q + first, p.out + first,
      [&](int k0, int) { return k + k0 * p.ks[2]; },
      [&](int k0, int) { return v + k0 * p.vs[2]; });
}

}  // namespace

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.decode_attention: " + msg); };
  for (const auto* a : {&q, &k, &v})
    if (a->dtype() != mx::float32 || a->ndim() != 4) fail("q, k and v must be float32 and 4-D");
  if (q.shape(2) != 1) fail("one query per head");
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
  if (k.shape() != v.shape() || k.shape(0) != B || k.shape(3) != D) fail("k and v must be (B, Hkv, L, D)");
  if (k.shape(1) < 1 || H % k.shape(1) != 0 || k.shape(2) < 1) fail("q's heads must be a multiple of k's");
  if (D % prefill_kernels().head_dim_multiple != 0 || D > kMaxHeadDim) fail("unsupported head_dim");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  return mx::array(
      {B, H, 1, D},
      mx::float32,
      std::make_shared<DecodeAttention>(stream, scale),
      {mx::contiguous(q, false, stream), k, v});  // the query heads one after the other
}

bool DecodeAttention::is_equivalent(const mx::Primitive& other) const {
  return scale_ == static_cast<const DecodeAttention&>(other).scale_;
}

void DecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvDecodeAttention has no GPU implementation (use mx.fast.scaled_dot_product_attention)");
}

void DecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  AttentionProblem p;
  p.B = inputs[0].shape(0);
  p.H = inputs[0].shape(1);
  p.Lq = 1;
  p.D = inputs[0].shape(3);
  p.Hkv = inputs[1].shape(1);
  p.Lk = inputs[1].shape(2);
  p.scale = scale_;
  p.causal = false;
  p.out = out.data<float>();
  const PrefillKernels kern = prefill_kernels();
  encoder.dispatch([p,
                    kern,
                    q = mx::array::unsafe_weak_copy(inputs[0]),
                    k = mx::array::unsafe_weak_copy(inputs[1]),
                    v = mx::array::unsafe_weak_copy(inputs[2])]() mutable {
    // Key and value rows D floats apart (a KV cache's view is); anything else is copied first.
    const Dense dk = dense4(k, true), dv = dense4(v, true);
    p.q = q.data<float>();  // row-contiguous (decode_attention)
    p.k = dk.data;
    p.v = dv.data;
    for (int i = 0; i < 3; ++i) {
      p.ks[i] = dk.strides[i];
      p.vs[i] = dv.strides[i];
    }
    parallel_for(p.B * p.Hkv, [&](int t) { float_attention_task(p, kern, t / p.Hkv, t % p.Hkv); });
  });
}

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
    mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.quantized_decode_attention: " + msg); };
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8");
  if (q.dtype() != mx::float32 || q.ndim() != 4 || q.shape(2) != 1) fail("q must be float32 (B, H, 1, D)");
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
  if (group_size <= 0 || group_size % 32 != 0 || D % group_size != 0) fail("head_dim must be a multiple of group_size");
  if (D % prefill_kernels().head_dim_multiple != 0 || D > kMaxHeadDim) fail("unsupported head_dim");
  for (const auto* w : {&kw, &vw}) {
    if (w->dtype() != mx::uint32 || w->ndim() != 4 || w->shape(0) != B || w->shape(3) != D * bits / 32)
      fail("keys and values must be packed uint32 (B, Hkv, L, D * bits / 32)");
  }
  if (kw.shape() != vw.shape()) fail("keys and values must have the same shape");
  const int Hkv = kw.shape(1), L = kw.shape(2);
  if (Hkv < 1 || H % Hkv != 0 || L < 1) fail("q's heads must be a multiple of the kv heads, and L >= 1");
  for (const auto* a : {&kscales, &kbiases, &vscales, &vbiases}) {
    if (a->ndim() != 4 || a->shape(0) != B || a->shape(1) != Hkv || a->shape(2) != L || a->shape(3) != D / group_size)
      fail("scales and biases must be (B, Hkv, L, D / group_size)");
    if (a->dtype() != kscales.dtype()) fail("scales and biases must share one dtype");
  }
  if (kscales.dtype() != mx::float32 && kscales.dtype() != mx::float16 && kscales.dtype() != mx::bfloat16)
    fail("scales must be float32, float16 or bfloat16");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  return mx::array(
      {B, H, 1, D},
      mx::float32,
      std::make_shared<QuantDecodeAttention>(stream, scale, group_size, bits),
      {mx::contiguous(q, false, stream), kw, kscales, kbiases, vw, vscales, vbiases});
}

bool QuantDecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantDecodeAttention&>(other);
  return scale_ == o.scale_ && group_size_ == o.group_size_ && bits_ == o.bits_;
}

void QuantDecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvQuantDecodeAttention has no GPU implementation (use mlx-lm's quantized attention)");
}

void QuantDecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  for (const auto& a : inputs)
    if (a.ndim() == 4 && a.strides()[3] != 1 && a.shape(3) != 1)
      throw std::invalid_argument("qmv.quantized_decode_attention: rows must be contiguous");
  const auto& q = inputs[0];
  const auto &kw = inputs[1], &ks = inputs[2], &kb = inputs[3], &vw = inputs[4], &vs = inputs[5], &vb = inputs[6];
  QuantAttentionProblem p;
  p.B = q.shape(0);
  p.H = q.shape(1);
  p.D = q.shape(3);
  p.Hkv = kw.shape(1);
  p.L = kw.shape(2);
  p.group_size = group_size_;
  p.bits = bits_;
  p.scale_type = scale_type(ks.dtype());
  p.q = q.data<float>();
  p.kw = kw.data<uint32_t>();
  p.vw = vw.data<uint32_t>();
  p.kscales = ks.data<void>();
  p.kbiases = kb.data<void>();
  p.vscales = vs.data<void>();
  p.vbiases = vb.data<void>();
  for (int i = 0; i < 3; ++i) {
    p.kws[i] = kw.strides()[i];
    p.vws[i] = vw.strides()[i];
    p.kss[i] = ks.strides()[i];
    p.kbs[i] = kb.strides()[i];
    p.vss[i] = vs.strides()[i];
    p.vbs[i] = vb.strides()[i];
  }
  p.scale = scale_;
  p.out = out.data<float>();
  const PrefillKernels kern = prefill_kernels();
  encoder.dispatch([p, kern]() {
    const int ntasks = p.B * p.Hkv;
    parallel_for(ntasks, [&](int t) { quant_attention_task(p, kern, t / p.Hkv, t % p.Hkv); });
  });
}

}  // namespace qmv
