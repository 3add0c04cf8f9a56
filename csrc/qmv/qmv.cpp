// Copyright © 2026 pixtral-mlx authors. Apache-2.0.

#include "qmv.h"

#include <sched.h>
#include <sys/mman.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"

namespace qmv {

///////////////////////////////////////////////////////////////////////////////
// Kernel choice
///////////////////////////////////////////////////////////////////////////////

namespace {

#if defined(__x86_64__) || defined(__i386__)
// What the CPU reports at run time (available_kernels' only use, itself x86-only).
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512_vnni() {
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx_vnni() {
  return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
}

// AMD Zen 4 (family 0x19; Zen 3, the same family, has no AVX-512) runs each 512-bit instruction as two 256-bit
// halves: there the 256-bit int16 loop reads more weight bytes per cycle than the 512-bit one (one row of x:
// ~36 against ~28 GB/s, at the memory bound where the 512-bit one is not; benchmarks/README.md).
bool cpu_splits_512_bit_ops() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__builtin_cpu_is("amd") || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned base = (eax >> 8) & 0xf;
  const unsigned family = base == 0xf ? base + ((eax >> 20) & 0xff) : base;
  return family == 0x19;
}
#endif

std::vector<Kernel> available_kernels() {
  std::vector<Kernel> ks;
#if defined(__x86_64__) || defined(__i386__)
  // The first is the default: the int16 form where the CPU has one, its widest vectors unless they run as halves.
  const bool vnni512 = cpu_has_avx512_vnni(), halves = vnni512 && cpu_splits_512_bit_ops();
  if (halves) ks.push_back(kernel_avx512vl_vnni());
  if (vnni512) ks.push_back(kernel_avx512_int16());
  if (cpu_has_avx512()) ks.push_back(kernel_avx512());
  if (cpu_has_avx_vnni()) ks.push_back(kernel_avx2_vnni());
  if (vnni512 && !halves) ks.push_back(kernel_avx512vl_vnni());
  if (vnni512) ks.push_back(kernel_avx512vl_int8());  // opt-in only: never first
  if (cpu_has_avx2()) {
    ks.push_back(kernel_avx2_int16());
    ks.push_back(kernel_avx2());
    ks.push_back(kernel_avx2_int8());  // opt-in only: never first
  }
#endif
  ks.push_back(kernel_scalar());
  return ks;
}

std::mutex config_mutex;
Kernel current_kernel = {nullptr, 0, nullptr};
int current_threads = 0;

Kernel get_kernel() {
  std::lock_guard<std::mutex> lock(config_mutex);
  if (current_kernel.rows == nullptr) {
    const char* env = std::getenv("PIXTRAL_MLX_QMV_ISA");
    auto ks = available_kernels();
    current_kernel = ks.front();
    if (env != nullptr) {
      for (auto& k : ks)
        if (std::string(env) == k.name) current_kernel = k;
    }
  }
  return current_kernel;
}

// The prefill product from 4-bit codes that goes with the kernel in use: only with an int16 (or int8) matvec
// kernel, whose precision contract it shares, and of its family (an avx512 one: vpdpwssd; an avx2 one:
// vpmaddwd), as the prefill kernels follow it; none with the float kernels or off x86.
const Gemm* get_gemm() {
#if defined(__x86_64__) || defined(__i386__)
  static const Gemm evex = gemm_int16_avx512vl();
  static const Gemm avx2 = gemm_int16_avx2();
  const Kernel k = get_kernel();
  if (!k.int16) return nullptr;
  if (std::string(k.name).rfind("avx512", 0) == 0 && cpu_has_avx512_vnni()) return &evex;
  if (cpu_has_avx2()) return &avx2;
#endif
  return nullptr;
}

int default_threads() {
  int n = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("PIXTRAL_MLX_QMV_THREADS")) {
    int v = std::atoi(env);
    if (v > 0) n = v;
  }
  return std::clamp(n, 1, 16);
}

int get_threads() {
  std::lock_guard<std::mutex> lock(config_mutex);
  if (current_threads <= 0) current_threads = default_threads();
  return current_threads;
}

///////////////////////////////////////////////////////////////////////////////
// Thread pool: the caller works too, so concurrent callers (two streams) always make progress.
///////////////////////////////////////////////////////////////////////////////

struct Job {
  std::function<void(int)> fn;
  int ntasks = 0;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    int i;
    while ((i = next.fetch_add(1, std::memory_order_relaxed)) < ntasks) {
      fn(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == ntasks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

class Pool {
 public:
  // Never destroyed (threads blocked on the queue simply end with the process).
  static Pool& get() {
    static Pool* pool = new Pool();
    return *pool;
  }

  void run(int ntasks, int nthreads, std::function<void(int)> fn) {
    auto job = std::make_shared<Job>();
    job->fn = std::move(fn);
    job->ntasks = ntasks;
    int helpers = std::min(nthreads, ntasks) - 1;
    if (helpers > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(workers_.size()) < helpers) workers_.emplace_back([this] { loop(); });
      for (int i = 0; i < helpers; ++i) queue_.push_back(job);
      queued_.fetch_add(helpers, std::memory_order_release);
    }
    if (helpers > 0) cv_.notify_all();
    job->work();
    if (job->done.load(std::memory_order_acquire) < ntasks) {
      // Spin (the other threads' last tasks are about to finish), then sleep: being woken costs as much
      // as the worker's wake-up (below), and a call's tasks end within a task's time of each other.
      spin_while([&] { return job->done.load(std::memory_order_acquire) < ntasks; });
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait(lock, [&] { return job->done.load(std::memory_order_acquire) >= ntasks; });
    }
  }

 private:
  void loop() {
    for (;;) {
      // Spin a while before sleeping: decode makes ~280 calls per token, close together, and waking a
      // sleeping thread (futex, and in a VM an IPI to a halted vCPU) measured 50-100 us per call.
      spin_while([&] { return queued_.load(std::memory_order_acquire) == 0; });
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
      job->work();
    }
  }

  // Spins while waiting() holds, for at most spin_us_.
  template <typename F>
  void spin_while(const F& waiting) const {
    const auto t0 = std::chrono::steady_clock::now();
    while (waiting() && std::chrono::steady_clock::now() - t0 < std::chrono::microseconds(spin_us_)) {
      for (int i = 0; i < 16; ++i) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    }
  }

  // PIXTRAL_MLX_QMV_SPIN_US: how long an idle thread spins (default 2 ms; 0: sleep at once). Between
  // decode's kernel calls the other ops (attention, norms, sampling, the next token's graph) leave gaps
  // of up to a few ms: measured end to end at 40 layers, 300 us gave 1.98-2.22 tokens/s, 2 ms 2.40.
  static int spin_micros() {
    const char* env = std::getenv("PIXTRAL_MLX_QMV_SPIN_US");
    return env != nullptr && *env != '\0' ? std::max(0, std::atoi(env)) : 2000;
  }

  const int spin_us_ = spin_micros();
  std::atomic<int> queued_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> workers_;
};

///////////////////////////////////////////////////////////////////////////////
// The work of one evaluation
///////////////////////////////////////////////////////////////////////////////

// A 2-D view (rows, cols) whose columns may not be unit-stride: copy it row-contiguous.
template <typename T>
std::shared_ptr<std::vector<T>> gather_2d(const T* p, int rows, int cols, int64_t rs, int64_t cs) {
  auto v = std::make_shared<std::vector<T>>(static_cast<size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) (*v)[static_cast<size_t>(r) * cols + c] = p[r * rs + c * cs];
  return v;
}

struct Operand {
  const void* data;
  int64_t row_stride;  // elements
  std::shared_ptr<void> keep;  // owns a gathered copy, if one was needed
};

// What the task needs of a 2-D input: pointers and strides only (arrays are not captured).
struct View2D {
  const void* data = nullptr;
  int rows = 0, cols = 0;
  int64_t rs = 0, cs = 0;
  size_t itemsize = 4;

  static View2D of(const mx::array& a) {
    return {a.data<void>(), a.shape(0), a.shape(1), a.strides()[0], a.strides()[1], a.itemsize()};
  }

  Operand operand() const {
    if (cs == 1 || cols == 1) return {data, rows == 1 ? cols : rs, nullptr};
    if (itemsize == 4) {
      auto v = gather_2d(static_cast<const uint32_t*>(data), rows, cols, rs, cs);
      return {v->data(), cols, v};
    }
    auto v = gather_2d(static_cast<const uint16_t*>(data), rows, cols, rs, cs);
    return {v->data(), cols, v};
  }
};

int16_t* align64(int16_t* p) {
  return reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

// Row m of x (K elements, col_stride apart) rounded to integers one step per group: step = max |x| / QMAX and
// x / step rounded to nearest (even), so |error| <= step / 2 per element; xq[at(k)] = the rounded x[k]. A group
// of zeros has step 0; a group holding inf or NaN gets a NaN step, so the outputs it feeds are NaN, as in float. A
// group too small for 1 / step in float (max |x| below ~1e-34) rounds to zeros (its error term keeps its sum): x * inf
// would make a zero in it NaN.
template <int QMAX, class T, class At>
void quantize_x(const float* xm, int64_t col_stride, int K, int group_size, T* xq, At at, float* step, float* err) {
  for (int g0 = 0; g0 < K; g0 += group_size) {
    float amax = 0.0f;
    bool finite = true;
    for (int k = g0; k < g0 + group_size; ++k) {
      const float v = xm[k * col_stride];
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    constexpr float kMax = QMAX;
    float inv = finite && amax > 0.0f ? kMax / amax : 0.0f;
    if (inv == std::numeric_limits<float>::infinity()) inv = 0.0f;  // max |x| < QMAX / FLT_MAX: rounds to 0, as zeros
    const float s = !finite ? std::numeric_limits<float>::quiet_NaN() : amax / kMax;
    step[g0 / group_size] = s;
    double e = 0.0;  // sum of step * q - x over the group
    for (int k = g0; k < g0 + group_size; ++k) {
      const float v = xm[k * col_stride];
      const float q = inv > 0.0f ? std::clamp(std::nearbyint(v * inv), -kMax, kMax) : 0.0f;
      xq[at(k)] = static_cast<T>(q);
      e += static_cast<double>(s) * q - v;
    }
    err[g0 / group_size] = finite ? static_cast<float>(e) : 0.0f;
  }
}

// Sums of a row of x (K elements, col_stride apart) over each group, in order: Problem::xsum's row.
void group_sums(const float* xm, int64_t col_stride, int K, int group_size, float* sums) {
  for (int g0 = 0; g0 < K; g0 += group_size) {
    float s = 0.0f;
    for (int k = g0; k < g0 + group_size; ++k) s += xm[k * col_stride];
    sums[g0 / group_size] = s;
  }
}

// Row m of x in Problem::xq's int16 layout (chunks of `chunk` elements: Kernel::int16_chunk).
void quantize_x16(const float* xm, int64_t col_stride, int m, int M, int K, int group_size, int chunk,
                  int16_t* xq, float* step, float* err) {
  const int lanes = chunk / 4;
  auto at = [=](int k) {
    const int i = k % chunk;
    return (static_cast<int64_t>(k / chunk) * M + m) * chunk + (i % 4) * lanes + i / 4;
  };
  quantize_x<32767>(xm, col_stride, K, group_size, xq, at, step, err);
}

// Row m of x in Problem::xq8's int8 layout (chunks of 64: the even elements, then the odd ones).
void quantize_x8(const float* xm, int64_t col_stride, int m, int M, int K, int group_size, int8_t* xq, float* step,
                 float* err) {
  auto at = [=](int k) {
    const int i = k % 64;
    return (static_cast<int64_t>(k / 64) * M + m) * 64 + (i % 2) * 32 + i / 2;
  };
  quantize_x<127>(xm, col_stride, K, group_size, xq, at, step, err);
}

#ifndef QMV_PASS_BLOCK_BYTES
#define QMV_PASS_BLOCK_BYTES (1024 * 1024)
#endif
constexpr int64_t kPassBlockBytes = QMV_PASS_BLOCK_BYTES;  // weights per block when several passes share it
#ifndef QMV_PASS_GROUP
#define QMV_PASS_GROUP 32
#endif
// Passes over a block before the next block, at most: x's int16 rows of one group (256 rows of K = 14,336: 7 MB)
// stay in L3 while every block reads them, as the product from the codes blocks its rows (gemm_int16.cpp kMBlock).
constexpr int kPassGroup = QMV_PASS_GROUP;

struct Call {
  Kernel kernel;
  int nthreads;
  int M, N, K, group_size, bits;
  // x: M rows of K floats at x + row_offset[m] + k * x_col_stride
  const float* x;
  std::vector<int64_t> x_row_offset;
  int64_t x_col_stride;
  View2D w_view, scales_view, biases_view;
  int scale_type;
  float* out;

  bool interleaved = false;  // kernels.h: the interleaved layout (4-bit; get_gemm() has the kernels)

  void operator()() const {
    if (interleaved) return interleaved_matvec();
    if (M > kMaxRows) return gemm();
    const int G = K / group_size;
    const bool int16 = kernel.int16 && bits == 4 && group_size % 64 == 0 && K % kernel.int16_chunk == 0;
    std::vector<float> xp(int16 ? 0 : static_cast<size_t>(M) * K);
    std::vector<float> xsum(static_cast<size_t>(M) * G);
    std::vector<int16_t> xq_store(int16 ? static_cast<size_t>(M) * K + 32 : 0);
    std::vector<float> xscale(int16 ? static_cast<size_t>(M) * G : 0);
    std::vector<float> xerr(int16 ? static_cast<size_t>(M) * G : 0);
    int16_t* xq = int16 ? align64(xq_store.data()) : nullptr;
    const int chunk = bits == 4 ? kernel.x_chunk : 0;
    for (int m = 0; m < M; ++m) {
      const float* xm = x + x_row_offset[m];
      float* dst = xp.data() + static_cast<size_t>(m) * K;
      group_sums(xm, x_col_stride, K, group_size, xsum.data() + static_cast<size_t>(m) * G);
      if (int16 && kernel.int8) {
        quantize_x8(xm, x_col_stride, m, M, K, group_size, reinterpret_cast<int8_t*>(xq),
                    xscale.data() + static_cast<size_t>(m) * G, xerr.data() + static_cast<size_t>(m) * G);
      } else if (int16) {
        quantize_x16(xm, x_col_stride, m, M, K, group_size, kernel.int16_chunk, xq,
                     xscale.data() + static_cast<size_t>(m) * G, xerr.data() + static_cast<size_t>(m) * G);
      } else if (chunk == 0) {
        for (int k = 0; k < K; ++k) dst[k] = xm[k * x_col_stride];
      } else {
        const int half = chunk / 2;
        for (int c0 = 0; c0 < K; c0 += chunk)
          for (int j = 0; j < half; ++j) {
            const float even = xm[(c0 + 2 * j) * x_col_stride];
            const float odd = xm[(c0 + 2 * j + 1) * x_col_stride];
            dst[c0 + j] = kernel.fold ? even - odd * 0.0625f : even;
            dst[c0 + half + j] = kernel.fold ? odd * 0.0625f : odd;
          }
      }
    }
    if (kernel.interleave && M > 1 && !int16) {
      const int c = chunk == 0 ? 8 : chunk;
      std::vector<float> rows(std::move(xp));
      xp.assign(rows.size(), 0.0f);
      for (int c0 = 0; c0 < K; c0 += c)
        for (int m = 0; m < M; ++m)
          std::copy_n(rows.data() + static_cast<size_t>(m) * K + c0, c, xp.data() + static_cast<size_t>(c0) * M + m * c);
    }
    const Operand w = w_view.operand();
    const Operand scales = scales_view.operand();
    const Operand biases = biases_view.operand();
    Problem p = problem(w, scales, biases);
    p.xp = xp.data();
    p.xsum = xsum.data();
    p.xq = kernel.int8 ? nullptr : xq;
    p.xq8 = kernel.int8 ? reinterpret_cast<const int8_t*>(xq) : nullptr;
    p.xscale = int16 ? xscale.data() : nullptr;
    p.xerr = int16 ? xerr.data() : nullptr;
    split_rows(kernel.rows, p, 4);  // (the kernels' row blocking)
  }

  // The problem's weights, shapes and output, from operands the caller keeps alive; x's fields are the caller's.
  Problem problem(const Operand& w, const Operand& scales, const Operand& biases) const {
    Problem p;
    p.M = M;
    p.N = N;
    p.K = K;
    p.group_size = group_size;
    p.bits = bits;
    p.w = static_cast<const uint32_t*>(w.data);
    p.w_stride = w.row_stride;
    p.scales = scales.data;
    p.biases = biases.data;
    p.s_stride = scales.row_stride;
    p.b_stride = biases.row_stride;
    p.scale_type = scale_type;
    p.out = out;
    return p;
  }

  // fn over output rows [0, N) in contiguous blocks, a multiple of `granule` rows, about 4 per thread so that a
  // thread slowed down by other work on the machine does not hold everyone up (one thread for small weights: not
  // worth waking the others).
  void split_rows(RowsFn fn, const Problem& p, int granule) const {
    split_rows_with(granule, [fn, &p](int n0, int n1) { fn(p, n0, n1); });
  }

  // fn(n0, n1) over the output rows as split_rows splits them.
  template <typename F>
  void split_rows_with(int granule, F&& fn) const {
    const double weight_bytes = static_cast<double>(N) * K * bits / 8;
    const int nthr = weight_bytes < 256 * 1024 ? 1 : nthreads;
    const int ntasks_target = nthr == 1 ? 1 : nthr * 4;
    int rows_per_task = (N + ntasks_target - 1) / ntasks_target;
    rows_per_task = std::max(granule, (rows_per_task + granule - 1) / granule * granule);
    const int ntasks = (N + rows_per_task - 1) / rows_per_task;
    if (ntasks <= 1 || nthr == 1) {
      fn(0, N);
      return;
    }
    const int n_total = N;
    Pool::get().run(ntasks, nthr, [&fn, rows_per_task, n_total](int t) {
      const int n0 = t * rows_per_task;
      const int n1 = std::min(n_total, n0 + rows_per_task);
      if (n0 < n1) fn(n0, n1);
    });
  }

  // More rows than one matvec pass takes: the product from 4-bit codes (gemm_int16.cpp); quantized_matvec
  // only lets such calls through when get_gemm() has one.
  void gemm() const {
    const Gemm* g = get_gemm();
    const int G = K / group_size;
    std::vector<int16_t> xq(static_cast<size_t>(M) * K);
    std::vector<float> xscale(static_cast<size_t>(M) * G), xerr(xscale.size()), xsum(xscale.size());
    auto prepare = [&](int m) {
      const float* xm = x + x_row_offset[m];
      group_sums(xm, x_col_stride, K, group_size, xsum.data() + static_cast<size_t>(m) * G);
      quantize_x<32767>(xm, x_col_stride, K, group_size, xq.data() + static_cast<size_t>(m) * K,
                        [](int k) { return k; }, xscale.data() + static_cast<size_t>(m) * G,
                        xerr.data() + static_cast<size_t>(m) * G);
    };
    const int nthr = std::max(1, nthreads);
    const int row_tasks = std::min(M, nthr * 4);
    Pool::get().run(row_tasks, nthr, [&](int t) {
      for (int m = t; m < M; m += row_tasks) prepare(m);
    });
    const Operand w = w_view.operand();
    const Operand scales = scales_view.operand();
    const Operand biases = biases_view.operand();
    GemmProblem p{M, N, K, group_size, static_cast<const uint32_t*>(w.data), w.row_stride, scales.data,
                  biases.data, scales.row_stride, biases.row_stride, scale_type, xq.data(), xscale.data(),
                  xerr.data(), xsum.data(), out};
    // Strips of output rows, a few per thread (a thread slowed by other work holds no one up for long).
    const int strips = (N + g->strip - 1) / g->strip;
    const int ntasks = std::min(strips, nthr * 4);
    const int per = (strips + ntasks - 1) / ntasks;
    const Gemm gg = *g;
    Pool::get().run(ntasks, nthr, [&p, gg, per, this](int t) {
      const int n0 = t * per * gg.strip;
      const int n1 = std::min(N, n0 + per * gg.strip);
      if (n0 < n1) gg.rows(p, n0, n1);
    });
  }

  // Interleaved weights, any number of rows of x: Gemm::matvec, x in the 64-element chunk layout, in passes of at
  // most kMaxRows rows as even as they go (9 rows: 5 + 4). Each output gets the bits it gets in any pass, so the
  // passes change no value. With several passes each thread's rows go in blocks of kPassBlockBytes of codes, every
  // pass over a block before the next: the codes come from memory once and then from L2 (5-10 % faster than pass
  // after pass over all the weights, on Zen 4 with 1 MiB of L2 a core). The product from the codes (gemm_int16.cpp
  // `rows`, for MLX's layout) first repacks each block of codes into int16 panels; measured on a 2-core Zen 4
  // (Pixtral's gate, down and q projections from memory, alternated builds) the passes took 0.55-0.68 of its time
  // at 9 to 16 rows, 0.6-0.9 at 36 to 128, and 0.9-1.0 from 256 to 2048 rows: prompt chunks take them too.
  void interleaved_matvec() const {
    const Gemm* g = get_gemm();
    const int G = K / group_size;
    const int passes = passes_for(M);
    std::vector<int> first(passes + 1);  // pass i: rows [first[i], first[i + 1]) of x
    for (int i = 0; i <= passes; ++i) first[i] = pass_first(i, M);
    std::vector<int16_t> xq_store(static_cast<size_t>(M) * K + 32);
    std::vector<float> xscale(static_cast<size_t>(M) * G), xerr(xscale.size()), xsum(xscale.size());
    int16_t* xq = align64(xq_store.data());  // pass i's rows at xq + first[i] * K, laid out for its own count
    auto prepare = [&](int m) {  // each row writes its own places
      const int i = static_cast<int>(std::upper_bound(first.begin(), first.end(), m) - first.begin()) - 1;
      const int rows = first[i + 1] - first[i], local = m - first[i];
      int16_t* xqi = xq + static_cast<size_t>(first[i]) * K;
      const float* xm = x + x_row_offset[m];
      float* step = xscale.data() + static_cast<size_t>(m) * G;
      float* err = xerr.data() + static_cast<size_t>(m) * G;
      float* sums = xsum.data() + static_cast<size_t>(m) * G;
      if (x_col_stride == 1) {  // the usual: the same values, vectorized (Gemm::prepare_x)
        g->prepare_x(xm, local, rows, K, group_size, xqi, step, err, sums);
      } else {
        group_sums(xm, x_col_stride, K, group_size, sums);
        quantize_x16(xm, x_col_stride, local, rows, K, group_size, 64, xqi, step, err);
      }
    };
    parallel_for(M, prepare);  // the rows over the pool (one row: on this thread)
    const Operand w = w_view.operand();
    const Operand scales = scales_view.operand();
    const Operand biases = biases_view.operand();
    std::vector<Problem> ps(passes, problem(w, scales, biases));
    for (int i = 0; i < passes; ++i) {
      Problem& p = ps[i];
      const size_t r = static_cast<size_t>(first[i]);
      p.M = first[i + 1] - first[i];
      p.xp = nullptr;
      p.xsum = xsum.data() + r * G;
      p.xq = xq + r * K;
      p.xscale = xscale.data() + r * G;
      p.xerr = xerr.data() + r * G;
      p.out = out + r * N;
    }
    // One pass (decode): no L2 blocks, which would only cut its prefetch short at every block's end.
    if (passes == 1) return split_rows(g->matvec, ps[0], 8);
    const int64_t row_bytes = static_cast<int64_t>(K) / 2;
    const int block = static_cast<int>(std::max<int64_t>(16, kPassBlockBytes / row_bytes / 16 * 16));
    const auto matvec = g->matvec;
    for (int i0 = 0; i0 < passes; i0 += kPassGroup) {  // x's rows kPassGroup passes at a time: they stay in L3
      const int i1 = std::min(passes, i0 + kPassGroup);
      split_rows_with(8, [&ps, matvec, block, i0, i1](int n0, int n1) {
        for (int b0 = n0; b0 < n1; b0 += block)
          for (int i = i0; i < i1; ++i) matvec(ps[i], b0, std::min(n1, b0 + block));
      });
    }
  }
};

}  // namespace

int scale_type(mx::Dtype t) {
  if (t == mx::float16) return kF16;
  if (t == mx::bfloat16) return kBF16;
  return kF32;
}

std::string isa() {
  return get_kernel().name;
}

std::string gemm_isa() {
  const Gemm* g = get_gemm();
  return g == nullptr ? "" : g->name;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (auto& k : available_kernels()) names.emplace_back(k.name);
  return names;
}

std::string select_isa(const std::string& name) {
  auto ks = available_kernels();
  Kernel chosen = ks.front();
  if (!name.empty() && name != "auto") {
    bool found = false;
    for (auto& k : ks)
      if (name == k.name) {
        chosen = k;
        found = true;
      }
    if (!found) throw std::invalid_argument("qmv: kernel '" + name + "' is not supported on this CPU");
  }
  std::lock_guard<std::mutex> lock(config_mutex);
  current_kernel = chosen;
  return chosen.name;
}

int threads() {
  return get_threads();
}

int set_threads(int n) {
  std::lock_guard<std::mutex> lock(config_mutex);
  current_threads = n > 0 ? std::min(n, 64) : default_threads();
  return current_threads;
}

void parallel_for(int ntasks, const std::function<void(int)>& fn) {
  const int nthr = get_threads();
  if (ntasks <= 1 || nthr <= 1) {
    for (int i = 0; i < ntasks; ++i) fn(i);
    return;
  }
  Pool::get().run(ntasks, nthr, fn);
}

///////////////////////////////////////////////////////////////////////////////
// Huge pages
///////////////////////////////////////////////////////////////////////////////

HugePages huge_pages(const std::vector<mx::array>& arrays, bool collapse) {
  HugePages r;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
#ifndef MADV_COLLAPSE
  constexpr int MADV_COLLAPSE = 25;  // Linux 6.1; older kernels answer EINVAL
#endif
  for (const auto& a : arrays) {
    if (!a.is_available() || a.data_shared_ptr() == nullptr) continue;
    r.bytes += static_cast<int64_t>(a.nbytes());
    // Only the bytes the array's elements occupy (a view's data_size covers its span in the buffer).
    const auto begin = reinterpret_cast<uintptr_t>(a.data<char>());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + std::min(a.nbytes(), a.data_size() * a.itemsize())) & ~(kHuge - 1);
    if (hi <= lo) continue;  // no whole 2 MiB page inside this buffer
    void* p = reinterpret_cast<void*>(lo);
    const size_t n = hi - lo;
    if (madvise(p, n, MADV_HUGEPAGE) != 0) {
      r.error = errno;
      continue;
    }
    r.advised += static_cast<int64_t>(n);
    if (collapse) {
      if (madvise(p, n, MADV_COLLAPSE) == 0) {
        r.collapsed += static_cast<int64_t>(n);
      } else {
        r.error = errno;
      }
    }
  }
#else
  for (const auto& a : arrays) r.bytes += static_cast<int64_t>(a.nbytes());
#endif
  return r;
}

///////////////////////////////////////////////////////////////////////////////
// Operation
///////////////////////////////////////////////////////////////////////////////

mx::array quantized_matvec(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    bool interleaved,
    mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.quantized_matvec: " + msg); };
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8");
  if (group_size <= 0 || group_size % 32 != 0) fail("group_size must be a multiple of 32");
  if (x.dtype() != mx::float32) fail("x must be float32");
  if (x.ndim() < 1 || x.shape(-1) == 0) fail("x must have a last dimension");
  if (w.dtype() != mx::uint32 || w.ndim() != 2) fail("w must be a 2-D uint32 array");
  const int K = x.shape(-1);
  const int N = w.shape(0);
  if (K % group_size != 0) fail("the last dimension of x must be a multiple of group_size");
  if (static_cast<int64_t>(w.shape(1)) * 32 != static_cast<int64_t>(K) * bits)
    fail("w has " + std::to_string(w.shape(1)) + " words per row, x needs " + std::to_string(K * bits / 32));
  const int G = K / group_size;
  for (const auto* a : {&scales, &biases}) {
    if (a->ndim() != 2 || a->shape(0) != N || a->shape(1) != G) fail("scales and biases must have shape (N, K / group_size)");
    if (a->dtype() != mx::float32 && a->dtype() != mx::float16 && a->dtype() != mx::bfloat16)
      fail("scales and biases must be float32, float16 or bfloat16");
  }
  if (scales.dtype() != biases.dtype()) fail("scales and biases must have the same dtype");
  const int64_t M = x.size() / K;
  if (M < 1) fail("x must have at least one row");
  if (M > kMaxRowsOfX && (bits != 4 || get_gemm() == nullptr))
    fail("x must have between 1 and 8 rows (more take 4-bit weights and an int16 kernel: gemm_isa())");
  if (interleaved) {
    if (bits != 4 || group_size % 64 != 0 || N % 8 != 0)
      fail("interleaved weights must be 4-bit, with groups of a multiple of 64 and rows a multiple of 8");
    if (get_gemm() == nullptr) fail("interleaved weights need an int16 kernel (gemm_isa())");
  }
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  mx::Shape out_shape = x.shape();
  out_shape.back() = N;
  // Interleaved operands are read as whole contiguous blocks: copies where they are views (or not evaluated yet; a
  // layer's evaluated weights pass as they are, adding no node to the graph).
  auto whole = [&](const mx::array& a) {
    return !interleaved || (a.is_available() && a.flags().row_contiguous) ? a : mx::contiguous(a, false, stream);
  };
  return mx::array(out_shape, mx::float32, std::make_shared<QuantizedMatvec>(stream, group_size, bits, interleaved),
                   {x, whole(w), whole(scales), whole(biases)});
}

std::vector<mx::Shape> QuantizedMatvec::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape out_shape = inputs[0].shape();
  out_shape.back() = inputs[1].shape(0);
  return {out_shape};
}

bool QuantizedMatvec::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMatvec&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && interleaved_ == o.interleaved_;
}

void QuantizedMatvec::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("QuantizedMatvec has no GPU implementation (use mx.quantized_matmul)");
}

