// kda_cpu.cpp: the CPU implementation of launch_kda: a chunked (WY / UT-transform) KDA forward in
// fp32, parallel over (sequence, value head, block of V rows) with OpenMP.
//
// Per value head the recurrence is, with S the [V, K] state and E_t = exp(a_t) the per-channel decay,
//     S_t = S_{t-1} diag(E_t) + b_t (v_t - S_{t-1} diag(E_t) k_t) k_tᵀ,     o_t = S_t (scale · q_t).
// Rows of S (one per value channel) evolve independently, which is what lets a work item own a block
// of V rows. Within a chunk of L <= kChunk tokens starting from state S0 it unrolls to
//     A_kk[i,j] = Σ_k k_i k_j Π_{j<t<=i} E_t   (j < i),   A_qk[i,j] = likewise with q_i (j <= i)
//     U   = (I + diag(b) A_kk)^{-1} diag(b) (V - K̃ S0ᵀ),   K̃_j = k_j ⊙ Π_{t<=j} E_t
//     O   = Q̃ S0ᵀ + A_qk U,                                Q̃_i = scale · q_i ⊙ Π_{t<=i} E_t
//     S_L = S0 diag(Π_{t<L} E_t) + Uᵀ (K ⊙ Π_{j<t<L} E_t)
// (U is the "corrected values" U' of the WY form: the inverse is applied by forward substitution, so
// the triangular matrix T is never formed.)
//
// Numerical safety: the log-decay a_t may be any value <= 0 (-1000 included), so the algorithm never
// divides by a decay and never forms exp of a positive number. Every decay it needs is a product of
// factors E_t <= 1 over a range of tokens (j, i], built by running products: prefix products from the
// chunk start, suffix products to the chunk end, and for pairs of tokens in different 16-token
// sub-blocks a split at the boundary r of j's sub-block, Π_{j<t<=i} = Π_{r<t<=i} · Π_{j<t<=r}, both
// factors <= 1. Products of E_t are also what the reference recurrence multiplies, so this stays close
// to it even where the decays underflow.
//
// NaN/Inf propagate as in the reference because no step mixes a token into an earlier output: every
// sum runs over the causal range only (never "multiply by a zero of a mask"), so 0 · NaN never appears.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../kda_params.h"
#include "kda_cpu_simd.h"

