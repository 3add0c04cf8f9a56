// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The fused attention (prefill.h: AttentionFn) written once over a vector type, for prefill_avx2.cpp (8 lanes)
// and prefill_avx512.cpp (16 lanes). Included inside each file's target pragma and namespace, after the file
// defines its vector operations as a struct with:
//   F, kLanes, kMR (rows of the register block), zero(), set1(f), load(p), store(p, v), bcast(p), fma(a, b, c),
//   mul, sub, add, max, exp2(t) (2^t for t <= 0, -inf included: 0), below(v, idx, t, fill) (v where idx >= t,
//   else fill) and finite_or_zero(v) (0 where v is -inf).
//
// Per task (a block of up to kQueryBlock query rows of one head) and key block (kKeys keys):
//   Sᵀ = K Qᵀ  scores with the keys as rows and the queries as columns: Qᵀ is packed once per task into panels of
//              2 vectors of queries (D x 2 kLanes, pre-scaled by scale * log2 e, zero past the last row); K is read
//              in place (a broadcast per key and element), so nothing is transposed per key block;
//   online softmax down Sᵀ's columns, one vector of queries at a time: the running max and sum per query are
//              vectors, so max, exp2 and sums are all vertical (no horizontal reduction), and the output rows are
//              rescaled by 2^(m_old - m_new) when a max grows;
//   O += P V   P read from Sᵀ (a broadcast per query and key), V's block copied to a contiguous buffer first (a
//              view with rows far apart, as a transposed (L, H, D) projection is, maps every row to the same few
//              cache sets).
// Both products run one register-blocked micro-kernel: kMR rows x 2 vectors of C in accumulators, one broadcast
// of A and two loads of B per step of the inner dimension. Causal: key blocks past the task's last query are
// skipped, and in a block that straddles the diagonal each key's scores are set to -inf for the queries before it.

constexpr int kNV = 2;  // vectors of C per row of the register block
#ifndef QMV_ATTN_KEYS
#define QMV_ATTN_KEYS 128
#endif
constexpr int kKeys = QMV_ATTN_KEYS;  // keys per step of the online softmax

// C[MR x NV vectors] = (ACC ? C : 0) + A B, A(i, k) = a[i * ai + k * ak], B's row k at b + k * ldb (NV vectors).
template <class V, int MR, int NV, bool ACC>
__attribute__((always_inline)) inline void micro(const float* a, int64_t ai, int64_t ak, const float* b, int64_t ldb,
                                                 int K, float* c, int64_t ldc) {
  using F = typename V::F;
  constexpr int L = V::kLanes;
  F acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) acc[i][j] = ACC ? V::load(c + i * ldc + j * L) : V::zero();
  for (int k = 0; k < K; ++k) {
    F bv[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) bv[j] = V::load(b + k * ldb + j * L);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const F av = V::bcast(a + i * ai + k * ak);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) V::store(c + i * ldc + j * L, acc[i][j]);
}

// The last rows < MR of a strip: one micro-kernel of exactly that many rows.
template <class V, int NV, bool ACC, int R = V::kMR - 1>
__attribute__((always_inline)) inline void tail(int rows, const float* a, int64_t ai, int64_t ak, const float* b,
                                                int64_t ldb, int K, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R) return micro<V, R, NV, ACC>(a, ai, ak, b, ldb, K, c, ldc);
    tail<V, NV, ACC, R - 1>(rows, a, ai, ak, b, ldb, K, c, ldc);
  }
}

// C[rows x NV vectors] (+)= A[rows x K] B[K x NV vectors], rows in strips of kMR.
template <class V, int NV, bool ACC>
inline void strips(int rows, const float* a, int64_t ai, int64_t ak, const float* b, int64_t ldb, int K, float* c,
                   int64_t ldc) {
  int i = 0;
  for (; i + V::kMR <= rows; i += V::kMR) micro<V, V::kMR, NV, ACC>(a + i * ai, ai, ak, b, ldb, K, c + i * ldc, ldc);
  tail<V, NV, ACC>(rows - i, a + i * ai, ai, ak, b, ldb, K, c + i * ldc, ldc);
}

struct AttentionScratch {
  std::vector<float> qt, st, vp, o, m, l, alpha;
};