void QuantizedMatvec::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);

  Call call;
  call.kernel = get_kernel();
  call.nthreads = get_threads();
  call.K = x.shape(-1);
  call.M = static_cast<int>(x.size() / call.K);
  call.N = w.shape(0);
  call.group_size = group_size_;
  call.bits = bits_;
  call.x = x.data<float>();
  call.x_col_stride = x.strides().back();
  call.x_row_offset.resize(call.M);
  for (int m = 0; m < call.M; ++m) call.x_row_offset[m] = mx::elem_to_loc(m * call.K, x.shape(), x.strides());
  // Pointers only: the data is computed by earlier tasks; gathers of column-strided views (rare)
  // happen in the task.
  call.w_view = View2D::of(w);
  call.scales_view = View2D::of(scales);
  call.biases_view = View2D::of(biases);
  call.scale_type = scale_type(scales.dtype());
  call.out = out.data<float>();
  call.interleaved = interleaved_;
  encoder.dispatch([call = std::move(call)]() { call(); });
}

///////////////////////////////////////////////////////////////////////////////
// The interleaved layout, made at load
///////////////////////////////////////////////////////////////////////////////

mx::array interleave(const mx::array& a, mx::StreamOrDevice s) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qmv.interleave: " + msg); };
  if (a.ndim() != 2 || a.shape(0) % 8 != 0) fail("a must be 2-D with rows a multiple of 8");
  if (a.itemsize() != 2 && a.itemsize() != 4) fail("a must have 2- or 4-byte elements");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) fail("runs on the CPU only");
  return mx::array(a.shape(), a.dtype(), std::make_shared<Interleave>(stream), {mx::contiguous(a, false, stream)});
}