namespace flash_kda {
namespace {

using cpu::fma8;
using cpu::hsum8;
using cpu::kLanes;
using cpu::load8;
using cpu::splat8;
using cpu::store8;
using cpu::v8f;

#if defined(FLASH_KDA_DTYPE_BF16)
using in_t = c10::BFloat16;
#elif defined(FLASH_KDA_DTYPE_FP16)
using in_t = c10::Half;
#elif defined(FLASH_KDA_DTYPE_FP32)
using in_t = float;
#else
#error "define one of FLASH_KDA_DTYPE_{BF16,FP16,FP32}"
#endif

constexpr int D = FLASH_KDA_HEAD_DIM;  // K == V
static_assert(D % (4 * kLanes) == 0, "head dim must be a multiple of 32");

// Chunk length. The K·V work per token (K̃S0ᵀ, Q̃S0ᵀ, the state update) does not depend on it, the
// intra-chunk work grows with it (~kChunk·(K+V) per token) while the per-chunk passes over the state
// shrink with it. Measured on a 2-core AVX2 EPYC (B=1, T=4096, H=8, one thread), 16 against 32 / 64:
// D=64 23.5 / 25.7 / 29.1 ms, D=128 68 / 76 / 82 ms, D=256 243 / 238 / 252 ms. So 16, which also
// makes a chunk a single sub-block. FLASH_KDA_CPU_CHUNK (a multiple of kSub) overrides it, for tuning
// and for exercising the cross-sub-block path in tests only.
#ifndef FLASH_KDA_CPU_CHUNK
#define FLASH_KDA_CPU_CHUNK 16
#endif
constexpr int kChunk = FLASH_KDA_CPU_CHUNK;
// Sub-block of the intra-chunk score matrices and of the triangular solve: pairs of tokens inside a
// sub-block use exact running products, pairs across sub-blocks a GEMM (N = kSub columns).
constexpr int kSub = 16;
static_assert(kChunk % kSub == 0, "chunk must be a whole number of sub-blocks");
// The smallest block of V rows a work item may own (V is split only to feed idle threads).
constexpr int kMinRows = 16;

// One work item: rows [v0, v0 + rows) of the state of value head h in sequence n.
struct WorkItem {
  int n;
  int h;
  int v0;
  int rows;
  int64_t len;
};

// ---------------------------------------------------------------------------------------------
// Element access: inputs are in_t, g / beta may be fp32, states fp32 or in_t.
// ---------------------------------------------------------------------------------------------
template <typename T>
inline void load_row(const T* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void store_row(const float* src, T* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
inline float read_scalar(const void* base, int64_t off, bool fp32) {
  return fp32 ? static_cast<const float*>(base)[off] : static_cast<float>(static_cast<const in_t*>(base)[off]);
}

// ---------------------------------------------------------------------------------------------
// Vector helpers on rows of D floats.
// ---------------------------------------------------------------------------------------------
inline void fill(float* x, int n, float value) {
  for (int i = 0; i < n; ++i) x[i] = value;
}
inline void scale_row(float* x, int n, float s) {
  for (int i = 0; i < n; i += kLanes) store8(x + i, load8(x + i) * splat8(s));
}
inline float sum_squares(const float* x) {
  v8f acc = splat8(0.0f);
  for (int i = 0; i < D; i += kLanes) acc = fma8(load8(x + i), load8(x + i), acc);
  return hsum8(acc);
}

// dst_i += Σ_{j in [j0, j_end(i))} coef[i, j] · src_j for rows i in [i0, i1), ncols columns, where
// j_end(i) = i (strict) or i + 1 (inclusive). Row i of dst may be row i of src (the forward
// substitution): only rows j < i are read while row i is accumulated.
void triangle_update(int i0, int i1, bool inclusive, const float* coef, int ldcoef, const float* src,
                     float* dst, int ld, int ncols) {
  constexpr int kCols = 4 * kLanes;  // 4 accumulators per pass over the column range
  for (int i = i0; i < i1; ++i) {
    const int j_end = inclusive ? i + 1 : i;
    if (j_end <= i0) continue;
    const float* ci = coef + static_cast<int64_t>(i) * ldcoef;
    float* di = dst + static_cast<int64_t>(i) * ld;
    int c = 0;
    for (; c + kCols <= ncols; c += kCols) {
      v8f acc[4];
      for (int u = 0; u < 4; ++u) acc[u] = load8(di + c + u * kLanes);
      for (int j = i0; j < j_end; ++j) {
        const v8f a = splat8(ci[j]);
        const float* sj = src + static_cast<int64_t>(j) * ld + c;
        for (int u = 0; u < 4; ++u) acc[u] = fma8(a, load8(sj + u * kLanes), acc[u]);
      }
      for (int u = 0; u < 4; ++u) store8(di + c + u * kLanes, acc[u]);
    }
    for (; c < ncols; c += kLanes) {
      v8f acc = load8(di + c);
      for (int j = i0; j < j_end; ++j)
        acc = fma8(splat8(ci[j]), load8(src + static_cast<int64_t>(j) * ld + c), acc);
      store8(di + c, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch. All matrices are row-major fp32; "rows" is the V-block width of the item.
// ---------------------------------------------------------------------------------------------
struct Scratch {
  float* St;    // [D][rows]      the state block transposed (K-major, V contiguous) for the GEMMs
  float* Kn;    // [kChunk][D]    k̂ of the chunk's tokens
  float* Qn;    // [kChunk][D]    scale · q̂
  float* E;     // [kChunk][D]    exp(a_t), the per-channel decay factors
  float* X;     // [2*kChunk][D]  rows 0..: -K̃ ; rows kChunk..: Q̃   (decayed from the chunk start)
  float* Kdec;  // [kChunk][D]    k_j ⊙ Π_{j<t<L} E_t  (decayed to the chunk end)
  float* Lneg;  // [kChunk][kChunk]  -b_i · A_kk[i,j], j < i
  float* Aqk;   // [kChunk][kChunk]  A_qk[i,j], j <= i
  float* Zk;    // [kChunk][D]    -b_i · k_i ⊙ Π_{r<t<=i} E_t   (rows after a sub-block boundary r)
  float* Zq;    // [kChunk][D]    q_i ⊙ Π_{r<t<=i} E_t
  float* YT;    // [D][kSub]      (k_j ⊙ Π_{j<t<=r} E_t)ᵀ for the sub-block ending at r
  float* U;     // [kChunk][rows] corrected values
  float* O;     // [kChunk][rows] outputs of the chunk
  float* b;     // [kChunk]       sigmoid(beta)
  float* PL;    // [D]            Π_{t<L} E_t, the decay over the whole chunk
  float* tmp;   // [D]            running products

  static int64_t size_floats() {
    int64_t n = 0;
    for (int64_t s : sizes()) n += round_up(s);
    return n;
  }
  void carve(float* base) {
    float** fields[] = {&St, &Kn, &Qn, &E, &X, &Kdec, &Lneg, &Aqk, &Zk, &Zq, &YT, &U, &O, &b, &PL, &tmp};
    int idx = 0;
    for (int64_t s : sizes()) {
      *fields[idx++] = base;
      base += round_up(s);
    }
  }

 private:
  static int64_t round_up(int64_t n) { return (n + 15) / 16 * 16; }  // keep every buffer 64-byte aligned
  static std::vector<int64_t> sizes() {
    const int64_t C = kChunk;
    return {D * D, C * D, C * D, C * D, 2 * C * D, C * D, C * C, C * C,
            C * D, C * D, D * kSub, C * D, C * D, C, D, D};
  }
};

// ---------------------------------------------------------------------------------------------
// Chunk steps that depend only on (sequence, head): token preprocessing, decays, scores.
// ---------------------------------------------------------------------------------------------

// The exp-heavy step of the preprocessing. Each exp is a long dependency chain, so the loops work on
// four independent vectors at a time to give the out-of-order core something to overlap.
constexpr int kGateCols = 4 * kLanes;

// e <- exp(e): g is already the log-decay.
void log_decay_to_decay(float* e, int L) {
  for (int64_t i = 0; i < static_cast<int64_t>(L) * D; i += kGateCols) {
    v8f x[4];
    for (int u = 0; u < 4; ++u) x[u] = cpu::exp8(load8(e + i + u * kLanes));
    for (int u = 0; u < 4; ++u) store8(e + i + u * kLanes, x[u]);
  }
}

// e <- exp(a), a = lower_bound · sigmoid(exp(A_log) · (g + dt_bias)), over L rows of D channels.
void gate_to_decay(float* e, int L, float decay_rate, const float* dt_bias, float lower_bound) {
  const v8f rate = splat8(decay_rate), lb = splat8(lower_bound);
  for (int t = 0; t < L; ++t) {
    float* row = e + t * D;
    for (int c = 0; c < D; c += kGateCols) {
      v8f x[4];
      for (int u = 0; u < 4; ++u) {
        const int i = c + u * kLanes;
        x[u] = lb * cpu::sigmoid8(rate * (load8(row + i) + load8(dt_bias + i)));
      }
      for (int u = 0; u < 4; ++u) store8(row + c + u * kLanes, cpu::exp8(x[u]));
    }
  }
}

// Kn, Qn, E, b for tokens [t0, t0 + L) of head h (query/key head hq).
void prepare_tokens(const KdaParams& p, const SeqRange& r, int h, int hq, int64_t t0, int L, Scratch& s) {
  const bool gated = p.A_log != nullptr;
  const float decay_rate = gated ? std::exp(p.A_log[h]) : 0.0f;
  const float* dt_bias = gated ? p.dt_bias + h * p.dt_bias_head_stride : nullptr;
  for (int t = 0; t < L; ++t) {
    float* kn = s.Kn + t * D;
    float* qn = s.Qn + t * D;
    float* e = s.E + t * D;  // g for now; turned into the decay factors below
    load_row(static_cast<const in_t*>(p.k) + token_offset(p.k_strides, r, t0 + t, hq), kn, D);
    load_row(static_cast<const in_t*>(p.q) + token_offset(p.q_strides, r, t0 + t, hq), qn, D);
    float q_mul = p.scale;
    if (p.use_qk_l2norm) {
      scale_row(kn, D, 1.0f / std::sqrt(sum_squares(kn) + 1e-6f));
      q_mul *= 1.0f / std::sqrt(sum_squares(qn) + 1e-6f);
    }
    scale_row(qn, D, q_mul);

    const int64_t g_off = token_offset(p.g_strides, r, t0 + t, h);
    if (p.g_fp32) {
      load_row(static_cast<const float*>(p.g) + g_off, e, D);
    } else {
      load_row(static_cast<const in_t*>(p.g) + g_off, e, D);
    }
    const float beta = read_scalar(p.beta, token_offset(p.beta_strides, r, t0 + t, h), p.beta_fp32);
    s.b[t] = 1.0f / (1.0f + std::exp(-beta));
  }
  if (gated) {
    gate_to_decay(s.E, L, decay_rate, dt_bias, p.lower_bound);
  } else {
    log_decay_to_decay(s.E, L);
  }
}

// X (= [-K̃; Q̃]), PL and Kdec from running products of E over the chunk.
void decay_products(int L, Scratch& s) {
  float* P = s.tmp;
  fill(P, D, 1.0f);
  for (int t = 0; t < L; ++t) {  // P = Π_{t'<=t} E_t'
    const float* e = s.E + t * D;
    const float* kn = s.Kn + t * D;
    const float* qn = s.Qn + t * D;
    float* xk = s.X + t * D;
    float* xq = s.X + (kChunk + t) * D;
    for (int i = 0; i < D; i += kLanes) {
      const v8f pi = load8(P + i) * load8(e + i);
      store8(P + i, pi);
      store8(xk + i, -(load8(kn + i) * pi));
      store8(xq + i, load8(qn + i) * pi);
    }
  }
  std::copy(P, P + D, s.PL);
  fill(P, D, 1.0f);
  for (int t = L - 1; t >= 0; --t) {  // P = Π_{t<t'<L} E_t'
    const float* e = s.E + t * D;
    const float* kn = s.Kn + t * D;
    float* kd = s.Kdec + t * D;
    for (int i = 0; i < D; i += kLanes) {
      const v8f pi = load8(P + i);
      store8(kd + i, load8(kn + i) * pi);
      store8(P + i, pi * load8(e + i));
    }
  }
}

// Scores of token pairs inside sub-block [j0, j1): y = k_j ⊙ Π_{j<t<=i} E_t is carried from i to i+1
// by one multiply, so every decay is an exact running product of factors <= 1.
void diagonal_scores(int j0, int j1, Scratch& s) {
  float* y = s.tmp;
  for (int j = j0; j < j1; ++j) {
    std::copy(s.Kn + j * D, s.Kn + (j + 1) * D, y);
    {
      v8f acc = splat8(0.0f);
      for (int c = 0; c < D; c += kLanes) acc = fma8(load8(s.Qn + j * D + c), load8(y + c), acc);
      s.Aqk[j * kChunk + j] = hsum8(acc);
    }
    for (int i = j + 1; i < j1; ++i) {
      const float* e = s.E + i * D;
      const float* ki = s.Kn + i * D;
      const float* qi = s.Qn + i * D;
      v8f acc_k = splat8(0.0f), acc_q = splat8(0.0f);
      for (int c = 0; c < D; c += kLanes) {
        const v8f yc = load8(y + c) * load8(e + c);
        store8(y + c, yc);
        acc_k = fma8(load8(ki + c), yc, acc_k);
        acc_q = fma8(load8(qi + c), yc, acc_q);
      }
      s.Lneg[i * kChunk + j] = -s.b[i] * hsum8(acc_k);
      s.Aqk[i * kChunk + j] = hsum8(acc_q);
    }
  }
}

// Scores of all later tokens i >= j1 against sub-block [j0, j1) (a full sub-block ending at r = j1-1):
//   A[i,j] = (x_i ⊙ Π_{r<t<=i} E_t) · (k_j ⊙ Π_{j<t<=r} E_t),
// two GEMMs of (L - j1) x D by D x kSub.
void cross_scores(int j0, int j1, int L, Scratch& s) {
  float* P = s.tmp;
  fill(P, D, 1.0f);
  for (int j = j1 - 1; j >= j0; --j) {  // P = Π_{j<t<=r} E_t; YT holds the decayed k_j transposed
    const float* kj = s.Kn + j * D;
    const float* e = s.E + j * D;
    for (int c = 0; c < D; ++c) {
      s.YT[c * kSub + (j - j0)] = kj[c] * P[c];
      P[c] *= e[c];
    }
  }
  fill(P, D, 1.0f);
  for (int i = j1; i < L; ++i) {  // P = Π_{r<t<=i} E_t
    const float* e = s.E + i * D;
    const float* ki = s.Kn + i * D;
    const float* qi = s.Qn + i * D;
    float* zk = s.Zk + (i - j1) * D;
    float* zq = s.Zq + (i - j1) * D;
    const v8f nb = splat8(-s.b[i]);
    for (int c = 0; c < D; c += kLanes) {
      const v8f pc = load8(P + c) * load8(e + c);
      store8(P + c, pc);
      store8(zk + c, nb * load8(ki + c) * pc);
      store8(zq + c, load8(qi + c) * pc);
    }
  }
  const int M = L - j1;
  cpu::gemm<false>(M, kSub, D, s.Zk, D, 1, s.YT, kSub, s.Lneg + j1 * kChunk + j0, kChunk);
  cpu::gemm<false>(M, kSub, D, s.Zq, D, 1, s.YT, kSub, s.Aqk + j1 * kChunk + j0, kChunk);
}

void chunk_scores(int L, Scratch& s) {
  for (int j0 = 0; j0 < L; j0 += kSub) {
    const int j1 = std::min(j0 + kSub, L);
    diagonal_scores(j0, j1, s);
    if (j1 < L) cross_scores(j0, j1, L, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunk steps on the item's block of V rows.
// ---------------------------------------------------------------------------------------------

// U = (I + diag(b) A_kk)^{-1} diag(b) (V - K̃ S0ᵀ) and O = Q̃ S0ᵀ + A_qk U, for L tokens.
// On entry U holds the chunk's values; rows of U are solved one sub-block at a time: a GEMM against
// the finished sub-blocks, then forward substitution inside the sub-block.
void solve_and_output(int L, int rows, Scratch& s) {
  for (int t = 0; t < L; ++t) fill(s.O + t * rows, rows, 0.0f);
  cpu::gemm<true>(L, rows, D, s.X, D, 1, s.St, rows, s.U, rows);                 // V - K̃ S0ᵀ
  cpu::gemm<true>(L, rows, D, s.X + kChunk * D, D, 1, s.St, rows, s.O, rows);    // Q̃ S0ᵀ
  for (int t = 0; t < L; ++t) scale_row(s.U + t * rows, rows, s.b[t]);
  for (int i0 = 0; i0 < L; i0 += kSub) {
    const int i1 = std::min(i0 + kSub, L);
    cpu::gemm<true>(i1 - i0, rows, i0, s.Lneg + i0 * kChunk, kChunk, 1, s.U, rows, s.U + i0 * rows, rows);
    triangle_update(i0, i1, false, s.Lneg, kChunk, s.U, s.U, rows, rows);
  }
  for (int i0 = 0; i0 < L; i0 += kSub) {
    const int i1 = std::min(i0 + kSub, L);
    cpu::gemm<true>(i1 - i0, rows, i0, s.Aqk + i0 * kChunk, kChunk, 1, s.U, rows, s.O + i0 * rows, rows);
    triangle_update(i0, i1, true, s.Aqk, kChunk, s.U, s.O, rows, rows);
  }
}

// S_L = S0 diag(PL) + Uᵀ Kdec, on the transposed block: St[k, :] = PL[k] St[k, :] + Σ_j Kdec[j, k] U[j, :].
void update_state(int L, int rows, Scratch& s) {
  for (int k = 0; k < D; ++k) scale_row(s.St + k * rows, rows, s.PL[k]);
  cpu::gemm<true>(D, rows, L, s.Kdec, 1, D, s.U, rows, s.St, rows);
}

// ---------------------------------------------------------------------------------------------
// One work item: the whole sequence for one block of V rows of one head.
// ---------------------------------------------------------------------------------------------
template <typename StateT>
void load_state(const KdaParams& p, const WorkItem& w, Scratch& s) {
  if (p.initial_state == nullptr) {
    fill(s.St, D * w.rows, 0.0f);
    return;
  }
  const StateT* h0 = static_cast<const StateT*>(p.initial_state);
  for (int v = 0; v < w.rows; ++v) {
    const StateT* row = h0 + state_offset(p.h0_strides, w.n, w.h, w.v0 + v);
    for (int k = 0; k < D; ++k) s.St[k * w.rows + v] = static_cast<float>(row[k]);
  }
}

template <typename StateT>
void store_state(const KdaParams& p, const WorkItem& w, const Scratch& s) {
  if (p.final_state == nullptr) return;
  StateT* ht = static_cast<StateT*>(p.final_state);
  for (int v = 0; v < w.rows; ++v) {
    StateT* row = ht + state_offset(p.ht_strides, w.n, w.h, w.v0 + v);
    for (int k = 0; k < D; ++k) row[k] = static_cast<StateT>(s.St[k * w.rows + v]);
  }
}

void run_item(const KdaParams& p, const WorkItem& w, Scratch& s) {
  const SeqRange r = seq_range(p, w.n);
  const int hq = w.h / (p.hv / p.hqk);
  const int rows = w.rows;
  // The whole block is read before anything is written, so in-place states are safe.
  if (p.state_fp32) load_state<float>(p, w, s); else load_state<in_t>(p, w, s);

  for (int64_t t0 = 0; t0 < r.len; t0 += kChunk) {
    const int L = static_cast<int>(std::min<int64_t>(kChunk, r.len - t0));
    prepare_tokens(p, r, w.h, hq, t0, L, s);
    decay_products(L, s);
    chunk_scores(L, s);

    for (int t = 0; t < L; ++t)
      load_row(static_cast<const in_t*>(p.v) + token_offset(p.v_strides, r, t0 + t, w.h) + w.v0,
               s.U + t * rows, rows);
    solve_and_output(L, rows, s);
    for (int t = 0; t < L; ++t)
      store_row(s.O + t * rows,
                static_cast<in_t*>(p.out) + token_offset(p.out_strides, r, t0 + t, w.h) + w.v0, rows);
    update_state(L, rows, s);
  }

  if (p.state_fp32) store_state<float>(p, w, s); else store_state<in_t>(p, w, s);
}

// ---------------------------------------------------------------------------------------------
// Scheduling.
// ---------------------------------------------------------------------------------------------

// How many blocks to cut V into. Each block repeats the (sequence, head) preprocessing and the score
// matrices (~20% of an item's work), so V is split only when there are too few (sequence, head) pairs
// to feed the threads, or when one long sequence would otherwise dominate the critical path.
int choose_v_splits(int64_t pairs, int64_t total_tokens, int64_t max_len, int hv, int threads) {
  int splits = 1;
  while (D / (2 * splits) >= kMinRows && splits < threads) {
    const bool too_few_items = pairs * splits < threads;
    // the longest item must not exceed an even share of all the work
    const bool longest_dominates = max_len * threads > static_cast<int64_t>(splits) * total_tokens * hv;
    if (!too_few_items && !longest_dominates) break;
    splits *= 2;
  }
  return splits;
}

std::vector<WorkItem> make_items(const KdaParams& p, int threads) {
  std::vector<int64_t> lens(p.num_seqs);
  int64_t total = 0, max_len = 0;
  for (int n = 0; n < p.num_seqs; ++n) {
    lens[n] = seq_range(p, n).len;
    total += lens[n];
    max_len = std::max(max_len, lens[n]);
  }
  const int splits = choose_v_splits(static_cast<int64_t>(p.num_seqs) * p.hv, total, max_len, p.hv, threads);
  const int rows = D / splits;
  std::vector<WorkItem> items;
  items.reserve(static_cast<size_t>(p.num_seqs) * p.hv * splits);
  for (int n = 0; n < p.num_seqs; ++n)
    for (int h = 0; h < p.hv; ++h)
      for (int b = 0; b < splits; ++b) items.push_back(WorkItem{n, h, b * rows, rows, lens[n]});
  // Longest first: with dynamic scheduling this balances uneven varlen batches.
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.len > b.len; });
  return items;
}

}  // namespace

int64_t workspace_bytes(const KdaParams&) { return 0; }

void launch_kda(const KdaParams& p, void* /*stream*/) {
  if (p.num_seqs <= 0 || p.hv <= 0 || p.hqk <= 0) return;
  const int max_threads = std::max(1, at::get_num_threads());
  const std::vector<WorkItem> items = make_items(p, max_threads);
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int threads = static_cast<int>(std::min<int64_t>(max_threads, n_items));

  // All scratch is allocated here, outside the parallel region, so an allocation failure surfaces as
  // an ordinary C++ exception (a Python error) instead of terminating inside OpenMP. It is left
  // uninitialised: every buffer is written before it is read.
  const int64_t per_thread = Scratch::size_floats();
  std::unique_ptr<float[]> arena(new float[per_thread * threads + 16]);
  float* base = arena.get();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;  // 64-byte align
#ifdef FLASH_KDA_CPU_POISON_SCRATCH  // test builds: any read of an unwritten element shows up as NaN
  std::fill(base, base + per_thread * threads, std::numeric_limits<float>::quiet_NaN());
#endif

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    Scratch s;
    s.carve(base + per_thread * tid);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) run_item(p, items[i], s);
  }
}

}  // namespace flash_kda
