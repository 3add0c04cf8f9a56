// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// Float weights on the CPU: the DenseMatvec and Widen primitives (qmv.h) over the kernel's thread pool.
//
// MLX's CPU backend multiplies float weights with the BLAS GEMM, which for a decode step (1 to 8 rows of x) reads
// every weight at a fraction of the memory bandwidth: a float32 (1, 5120) @ (5120, 14336) product ran at 5 GB/s on
// a 2-core EPYC whose read bandwidth is 32 GB/s (the GEMM packs the whole weight matrix, on one thread for such a
// skinny product). DenseMatvec reads each weight once for all rows of x, on every core, and takes the weights in
// the checkpoint's bfloat16 or float16, widened exactly as they are read: half the bytes of a float32 copy, with
// the same values. A prompt chunk widens the matrix first (Widen, on every core) and hands it to the GEMM.

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dense.h"
#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "qmv.h"

namespace qmv {

namespace {

struct V1 {
  using vec = float;
  static constexpr int kLanes = 1;
  static vec zero() { return 0.0f; }
  static vec loadx(const float* p) { return *p; }
  template <int T>
  static vec load(const void* w, int64_t i);
  static vec fma(vec a, vec b, vec c) { return a * b + c; }
  static float fma1(float a, float b, float c) { return a * b + c; }
  static float hsum(vec v) { return v; }
  static void prefetch(const char*) {}
  static void store(float* p, vec v) { *p = v; }
  // Independent chains: without -ffp-contract or reassociation each (row, row of x) sum is one chain of
  // multiply-adds, so a few output rows at a time keep the FPU busy.
  template <int M>
  static constexpr int rows_per_block() {
    return M <= 2 ? 4 : M <= 4 ? 2 : 1;
  }
};

}  // namespace
}  // namespace qmv

#include "dense_simd.h"

namespace qmv {
namespace {

template <int T>
V1::vec V1::load(const void* w, int64_t i) {
  return load_scale(w, T, i);
}

// The kernels that go with the decode kernel in use: 512-bit ones with an AVX-512 kernel on full-width vectors
// ("avx512", "avx512-int16"), 256-bit ones with the others on x86 (including "avx512vl-*", the choice where 512-bit
// operations run as two halves), scalar with "scalar".
DenseKernels dense_kernels() {
  const std::string k = isa();
#if defined(__x86_64__) || defined(__i386__)
  if (k.rfind("avx512vl", 0) == 0) return dense_avx512vl();
  if (k.rfind("avx512", 0) == 0) return dense_avx512();
  if (k.rfind("avx", 0) == 0) return dense_avx2();
#endif
  return {"scalar", &dense_simd::rows<V1>, &dense_simd::widen<V1>, kMaxRows};
}

// Output rows per task: about 256 KiB of weights (several passes over them stay in L2), a multiple of 4 rows.
int64_t rows_per_task(int64_t N, int64_t K, int64_t itemsize) {
  const int64_t rows = std::max<int64_t>(4, ((256 << 10) / std::max<int64_t>(1, K * itemsize)) / 4 * 4);
  return std::min(rows, N);
}

}  // namespace

std::string dense_isa() {
  return dense_kernels().name;
}

mx::array dense_matvec(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.dense_matvec: " + msg); };
  if (x.dtype() != mx::float32) fail("x must be float32");
  if (x.ndim() < 1 || x.shape(-1) == 0) fail("x must have a last dimension");
  if (w.ndim() != 2) fail("w must be 2-D");
  if (w.dtype() != mx::float32 && w.dtype() != mx::bfloat16 && w.dtype() != mx::float16)
    fail("w must be float32, bfloat16 or float16");
  if (w.shape(1) != x.shape(-1))
    fail("w has " + std::to_string(w.shape(1)) + " columns, x has " + std::to_string(x.shape(-1)));
  if (x.size() / x.shape(-1) < 1) fail("x must have at least one row");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  mx::Shape out_shape = x.shape();
  out_shape.back() = w.shape(0);
  // The weights are read as whole contiguous rows: a copy where they are a view (a layer's evaluated weights pass
  // as they are).
  const bool whole = w.is_available() && w.flags().row_contiguous;
  return mx::array(out_shape, mx::float32, std::make_shared<DenseMatvec>(stream),
                   {x, whole ? w : mx::contiguous(w, false, stream)});
}

std::vector<mx::Shape> DenseMatvec::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape out_shape = inputs[0].shape();
  out_shape.back() = inputs[1].shape(0);
  return {out_shape};
}