void Interleave::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("QmvInterleave has no GPU implementation");
}

namespace {

// Blocks [b0, b1) of 8 rows of C elements: dst[(8 b) * C + 8 c + r] = src[(8 b + r) * C + c].
template <class T>
void interleave_blocks(const T* src, T* dst, int64_t C, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* rows = src + b * 8 * C;
    T* out = dst + b * 8 * C;
    for (int64_t c = 0; c < C; ++c)
      for (int r = 0; r < 8; ++r) out[8 * c + r] = rows[r * C + c];
  }
}

}  // namespace

void Interleave::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& a = inputs[0];
  if (!a.flags().row_contiguous) throw std::invalid_argument("qmv.interleave: a must be row-contiguous");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(a);
  encoder.set_output_array(out);
  const int64_t C = a.shape(1), blocks = a.shape(0) / 8;
  const bool wide = a.itemsize() == 4;
  encoder.dispatch([wide, C, blocks, src = a.data<char>(), dst = out.data<char>()]() {
    // About 4 tasks a thread, at least 64 KiB each.
    const int64_t min_blocks = std::max<int64_t>(1, 65536 / (8 * C * (wide ? 4 : 2)));
    const int64_t per = std::max(min_blocks, (blocks + 4 * threads() - 1) / (4 * threads()));
    const int ntasks = static_cast<int>((blocks + per - 1) / per);
    parallel_for(ntasks, [&](int t) {
      const int64_t b0 = t * per, b1 = std::min(blocks, b0 + per);
      if (wide) {
        interleave_blocks(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), C, b0, b1);
      } else {
        interleave_blocks(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), C, b0, b1);
      }
    });
  });
}

}  // namespace qmv
