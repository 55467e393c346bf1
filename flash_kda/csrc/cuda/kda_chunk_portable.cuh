// kda_chunk_portable.cuh: the portable chunked KDA forward body (fp32 on chip, no tensor cores).
//
// Written only against port.cuh, so it compiles for CUDA and MUSA alike. It is warp-size agnostic:
// threads cooperate through shared memory and block barriers only (no shuffles), and the "lane"
// layouts below merely choose which thread touches which element to avoid bank conflicts.
//
// Work split: one block per (sequence n, value head h, V slice). Rows of the state S [V, K] evolve
// independently, so a block owns VS rows of S for the whole sequence and walks the sequence in chunks
// of C tokens. The K-side quantities of a chunk (the matrices A_kk, A_qk) do not depend on the slice;
// every slice recomputes them, which is cheaper than a second pass through memory.
//
// Per chunk, with γ_i the cumulative log-decay within the chunk (a K-vector per token) and S0 the
// state at the chunk start, the token recurrence
//     S_t = S_{t-1} diag(e^{a_t});  S_t += b_t (v_t - S_t k_t) k_tᵀ;  o_t = S_t q_t
// becomes (all matrices C x C or C x VS; q already carries `scale`):
//     A_kk[i,j] = Σ_c k_ic k_jc e^{γ_ic - γ_jc}  (j < i)      A_qk[i,j] = Σ_c q_ic k_jc e^{γ_ic - γ_jc}  (j <= i)
//     U  = (I + diag(b) A_kk)^{-1} diag(b) (V - (K ⊙ e^γ) S0ᵀ)        (forward substitution)
//     O  = (Q ⊙ e^γ) S0ᵀ + A_qk U
//     S_C = S0 diag(e^{γ_last}) + Uᵀ (K ⊙ e^{γ_last - γ})
//
// Numerical safety: every exponential evaluated here has a non-positive argument (log-decays are
// <= 0), so nothing overflows even for decays like -1000 per token. The factor e^{γ_i - γ_j} of A is
// never split as e^{γ_i} · e^{-γ_j}; across sub-blocks of BS tokens it is split through reference
// tokens between j and i (see compute_offdiag_A), and inside a diagonal sub-block it is evaluated
// directly. Sums run only over the causal range (j <= i), so a NaN in a later token cannot leak into
// an earlier output through a 0 * NaN product.
#pragma once

#include "../kda_params.h"
#include "../port.cuh"

namespace flash_kda {
namespace portable {

// ---------------------------------------------------------------------------------------------
// Configuration per head dim
// ---------------------------------------------------------------------------------------------
template <int D>
struct Config;
// kChunk: tokens per chunk; kVSlice: state rows per block; kSub: sub-block used to factor decays.
template <>
struct Config<64> { static constexpr int kChunk = 32, kVSlice = 64, kSub = 8; };
template <>
struct Config<128> { static constexpr int kChunk = 32, kVSlice = 64, kSub = 8; };
template <>
struct Config<256> { static constexpr int kChunk = 16, kVSlice = 64, kSub = 8; };

// Shared-memory layout (in floats) and thread layouts of the block for head dim D.
template <int D>
struct Layout {
  static constexpr int kThreads = 256;
  static constexpr int C = Config<D>::kChunk;
  static constexpr int VS = Config<D>::kVSlice;
  static constexpr int BS = Config<D>::kSub;
  static constexpr int NB = C / BS;                 // sub-blocks per chunk
  static constexpr int NPAIR = NB * (NB - 1) / 2;   // sub-block pairs (I > J)
  static constexpr int NVS = D / VS;                // V slices per head
  static constexpr int LD = D + 1;                  // padded row stride of [*, D] arrays (banks)

  // "Lanes": threads laid along the contiguous dimension of a tile. Only a layout choice.
  static constexpr int kLanes = 32;
  static constexpr int kRowGroups = kThreads / kLanes;