template <class V>
void attention_rows_t(const AttentionProblem& p, int b, int h, int r0, int r1) {
  using F = typename V::F;
  constexpr int L = V::kLanes;
  constexpr int NR = kNV * L;  // queries per panel of Qᵀ
  static thread_local AttentionScratch t;
  const int D = p.D;
  const int rows = r1 - r0;
  const int Rp = (rows + NR - 1) / NR * NR;  // Sᵀ's row length: the queries padded to whole panels
  const int kvh = h / (p.H / p.Hkv);
  const float* q = p.q + b * p.qs[0] + h * p.qs[1];
  const float* k = p.k + b * p.ks[0] + kvh * p.ks[1];
  const float* v = p.v + b * p.vs[0] + kvh * p.vs[1];
  const int offset = p.Lk - p.Lq;
  const int end = p.causal ? std::min(p.Lk, offset + r1) : p.Lk;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  t.qt.assign(static_cast<size_t>(Rp) * D, 0.0f);
  t.st.resize(static_cast<size_t>(kKeys) * Rp);
  t.vp.resize(static_cast<size_t>(kKeys) * D);
  t.o.assign(static_cast<size_t>(rows) * D, 0.0f);
  t.m.assign(Rp, neg_inf);
  t.l.assign(Rp, 0.0f);
  t.alpha.resize(Rp);
  float* qt = t.qt.data();
  float* st = t.st.data();
  float* vp = t.vp.data();
  float* o = t.o.data();
  float* ms = t.m.data();
  float* ls = t.l.data();
  float* alphas = t.alpha.data();

  // Qᵀ in base-2 logits (softmax(x) = 2^(x log2 e - max) / sum): qt[(panel * D + c) * NR + j] = query panel * NR + j.
  const float qscale = p.scale * 1.44269504088896341f;
  for (int i = 0; i < rows; ++i) {
    const float* src = q + static_cast<int64_t>(r0 + i) * p.qs[2];
    float* dst = qt + static_cast<int64_t>(i / NR) * D * NR + i % NR;
    for (int c = 0; c < D; ++c) dst[c * NR] = src[c] * qscale;
  }
  F qidx[kQueryBlock / L];  // each lane's query index, as floats (exact); Rp <= kQueryBlock (a multiple of NR)
  for (int j = 0; j < Rp / L; ++j) {
    alignas(64) float idx[L];
    for (int l = 0; l < L; ++l) idx[l] = static_cast<float>(j * L + l);
    qidx[j] = V::load(idx);
  }

  for (int k0 = 0; k0 < end; k0 += kKeys) {
    const int nk = std::min(end, k0 + kKeys) - k0;
    const float* kb = k + static_cast<int64_t>(k0) * p.ks[2];
    // Sᵀ[key][query] = K Qᵀ, one panel of queries at a time (its D x NR floats stay in L1).
    for (int pn = 0; pn < Rp / NR; ++pn)
      strips<V, kNV, false>(nk, kb, p.ks[2], 1, qt + static_cast<int64_t>(pn) * D * NR, NR, D, st + pn * NR, Rp);
    // V's block, contiguous.
    for (int j = 0; j < nk; ++j) {
      const float* src = v + static_cast<int64_t>(k0 + j) * p.vs[2];
      for (int c = 0; c < D; c += L) V::store(vp + j * D + c, V::load(src + c));
    }
    // Causal: key j is seen by the queries from first_seer(j) = k0 + j - offset - r0 on (<= 0: all of them).
    const bool straddles = p.causal && k0 + nk - 1 > offset + r0;
    for (int jv = 0; jv < Rp / L; ++jv) {
      float* col = st + jv * L;
      F mx = V::set1(neg_inf);
      for (int j = 0; j < nk; ++j) {
        F s = V::load(col + j * Rp);
        if (straddles) {
          s = V::below(s, qidx[jv], static_cast<float>(k0 + j - offset - r0), neg_inf);
          V::store(col + j * Rp, s);
        }
        mx = V::max(mx, s);
      }
      const F m_old = V::load(ms + jv * L);
      const F m_new = V::max(m_old, mx);
      // A query that has seen no key yet keeps -inf; subtract 0 for it so that 2^(-inf - m) stays 0, not NaN.
      const F m_use = V::finite_or_zero(m_new);
      F sum = V::zero();
      for (int j = 0; j < nk; ++j) {
        const F e = V::exp2(V::sub(V::load(col + j * Rp), m_use));
        V::store(col + j * Rp, e);
        sum = V::add(sum, e);
      }
      const F alpha = V::exp2(V::sub(m_old, m_use));
      V::store(ls + jv * L, V::add(V::mul(V::load(ls + jv * L), alpha), sum));
      V::store(ms + jv * L, m_new);
      V::store(alphas + jv * L, alpha);
    }
    for (int i = 0; i < rows; ++i) {
      if (alphas[i] == 1.0f) continue;
      const F a = V::set1(alphas[i]);
      for (int c = 0; c < D; c += L) V::store(o + i * D + c, V::mul(V::load(o + i * D + c), a));
    }
    // O += P V: P(query i, key j) = Sᵀ[j][i].
    int c = 0;
    for (; c + NR <= D; c += NR) strips<V, kNV, true>(rows, st, 1, Rp, vp + c, D, nk, o + c, D);
    if (c < D) strips<V, 1, true>(rows, st, 1, Rp, vp + c, D, nk, o + c, D);
  }

  for (int i = 0; i < rows; ++i) {
    float* dst = p.out + ((static_cast<int64_t>(b) * p.H + h) * p.Lq + r0 + i) * D;
    const F inv = V::set1(1.0f / ls[i]);
    for (int c = 0; c < D; c += L) V::store(dst + c, V::mul(V::load(o + i * D + c), inv));
  }
}