void DenseMatvec::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("QmvDenseMatvec has no GPU implementation (use x @ w.T)");
}

void DenseMatvec::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);

  const int K = x.shape(-1);
  const int M = static_cast<int>(x.size() / K);
  const int64_t N = w.shape(0);
  std::vector<int64_t> row_offset(M);
  for (int m = 0; m < M; ++m) row_offset[m] = mx::elem_to_loc(static_cast<int64_t>(m) * K, x.shape(), x.strides());
  const int64_t col_stride = x.strides().back();
  const float* xp = x.data<float>();
  const void* wp = w.data<void>();
  const int type = scale_type(w.dtype());
  const int64_t itemsize = w.itemsize();
  float* op = out.data<float>();
  const DenseKernels kernels = dense_kernels();
  encoder.dispatch([=, row_offset = std::move(row_offset)]() {
    // x contiguous, M rows of K (a view with strided rows or columns is gathered; it is small).
    std::vector<float> xc;
    const float* xr = xp + row_offset[0];
    bool contiguous = col_stride == 1;
    for (int m = 0; m < M && contiguous; ++m) contiguous = row_offset[m] == row_offset[0] + static_cast<int64_t>(m) * K;
    if (!contiguous) {
      xc.resize(static_cast<size_t>(M) * K);
      for (int m = 0; m < M; ++m)
        for (int k = 0; k < K; ++k) xc[static_cast<size_t>(m) * K + k] = xp[row_offset[m] + k * col_stride];
      xr = xc.data();
    }
    // Passes of at most the kernel's max_rows rows (kernels.h); each task's weights stay in L2 between passes.
    const int passes = passes_for(M, kernels.max_rows);
    const int64_t per = rows_per_task(N, K, itemsize);
    const int ntasks = static_cast<int>((N + per - 1) / per);
    parallel_for(ntasks, [&](int t) {
      const int64_t n0 = t * per, n1 = std::min(N, n0 + per);
      for (int i = 0; i < passes; ++i) {
        const int m0 = pass_first(i, M, kernels.max_rows), rows = pass_first(i + 1, M, kernels.max_rows) - m0;
        DenseProblem p{rows, K, xr + static_cast<int64_t>(m0) * K, wp, type, op + static_cast<int64_t>(m0) * N, N};
        kernels.rows(p, n0, n1);
      }
    });
  });
}

mx::array widen(const mx::array& w, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.widen: " + msg); };
  if (w.dtype() != mx::bfloat16 && w.dtype() != mx::float16) fail("w must be bfloat16 or float16");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  const bool whole = w.is_available() && w.flags().row_contiguous;
  return mx::array(w.shape(), mx::float32, std::make_shared<Widen>(stream),
                   {whole ? w : mx::contiguous(w, false, stream)});
}

void Widen::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvWiden has no GPU implementation (use astype)");
}

void Widen::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& w = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(w);
  encoder.set_output_array(out);
  const void* src = w.data<void>();
  float* dst = out.data<float>();
  const int type = scale_type(w.dtype());
  const int64_t n = w.size();
  const DenseKernels kernels = dense_kernels();
  encoder.dispatch([=]() {
    constexpr int64_t per = 1 << 18;  // elements per task (1 MiB written)
    const int ntasks = static_cast<int>((n + per - 1) / per);
    parallel_for(ntasks, [&](int t) { kernels.widen(src, type, dst, t * per, std::min(n, (t + 1) * per)); });
  });
}

}  // namespace qmv