  // [C, LD] arrays: raw k -> k e^{γ-γ_b} -> k e^{γ}; same for q; k e^{γ_e-γ} -> k e^{γ_last-γ}; γ.
  static constexpr int kK = 0;
  static constexpr int kQ = kK + C * LD;
  static constexpr int kKe = kQ + C * LD;
  static constexpr int kG = kKe + C * LD;
  static constexpr int kS = kG + C * LD;            // [VS, LD]  the block's rows of the state
  static constexpr int kVx = kS + VS * LD;          // [C, VS]   v -> v - K S0ᵀ -> U
  static constexpr int kAkk = kVx + C * VS;         // [C, C]
  static constexpr int kAqk = kAkk + C * C;         // [C, C]
  static constexpr int kM = kAqk + C * C;           // [NPAIR, LD] decay between sub-blocks
  static constexpr int kBeta = kM + NPAIR * LD;     // [C]
  static constexpr int kEg = kBeta + C;             // [D] e^{γ_last}
  static constexpr int kDtb = kEg + D;              // [D] dt_bias of this head
  static constexpr int kFloats = kDtb + D;
  static constexpr int kSmemBytes = kFloats * 4;

  static_assert(C % BS == 0, "chunk must be a whole number of sub-blocks");
  static_assert(D % VS == 0 && VS % kLanes == 0 && D % kLanes == 0, "slice layout");
  static_assert(C % kRowGroups == 0 && VS % kRowGroups == 0, "row-group layout");
  static_assert((C * C) % kThreads == 0, "off-diagonal A layout");
  static_assert(BS % ((C * C) / kThreads) == 0, "a thread's A rows must share one sub-block");
  static_assert(VS <= kThreads && D <= kThreads, "one thread per column / channel");
};

constexpr float kLog2e = 1.4426950408889634f;
// Log-decays below this are clamped: e^{-1e30} is 0 like e^{-inf}, but differences of two clamped
// values stay finite (-inf - -inf would be NaN). NaN passes through the comparison unchanged.
constexpr float kMinLogDecay = -1e30f;

FLASH_KDA_DEVICE float sigmoid(float x) { return 1.0f / (1.0f + port::exp(-x)); }

// What one block works on.
struct Task {
  int n;       // sequence
  int h;       // value head
  int hk;      // query/key head
  int v0;      // first state row (V index) of the slice
  SeqRange r;  // token range of the sequence
};

template <int D>
FLASH_KDA_DEVICE Task block_task(const KdaParams& p, int block) {
  using L = Layout<D>;
  Task t;
  t.v0 = (block % L::NVS) * L::VS;
  const int nh = block / L::NVS;
  t.h = nh % p.hv;
  t.n = nh / p.hv;
  t.hk = t.h / (p.hv / p.hqk);
  t.r = seq_range(p, t.n);
  return t;
}

// ---------------------------------------------------------------------------------------------
// State in / out
// ---------------------------------------------------------------------------------------------
template <int D>
FLASH_KDA_DEVICE void load_state(const KdaParams& p, const Task& t, float* sm, int tid) {
  using L = Layout<D>;
  float* S = sm + L::kS;
  for (int idx = tid; idx < L::VS * D; idx += L::kThreads) {
    const int v = idx / D, c = idx % D;
    float x = 0.0f;
    if (p.initial_state != nullptr) {
      x = port::load_as_float(p.initial_state, state_offset(p.h0_strides, t.n, t.h, t.v0 + v) + c,
                              p.state_fp32);
    }
    S[v * L::LD + c] = x;
  }
}

template <int D>
FLASH_KDA_DEVICE void store_state(const KdaParams& p, const Task& t, const float* sm, int tid) {
  using L = Layout<D>;
  if (p.final_state == nullptr) return;
  const float* S = sm + L::kS;
  for (int idx = tid; idx < L::VS * D; idx += L::kThreads) {
    const int v = idx / D, c = idx % D;
    port::store_from_float(p.final_state, state_offset(p.ht_strides, t.n, t.h, t.v0 + v) + c,
                           p.state_fp32, S[v * L::LD + c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunk input: q, k, log-decay a, v slice, b. Tokens past the sequence end are zero (a = 0, b = 0),
// which makes them contribute nothing and leaves γ_last at the last real token.
// ---------------------------------------------------------------------------------------------
template <int D>
FLASH_KDA_DEVICE void load_chunk(const KdaParams& p, const Task& t, int64_t t0, int len, float exp_a,
                                 float* sm, int tid) {
  using L = Layout<D>;
  const port::input_t* q = static_cast<const port::input_t*>(p.q);
  const port::input_t* k = static_cast<const port::input_t*>(p.k);
  const port::input_t* v = static_cast<const port::input_t*>(p.v);
  const bool gate = p.A_log != nullptr;
  for (int idx = tid; idx < L::C * D; idx += L::kThreads) {
    const int i = idx / D, c = idx % D;
    float qx = 0.0f, kx = 0.0f, a = 0.0f;
    if (i < len) {
      qx = port::to_float(q[token_offset(p.q_strides, t.r, t0 + i, t.hk) + c]);
      kx = port::to_float(k[token_offset(p.k_strides, t.r, t0 + i, t.hk) + c]);
      const float g =
          port::load_as_float(p.g, token_offset(p.g_strides, t.r, t0 + i, t.h) + c, p.g_fp32);
      a = gate ? p.lower_bound * sigmoid(exp_a * (g + sm[L::kDtb + c])) : g;
      a = a < kMinLogDecay ? kMinLogDecay : a;
    }
    sm[L::kQ + i * L::LD + c] = qx;
    sm[L::kK + i * L::LD + c] = kx;
    sm[L::kG + i * L::LD + c] = a;
  }
  for (int idx = tid; idx < L::C * L::VS; idx += L::kThreads) {
    const int i = idx / L::VS, c = idx % L::VS;
    sm[L::kVx + idx] =
        i < len ? port::to_float(v[token_offset(p.v_strides, t.r, t0 + i, t.h) + t.v0 + c]) : 0.0f;
  }
  for (int i = tid; i < L::C; i += L::kThreads) {
    sm[L::kBeta + i] =
        i < len ? sigmoid(port::load_as_float(p.beta, token_offset(p.beta_strides, t.r, t0 + i, t.h),
                                              p.beta_fp32))
                : 0.0f;
  }
}

// q <- scale · q / ||q||, k <- k / ||k|| (norms optional; one thread per row), and γ <- cumulative
// sum of a along the chunk in log2 units (one thread per channel).
template <int D>
FLASH_KDA_DEVICE void normalize_and_cumsum(const KdaParams& p, float* sm, int tid) {
  using L = Layout<D>;
  for (int w = tid; w < 2 * L::C + D; w += L::kThreads) {
    if (w < 2 * L::C) {
      const bool is_q = w < L::C;
      float* row = sm + (is_q ? L::kQ : L::kK) + (w % L::C) * L::LD;
      float mult = is_q ? p.scale : 1.0f;
      if (p.use_qk_l2norm) {
        float ss = 0.0f;
        for (int c = 0; c < D; ++c) ss += row[c] * row[c];
        mult /= port::sqrt(ss + 1e-6f);
      }
      if (mult != 1.0f) {
        for (int c = 0; c < D; ++c) row[c] *= mult;
      }
    } else {
      float* col = sm + L::kG + (w - 2 * L::C);
      float acc = 0.0f;
      for (int i = 0; i < L::C; ++i) {
        acc += col[i * L::LD];
        col[i * L::LD] = acc * kLog2e;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A_kk and A_qk. Sub-block I holds tokens [I·BS, I·BS + BS). For a token i of sub-block I let
// b(i) = I·BS - 1 (the last token before the sub-block; γ_b = 0 for I = 0) and e(i) = I·BS + BS - 1.
// For j in an earlier sub-block J < I, e(j) <= b(i) < i, so
//     e^{γ_i - γ_j} = e^{γ_i - γ_b(i)} · e^{γ_b(i) - γ_e(j)} · e^{γ_e(j) - γ_j},
// three factors each <= 1: the first goes into the row operand, the last into the column operand
// and the middle one is the per-channel vector M[pair(I, J)].
// ---------------------------------------------------------------------------------------------
FLASH_KDA_DEVICE int pair_index(int I, int J) { return I * (I - 1) / 2 + J; }

// Diagonal sub-blocks directly from raw k, q, γ; also the middle factors M.
template <int D>
FLASH_KDA_DEVICE void compute_diag_A(float* sm, int tid) {
  using L = Layout<D>;
  constexpr int kTri = L::BS * (L::BS + 1) / 2;  // pairs j <= i inside one sub-block
  const float* K = sm + L::kK;
  const float* Q = sm + L::kQ;
  const float* G = sm + L::kG;
  for (int it = tid; it < L::NB * kTri; it += L::kThreads) {
    const int I = it / kTri;
    int rem = it % kTri, ii = 0;
    while (rem > ii) {  // rem -> (ii, jj) with jj <= ii
      rem -= ii + 1;
      ++ii;
    }
    const int i = I * L::BS + ii, j = I * L::BS + rem;
    float kk = 0.0f, qk = 0.0f;
    for (int c = 0; c < D; ++c) {
      const float kj = K[j * L::LD + c] * port::exp2(G[i * L::LD + c] - G[j * L::LD + c]);
      kk += K[i * L::LD + c] * kj;
      qk += Q[i * L::LD + c] * kj;
    }
    sm[L::kAqk + i * L::C + j] = qk;
    if (j < i) sm[L::kAkk + i * L::C + j] = kk;
  }
  for (int it = tid; it < L::NPAIR * D; it += L::kThreads) {
    const int pr = it / D, c = it % D;
    int I = 1;
    while (pair_index(I + 1, 0) <= pr) ++I;
    const int J = pr - pair_index(I, 0);
    sm[L::kM + pr * L::LD + c] =
        port::exp2(G[(I * L::BS - 1) * L::LD + c] - G[(J * L::BS + L::BS - 1) * L::LD + c]);
  }
}

// k -> k e^{γ - γ_b} (row operand), ke = k e^{γ_e - γ} (column operand), q -> q e^{γ - γ_b}.
template <int D>
FLASH_KDA_DEVICE void scale_for_offdiag(float* sm, int tid) {
  using L = Layout<D>;
  const float* G = sm + L::kG;
  for (int idx = tid; idx < L::C * D; idx += L::kThreads) {
    const int i = idx / D, c = idx % D, I = i / L::BS;
    const float g = G[i * L::LD + c];
    const float gb = I > 0 ? G[(I * L::BS - 1) * L::LD + c] : 0.0f;
    const float ge = G[(I * L::BS + L::BS - 1) * L::LD + c];
    const float fb = port::exp2(g - gb);
    const float kx = sm[L::kK + i * L::LD + c];
    sm[L::kKe + i * L::LD + c] = kx * port::exp2(ge - g);
    sm[L::kK + i * L::LD + c] = kx * fb;
    sm[L::kQ + i * L::LD + c] *= fb;
  }
}

// Entries of A whose column sub-block precedes the row sub-block. Thread = (row group, column j);
// its rows all lie in one sub-block I, so threads with J >= I simply have nothing to do.
template <int D>
FLASH_KDA_DEVICE void compute_offdiag_A(float* sm, int tid) {
  using L = Layout<D>;
  constexpr int RPT = (L::C * L::C) / L::kThreads;  // rows per thread
  const int j = tid % L::C, r0 = (tid / L::C) * RPT;
  const int I = r0 / L::BS, J = j / L::BS;
  if (J >= I) return;
  const float* K = sm + L::kK;
  const float* Q = sm + L::kQ;
  const float* Ke = sm + L::kKe;
  const float* M = sm + L::kM + pair_index(I, J) * L::LD;
  float kk[RPT], qk[RPT];
#pragma unroll
  for (int l = 0; l < RPT; ++l) kk[l] = qk[l] = 0.0f;
  for (int c = 0; c < D; ++c) {
    const float col = Ke[j * L::LD + c] * M[c];
#pragma unroll
    for (int l = 0; l < RPT; ++l) {
      kk[l] += K[(r0 + l) * L::LD + c] * col;
      qk[l] += Q[(r0 + l) * L::LD + c] * col;
    }
  }
#pragma unroll
  for (int l = 0; l < RPT; ++l) {
    sm[L::kAkk + (r0 + l) * L::C + j] = kk[l];
    sm[L::kAqk + (r0 + l) * L::C + j] = qk[l];
  }
}

// k -> k e^{γ}, q -> q e^{γ} (both from the e^{γ - γ_b} forms: e^{γ_b} <= 1, a safe product) and
// ke -> k e^{γ_last - γ}; eg = e^{γ_last}.
template <int D>
FLASH_KDA_DEVICE void scale_for_state(float* sm, int tid) {
  using L = Layout<D>;
  const float* G = sm + L::kG;
  const float* g_last = G + (L::C - 1) * L::LD;
  for (int idx = tid; idx < L::C * D; idx += L::kThreads) {
    const int i = idx / D, c = idx % D, I = i / L::BS;
    const float fb = I > 0 ? port::exp2(G[(I * L::BS - 1) * L::LD + c]) : 1.0f;
    const float ge = G[(I * L::BS + L::BS - 1) * L::LD + c];
    sm[L::kK + i * L::LD + c] *= fb;
    sm[L::kQ + i * L::LD + c] *= fb;
    sm[L::kKe + i * L::LD + c] *= port::exp2(g_last[c] - ge);
  }
  for (int c = tid; c < D; c += L::kThreads) sm[L::kEg + c] = port::exp2(g_last[c]);
}

// ---------------------------------------------------------------------------------------------
// The V-side of a chunk. Output tile of a thread: rows i = rg·TI + l, columns v = lane + kLanes·m.
// ---------------------------------------------------------------------------------------------
template <int D>
struct OutTile {
  using L = Layout<D>;
  static constexpr int TI = L::C / L::kRowGroups;
  static constexpr int TV = L::VS / L::kLanes;
  float o[TI][TV];  // (Q e^γ) S0ᵀ, then + A_qk U
};

// Vx <- V - (K e^γ) S0ᵀ; tile.o <- (Q e^γ) S0ᵀ.
template <int D>
FLASH_KDA_DEVICE void project_state(float* sm, int tid, OutTile<D>& tile) {
  using L = Layout<D>;
  using T = OutTile<D>;
  const int lane = tid % L::kLanes, i0 = (tid / L::kLanes) * T::TI;
  const float* K = sm + L::kK;
  const float* Q = sm + L::kQ;
  const float* S = sm + L::kS;
  float x[T::TI][T::TV];
#pragma unroll
  for (int l = 0; l < T::TI; ++l)
#pragma unroll
    for (int m = 0; m < T::TV; ++m) x[l][m] = tile.o[l][m] = 0.0f;
#pragma unroll 4
  for (int c = 0; c < D; ++c) {
    float s[T::TV];
#pragma unroll
    for (int m = 0; m < T::TV; ++m) s[m] = S[(lane + L::kLanes * m) * L::LD + c];
#pragma unroll
    for (int l = 0; l < T::TI; ++l) {
      const float kx = K[(i0 + l) * L::LD + c], qx = Q[(i0 + l) * L::LD + c];
#pragma unroll
      for (int m = 0; m < T::TV; ++m) {
        x[l][m] += kx * s[m];
        tile.o[l][m] += qx * s[m];
      }
    }
  }
  float* Vx = sm + L::kVx;
#pragma unroll
  for (int l = 0; l < T::TI; ++l)
#pragma unroll
    for (int m = 0; m < T::TV; ++m) Vx[(i0 + l) * L::VS + lane + L::kLanes * m] -= x[l][m];
}

// Vx <- U = (I + diag(b) A_kk)^{-1} diag(b) Vx, one sub-block of rows at a time: first every thread
// removes the contribution of the finished sub-blocks (parallel over rows x columns), then one thread
// per column substitutes inside the sub-block.
template <int D>
FLASH_KDA_DEVICE void solve_U(float* sm, int tid) {
  using L = Layout<D>;
  float* Vx = sm + L::kVx;
  const float* A = sm + L::kAkk;
  const float* beta = sm + L::kBeta;
  for (int I = 0; I < L::NB; ++I) {
    const int base = I * L::BS;
    if (I > 0) {
      for (int idx = tid; idx < L::BS * L::VS; idx += L::kThreads) {
        const int i = base + idx / L::VS, v = idx % L::VS;
        float acc = 0.0f;
        for (int j = 0; j < base; ++j) acc += A[i * L::C + j] * Vx[j * L::VS + v];
        Vx[i * L::VS + v] -= acc;
      }
      port::block_sync();
    }
    if (tid < L::VS) {
      const int v = tid;
      float u[L::BS];
#pragma unroll
      for (int ii = 0; ii < L::BS; ++ii) {
        const int i = base + ii;
        float acc = Vx[i * L::VS + v];
#pragma unroll
        for (int jj = 0; jj < ii; ++jj) acc -= A[i * L::C + base + jj] * u[jj];
        u[ii] = beta[i] * acc;
        Vx[i * L::VS + v] = u[ii];
      }
    }
    port::block_sync();
  }
}

// out <- tile.o + A_qk U (causal sum only), for the real tokens of the chunk.
template <int D>
FLASH_KDA_DEVICE void write_output(const KdaParams& p, const Task& t, int64_t t0, int len,
                                   const float* sm, int tid, OutTile<D>& tile) {
  using L = Layout<D>;
  using T = OutTile<D>;
  const int lane = tid % L::kLanes, i0 = (tid / L::kLanes) * T::TI;
  const float* A = sm + L::kAqk;
  const float* U = sm + L::kVx;
  for (int j = 0; j < i0 + T::TI; ++j) {
    float u[T::TV];
#pragma unroll
    for (int m = 0; m < T::TV; ++m) u[m] = U[j * L::VS + lane + L::kLanes * m];
#pragma unroll
    for (int l = 0; l < T::TI; ++l) {
      if (j <= i0 + l) {
        const float a = A[(i0 + l) * L::C + j];
#pragma unroll
        for (int m = 0; m < T::TV; ++m) tile.o[l][m] += a * u[m];
      }
    }
  }
  port::input_t* out = static_cast<port::input_t*>(p.out);
#pragma unroll
  for (int l = 0; l < T::TI; ++l) {
    const int i = i0 + l;
    if (i >= len) continue;
    const int64_t base = token_offset(p.out_strides, t.r, t0 + i, t.h) + t.v0;
#pragma unroll
    for (int m = 0; m < T::TV; ++m) {
      out[base + lane + L::kLanes * m] = port::from_float<port::input_t>(tile.o[l][m]);
    }
  }
}

// S <- S diag(e^{γ_last}) + Uᵀ (K e^{γ_last - γ}). Thread tile: rows v = rg·TR + l, channels
// c = lane + kLanes·m.
template <int D>
FLASH_KDA_DEVICE void update_state(float* sm, int tid) {
  using L = Layout<D>;
  constexpr int TR = L::VS / L::kRowGroups;
  constexpr int TC = D / L::kLanes;
  const int lane = tid % L::kLanes, v0 = (tid / L::kLanes) * TR;
  float* S = sm + L::kS;
  const float* U = sm + L::kVx;
  const float* Kl = sm + L::kKe;
  const float* eg = sm + L::kEg;
  float acc[TR][TC];
#pragma unroll
  for (int l = 0; l < TR; ++l)
#pragma unroll
    for (int m = 0; m < TC; ++m) {
      const int c = lane + L::kLanes * m;
      acc[l][m] = S[(v0 + l) * L::LD + c] * eg[c];
    }
#pragma unroll 2
  for (int i = 0; i < L::C; ++i) {
    float kl[TC];
#pragma unroll
    for (int m = 0; m < TC; ++m) kl[m] = Kl[i * L::LD + lane + L::kLanes * m];
#pragma unroll
    for (int l = 0; l < TR; ++l) {
      const float u = U[i * L::VS + v0 + l];
#pragma unroll
      for (int m = 0; m < TC; ++m) acc[l][m] += u * kl[m];
    }
  }
#pragma unroll
  for (int l = 0; l < TR; ++l)
#pragma unroll
    for (int m = 0; m < TC; ++m) S[(v0 + l) * L::LD + lane + L::kLanes * m] = acc[l][m];
}

// ---------------------------------------------------------------------------------------------
// The whole block: every chunk of its sequence, then the final state.
// `sm` is the block's dynamic shared memory (Layout<D>::kSmemBytes), `block` its linear index.
// ---------------------------------------------------------------------------------------------
template <int D>
FLASH_KDA_DEVICE void run_block(const KdaParams& p, float* sm, int block, int tid) {
  using L = Layout<D>;
  const Task t = block_task<D>(p, block);
  float exp_a = 0.0f;
  if (p.A_log != nullptr) {
    exp_a = port::exp(p.A_log[t.h]);
    for (int c = tid; c < D; c += L::kThreads) {
      sm[L::kDtb + c] = p.dt_bias[t.h * p.dt_bias_head_stride + c];
    }
  }
  load_state<D>(p, t, sm, tid);
  port::block_sync();  // dt_bias and S are read by other threads below

  for (int64_t t0 = 0; t0 < t.r.len; t0 += L::C) {
    const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
    load_chunk<D>(p, t, t0, len, exp_a, sm, tid);
    port::block_sync();
    normalize_and_cumsum<D>(p, sm, tid);
    port::block_sync();
    compute_diag_A<D>(sm, tid);
    port::block_sync();
    scale_for_offdiag<D>(sm, tid);
    port::block_sync();
    compute_offdiag_A<D>(sm, tid);
    port::block_sync();
    scale_for_state<D>(sm, tid);
    port::block_sync();
    OutTile<D> tile;
    project_state<D>(sm, tid, tile);
    port::block_sync();
    solve_U<D>(sm, tid);  // ends with a barrier
    write_output<D>(p, t, t0, len, sm, tid, tile);
    update_state<D>(sm, tid);
    port::block_sync();
  }
  store_state<D>(p, t, sm, tid);
}

}  // namespace portable
}  // namespace flash_kda
