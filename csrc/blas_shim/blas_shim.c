/* pixtral_mlx._blas_shim: MLX's CBLAS GEMM entry points, forwarded to the OpenBLAS of the
 * `scipy-openblas32` wheel.
 *
 * libmlx.so (the Linux mlx[cpu] wheel) calls cblas_sgemm/dgemm/cgemm, which it would find in the
 * reference BLAS it bundles. The wheel's OpenBLAS exports the same functions with a `scipy_`
 * prefix, so it cannot stand in by itself. pixtral_mlx.backend loads that OpenBLAS and then this
 * library into the global symbol scope before mlx is imported; the global scope is searched before
 * libmlx's own dependencies, so MLX's GEMM calls land here. The `scipy_*` symbols are left
 * undefined and resolved at load time from the OpenBLAS loaded just before (nothing is linked, so
 * building needs only a C compiler). Both libraries use 32-bit integers (LP64), as MLX does.
 *
 * Small products run on one thread. OpenBLAS splits any GEMM above ~260k multiply-adds over all its
 * threads; decode's attention products (4 query rows against the cache, ~0.5-2M multiply-adds, 80
 * calls a token for Pixtral-12B) then pay a thread hand-off that costs more than the product: measured
 * on a busy 2-core machine, 42-59 ms a layer at a 1024-token context instead of 2-3 ms on one thread
 * (docs/CPU.md section 1). OpenBLAS has no per-call thread count, so around such a call the shim sets
 * the count to 1 and back, one call at a time. A large GEMM that starts on another thread meanwhile
 * may run on one thread; its result is the same.
 */
#include <pthread.h>
#include <stdint.h>

typedef int32_t blasint;
#define EXPORT __attribute__((visibility("default")))

/* The CBLAS enums (CblasRowMajor = 101, CblasNoTrans = 111, ...) are ints, the same in every CBLAS. */
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha,
                       const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c, blasint ldc);
void scipy_cblas_dgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, double alpha,
                       const double *a, blasint lda, const double *b, blasint ldb, double beta, double *c,
                       blasint ldc);
void scipy_cblas_cgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, const void *alpha,
                       const void *a, blasint lda, const void *b, blasint ldb, const void *beta, void *c,
                       blasint ldc);

int scipy_openblas_get_num_threads(void);
void scipy_openblas_set_num_threads(int n);

/* One thread below this many multiply-adds, or when the product has at most SKINNY rows or columns. */
#define SMALL_MNK (1LL << 24)
#define SKINNY 8

static pthread_mutex_t small_lock = PTHREAD_MUTEX_INITIALIZER;

static int small(blasint m, blasint n, blasint k) {
  return (long long)m * n * k < SMALL_MNK || m <= SKINNY || n <= SKINNY;
}

/* Run `call` as it is for a large product; on one thread for a small one. */
#define GEMM(call)                                         \
  do {                                                     \
    if (!small(m, n, k)) {                                 \
      call;                                                \
      break;                                               \
    }                                                      \
    pthread_mutex_lock(&small_lock);                       \
    int threads = scipy_openblas_get_num_threads();        \
    if (threads > 1) scipy_openblas_set_num_threads(1);    \
    call;                                                  \
    if (threads > 1) scipy_openblas_set_num_threads(threads); \
    pthread_mutex_unlock(&small_lock);                     \
  } while (0)

EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, float alpha,
                        const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c, blasint ldc) {
  GEMM(scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}

EXPORT void cblas_dgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, double alpha,
                        const double *a, blasint lda, const double *b, blasint ldb, double beta, double *c,
                        blasint ldc) {
  GEMM(scipy_cblas_dgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}

EXPORT void cblas_cgemm(int order, int trans_a, int trans_b, blasint m, blasint n, blasint k, const void *alpha,
                        const void *a, blasint lda, const void *b, blasint ldb, const void *beta, void *c,
                        blasint ldc) {
  GEMM(scipy_cblas_cgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}
