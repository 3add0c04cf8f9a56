// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The interface between the MLX primitive (qmv.cpp) and the per-ISA matvec kernels
// (kernel_avx512.cpp, kernel_avx2.cpp, kernel_scalar.cpp). Nothing here depends on MLX.
//
// Problem: out[m, n] = sum_k x[m, k] * (scale[n, g(k)] * q[n, k] + bias[n, g(k)]) for m < M <= 8,
// with q the 4- or 8-bit affine codes MLX packs into uint32 words, low bits first.
// Kernels compute it as sum_g scale[n, g] * dot(q[n, g], x[m, g]) + bias[n, g] * xsum[m, g].

#pragma once

#include <cstdint>
#include <type_traits>

namespace qmv {

constexpr int kMaxRows = 8;  // rows of x handled in one pass over the weights

// More rows of x go in passes of at most max_rows rows, as even as they go (11 rows: 5 + 6): pass i of
// passes_for(M, max_rows) takes rows [pass_first(i, M, max_rows), pass_first(i + 1, M, max_rows)).
inline int passes_for(int M, int max_rows = kMaxRows) {
  return (M + max_rows - 1) / max_rows;
}
inline int pass_first(int i, int M, int max_rows = kMaxRows) {
  return static_cast<int>(static_cast<int64_t>(i) * M / passes_for(M, max_rows));
}

enum ScaleType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Problem {
  int M;           // rows of x (1..kMaxRows)
  int N;           // output features (rows of w)
  int K;           // input features
  int group_size;  // 32, 64 or 128 (any multiple of 32)
  int bits;        // 4 or 8
  const uint32_t* w;       // N rows, w_stride uint32 words apart
  int64_t w_stride;
  const void* scales;      // N rows of K / group_size, s_stride elements apart, dtype scale_type
  const void* biases;      // same layout as scales (b_stride)
  int64_t s_stride;
  int64_t b_stride;
  int scale_type;
  const float* xp;    // x prepared for the kernel's layout: M rows of K floats (see Kernel)
  const float* xsum;  // M rows of K / group_size group sums of x
  float* out;         // M rows of N floats
  // Kernels with int16 x (Kernel::int16), 4-bit weights, group_size a multiple of 64 and K of the
  // kernel's int16_chunk C (64 or 128); else null.
  // xq: x rounded to int16, chunk-major as interleave: for chunk c of C elements and row m, the C
  // values xq[(c * M + m) * C + j * C / 4 + l] = round(x[m, C c + 4 l + j] / xscale[m, g]) (j < 4,
  // l < C / 4: lane l of the weights' 16-bit lanes holds codes 4 l .. 4 l + 3), 64-byte aligned;
  // xscale: M rows of K / group_size steps, max |x| over the group / 32767; xerr: as many group sums
  // of the rounding errors, step * sum(xq) - sum(x). Per group the kernel adds
  // scale * step * dot(q, xq) - 7.5 * scale * xerr, which is scale * dot(q, x) plus an error of
  // scale * dot(q - 7.5, xq * step - x): the codes' rounding error weighted by centred codes, about half
  // of what it is uncentred for codes spread over 0..15.
  const int16_t* xq = nullptr;
  // Kernels with int8 x (Kernel::int8), the same problems: x rounded to int8 with step max |x| / 127 per group,
  // chunks of 64 elements, xq8[(c * M + m) * 64 + j * 32 + b] = round(x[m, 64 c + 2 b + j] / xscale[m, g]) (the
  // low then the high nibbles of the weights' 32 bytes), 64-byte aligned; xscale and xerr as for xq. Else null.
  const int8_t* xq8 = nullptr;
  const float* xscale = nullptr;
  const float* xerr = nullptr;
};

// Computes output features [n0, n1) for all M rows of x.
using RowsFn = void (*)(const Problem&, int n0, int n1);

struct Kernel {
  const char* name;
  // How the kernel wants x laid out for 4-bit weights: within every chunk of x_chunk elements the
  // even-indexed elements come first, then the odd-indexed ones (0 = natural order). 8-bit always
  // uses natural order.
  int x_chunk;
  RowsFn rows;
  // 4-bit with x_chunk: the odd elements o are stored as o / 16 and the even ones e as e - o / 16
  // (the AVX2 kernel's form: see kernel_avx2.cpp).
  bool fold = false;
  // x chunk-major instead of row-major: for each chunk of C elements (C = x_chunk for 4-bit, 8 for
  // 8-bit) the M rows' pieces one after the other, xp[(chunk * M + m) * C + j]: one pointer walks all
  // rows of x (no per-row offsets to hold in registers).
  bool interleave = false;
  // 4-bit weights with group_size a multiple of 64 take x as int16 (Problem::xq), one step per group
  // of every row of x; other problems use the float layout above.
  bool int16 = false;
  // Elements of x per chunk of xq (the weights' bytes per vector times two): 64 for AVX2, 128 for AVX-512.
  int int16_chunk = 64;
  // With int16: x as int8 instead (Problem::xq8; chunks of 64), opt-in.
  bool int8 = false;
};

// dispatch's switch over the rows of x, for one BITS.
template <int BITS, class F>
inline void dispatch_rows(const Problem& p, F& f) {
  using B = std::integral_constant<int, BITS>;
  switch (p.M) {
    case 1: return f(std::integral_constant<int, 1>{}, B{});
    case 2: return f(std::integral_constant<int, 2>{}, B{});
    case 3: return f(std::integral_constant<int, 3>{}, B{});
    case 4: return f(std::integral_constant<int, 4>{}, B{});
    case 5: return f(std::integral_constant<int, 5>{}, B{});
    case 6: return f(std::integral_constant<int, 6>{}, B{});
    case 7: return f(std::integral_constant<int, 7>{}, B{});
    default: return f(std::integral_constant<int, 8>{}, B{});
  }
}

// Calls f(std::integral_constant<int, M>{}, std::integral_constant<int, BITS>{}) with the problem's
// rows of x (M, 1..kMaxRows) and bits (4 or 8) as constants: how every kernel's `rows` instantiates its
// loop for each case. f is a lambda local to one kernel's translation unit, so each instantiation is
// local to that unit too (compiled for its ISA; none is shared between kernels at link time).
template <class F>
inline void dispatch(const Problem& p, F f) {
  static_assert(kMaxRows == 8, "dispatch_rows has one case per row count");
  if (p.bits == 4) {
    dispatch_rows<4>(p, f);
  } else {
    dispatch_rows<8>(p, f);
  }
}

Kernel kernel_scalar();
Kernel kernel_avx2();    // requires avx2, fma, f16c at run time
Kernel kernel_avx2_int16();  // the same, with int16 x for 4-bit weights
Kernel kernel_avx2_vnni();   // avx2-int16 with AVX-VNNI (avxvnni at run time too): the same results
Kernel kernel_avx512vl_vnni();  // avx2-int16 with AVX512-VNNI on 256 bits (avx512vl, avx512vnni): the same results
Kernel kernel_avx512vl_int8();  // the same CPUs, int8 x (opt-in: never the default)
Kernel kernel_avx2_int8();      // int8 x on AVX2 (opt-in): the same results as avx512vl-int8
Kernel kernel_avx512();  // requires avx512f, avx512bw, avx512vl, fma, f16c at run time
Kernel kernel_avx512_int16();  // the same and avx512vnni, with int16 x for 4-bit weights

// Prefill's product from the 4-bit codes (gemm_int16.cpp): out (M x N, row-major) = x w^T for any M, 4-bit
// weights, x rounded to int16 per (row, group) as for Problem::xq but in natural order: xq[m * K + k].
struct GemmProblem {
  int M, N, K, group_size;  // group_size: a multiple of 32
  const uint32_t* w;
  int64_t w_stride;
  const void* scales;
  const void* biases;
  int64_t s_stride, b_stride;
  int scale_type;
  const int16_t* xq;     // M rows of K
  const float* xscale;   // M rows of K / group_size steps (max |x| / 32767)
  const float* xerr;     // step * sum(xq) - sum(x) per group
  const float* xsum;     // sum(x) per group
  float* out;            // M rows of N
};

// The interleaved layout of 4-bit weights (N a multiple of 8, contiguous arrays of MLX's shapes): output rows in
// blocks of 8, and within a block the 8 rows' 32-bit words of codes alternate, word w of row 8 b + r at
// w_int[(8 b) * W + 8 w + r] (W = K / 8 words per row); scales and biases likewise, group g of row 8 b + r at
// s_int[(8 b) * G + 8 g + r]. It is the MLX layout with each block of 8 rows transposed (`cpu_kernel.interleave`), the
// same bytes, and one 32-byte load then holds 8 codes of each of 8 outputs: the rows of a batch share each unpacking
// and each output's group scaling is one lane of a vector operation (Gemm::matvec).
struct Gemm {
  const char* name;  // the matvec kernel family it goes with
  int strip;         // output rows per task unit: rows(p, n0, n1) takes n0 a multiple of it
  void (*rows)(const GemmProblem&, int n0, int n1);
  // At most kMaxRows rows of x on interleaved weights (4-bit, group_size a multiple of 64): out rows [n0, n1),
  // multiples of 8, with Problem::xq in the 64-element chunk layout (int16_chunk 64), xscale, xerr and xsum. Each
  // output gets the same bits as `rows` gives it for the same row of x, whatever the other rows.
  void (*matvec)(const Problem&, int n0, int n1);
  // Row m of M rows of row-contiguous x (K elements) for `matvec`: its int16 values in the 64-element chunk layout,
  // and per group its step, error and sum, the values qmv.cpp's quantize_x16 and group_sums give, bit for bit.
  void (*prepare_x)(const float* xm, int m, int M, int K, int group_size, int16_t* xq, float* step, float* err,
                    float* sums);
};

Gemm gemm_int16_avx512vl();  // vpdpwssd on 256 bits: avx512vl, avx512vnni (and avx512bw) at run time
Gemm gemm_int16_avx2();      // vpmaddwd and vpaddd: avx2, fma, f16c

// Software prefetch of the weights. A hardware prefetcher follows one stream well, but a kernel that
// walks R rows at once has R short streams and, measured on a Xeon (2 cores, 4-bit 4096x5120 from
// memory), read 6.2 GB/s per core with only a short prefetch of its own and 9.9 GB/s when it fetches
// into L2 the same bytes of a row this far ahead: then memory and arithmetic overlap instead of taking
// turns. Rows at or past the caller's limit are never fetched (they may belong to another thread).
#ifndef QMV_PREFETCH_BYTES
#define QMV_PREFETCH_BYTES (32 * 1024)
#endif
constexpr int64_t kPrefetchBytes = QMV_PREFETCH_BYTES;

// Rows ahead to prefetch for rows of row_bytes (a multiple of R, at least R), given a block of
// rows [n, limit): 0 (fetch nothing new) once that row would reach the limit.
template <int R>
inline int prefetch_rows(int n, int limit, int64_t row_bytes) {
  int64_t d = (kPrefetchBytes + row_bytes - 1) / row_bytes;
  d = (d + R - 1) / R * R;
  return n + d + R <= limit ? static_cast<int>(d) : 0;
}

// Into L2 (locality 1 is prefetcht2 on x86); portable, so every kernel can use it.
inline void prefetch_l2(const void* p) {
  __builtin_prefetch(p, 0, 1);
}

// The first kPrefetchBytes of rows [n0, n1) when they are one contiguous stream (one K block): the
// row-ahead prefetch in the loop covers the rest, and nothing fetched the start of this range.
inline void prefetch_start(const Problem& p, int n0, int n1, int64_t row_bytes) {
  if (p.w_stride * 4 != row_bytes) return;
  const char* base = reinterpret_cast<const char*>(p.w + static_cast<int64_t>(n0) * p.w_stride);
  const int64_t span = static_cast<int64_t>(n1 - n0) * row_bytes;
  for (int64_t o = 0; o < span && o < kPrefetchBytes; o += 64) prefetch_l2(base + o);
}

// float <- IEEE half / bfloat16 bits, portable (used by the scalar kernel and for tails).
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float load_scale(const void* p, int type, int64_t i) {
  switch (type) {
    case kF16:
      return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

}  // namespace qmv
