// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// pixtral_mlx._qmv: the Python face of the QuantizedMatvec primitive. Built with NB_DOMAIN mlx so that
// mx.array, streams and devices are the very types mlx.core registers (import mlx.core first).

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"
#include "qmv.h"

namespace nb = nanobind;
using namespace nb::literals;

#define QMV_STR2(x) #x
#define QMV_STR(x) QMV_STR2(x)

NB_MODULE(_qmv, m) {
  m.doc() = "Quantized matvec for MLX's CPU backend (AVX-512 / AVX2 / scalar, multithreaded).";

  m.def(
      "quantized_matvec",
      &qmv::quantized_matvec,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "group_size"_a,
      "bits"_a,
      "interleaved"_a = false,
      "stream"_a = nb::none(),
      R"(x @ dequantize(w, scales, biases).T for float32 x with at most 8 rows (affine mode, 4 or 8 bits); with
interleaved=True, w, scales and biases in the interleaved layout (4-bit, groups of a multiple of 64, an int16 kernel).)");
  m.def(
      "interleave",
      &qmv::interleave,
      "a"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "The interleaved layout of a (N, C) array (N a multiple of 8, 2- or 4-byte elements), over the thread pool.");
  m.def(
      "dequantize",
      &qmv::dequantize,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "group_size"_a,
      "bits"_a,
      "stream"_a = nb::none(),
      "dequantize(w, scales, biases) in float32 (affine mode, 2, 4 or 8 bits), over the thread pool.");
  m.def(
      "attention",
      &qmv::attention,
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "causal"_a = false,
      "stream"_a = nb::none(),
      "softmax(scale q k^T [causal]) v for float32 (B, H, Lq, D) q and (B, Hkv, Lk, D) k, v, never holding the "
      "score matrix.");
  m.def(
      "swiglu",
      &qmv::swiglu,
      "gate"_a,
      "up"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "silu(gate) * up for float32 arrays of one shape, bit for bit MLX's CPU ops, over the thread pool.");
  m.def(
      "gelu",
      &qmv::gelu,
      "x"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "MLX's exact nn.gelu for a float32 array, bit for bit MLX's CPU ops, 8 lanes at a time over the thread pool.");
  m.def(
      "logsumexp",
      &qmv::logsumexp,
      "x"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "logsumexp over the last axis (keepdims) of float32/float16/bfloat16 x, bit for bit MLX's CPU "
      "mx.logsumexp, the exponentials 8 lanes at a time and the rows over the thread pool.");
  m.def(
      "decode_attention",
      &qmv::decode_attention,
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "stream"_a = nb::none(),
      "softmax(scale q k^T) v for one float32 query per head over float32 keys and values (GQA).");
  m.def(
      "quantized_decode_attention",
      &qmv::quantized_decode_attention,
      "q"_a,
      "kw"_a,
      "kscales"_a,
      "kbiases"_a,
      "vw"_a,
      "vscales"_a,
      "vbiases"_a,
      nb::kw_only(),
      "scale"_a,
      "group_size"_a,
      "bits"_a,
      "stream"_a = nb::none(),
      "softmax(scale q k^T) v for one float32 query per head over an mlx-lm quantized KV cache (4/8-bit).");
  m.def(
      "dense_matvec",
      &qmv::dense_matvec,
      "x"_a,
      "w"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "x @ w.T for float32 x (passes of a few rows over each block of w: 8, 4 on AVX2) and w (N, K) in float32, "
      "bfloat16 or float16, widened exactly as it is read: float32 out, over the thread pool.");
  m.def(
      "widen",
      &qmv::widen,
      "w"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "w (bfloat16 or float16) as float32, the same values, over the thread pool.");
  m.def("dense_isa", &qmv::dense_isa, "The float-weight kernels in use: 'avx512vl', 'avx512', 'avx2' or 'scalar'.");
  m.def("prefill_isa", &qmv::prefill_isa, "The prefill kernels in use: 'avx2' or 'scalar'.");
  m.def("isa", &qmv::isa, "The kernel in use: 'avx512', 'avx2' or 'scalar'.");
  m.def("supported_isas", &qmv::supported_isas, "Kernels this CPU can run, best first.");
  m.def("gemm_isa", &qmv::gemm_isa,
        "The product for more than 8 rows of x from 4-bit codes that goes with the kernel in use ('' for none).");
  m.def("select_isa", &qmv::select_isa, "name"_a, "Use kernel `name` ('auto': the best); returns the choice.");
  m.def("threads", &qmv::threads, "Threads one call splits its output rows over.");
  m.def("set_threads", &qmv::set_threads, "n"_a, "Set the thread count (n <= 0: the default); returns it.");
  m.def(
      "huge_pages",
      [](const std::vector<mx::array>& arrays, bool collapse) {
        qmv::HugePages r;
        {
          nb::gil_scoped_release release;
          r = qmv::huge_pages(arrays, collapse);
        }
        return nb::make_tuple(r.bytes, r.advised, r.collapsed, r.error);
      },
      "arrays"_a,
      "collapse"_a = true,
      "Back evaluated arrays with transparent huge pages (Linux): (bytes, advised, collapsed, errno).");
  m.attr("mlx_version") = QMV_STR(MLX_VERSION_MAJOR) "." QMV_STR(MLX_VERSION_MINOR) "." QMV_STR(MLX_VERSION_PATCH);
  m.attr("nanobind_version") =
      QMV_STR(NB_VERSION_MAJOR) "." QMV_STR(NB_VERSION_MINOR) "." QMV_STR(NB_VERSION_PATCH);
}
