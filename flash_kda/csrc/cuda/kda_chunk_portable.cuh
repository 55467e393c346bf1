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
// Numerical safety: every decay factor evaluated here is e^x with x <= 0 (log-decays are <= 0), so
// nothing overflows even for decays like -1000 per token. The factor e^{γ_i - γ_j} of A is
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
// Layout of a block
// ---------------------------------------------------------------------------------------------
// Shared-memory layout (in floats) and thread layouts of a block for head dim D_ that owns VS_ rows
// of the state and walks the sequence in chunks of C_ tokens. The launcher (kda_cuda.cu) picks among
// a few such layouts: V slices multiply the K-side work of a chunk (loads, A matrices), so they pay
// only when N * Hv blocks would leave multiprocessors idle; a short chunk shrinks shared memory for
// devices with little of it.
template <int D_, int VS_, int C_>
struct Layout {
  static constexpr int D = D_;
  static constexpr int VS = VS_;
  static constexpr int C = C_;
  static constexpr int kThreads = 256;
  static constexpr int BS = 8;                      // sub-block used to factor decays
  static constexpr int NB = C / BS;                 // sub-blocks per chunk
  static constexpr int NPAIR = NB * (NB - 1) / 2;   // sub-block pairs (I > J)
  static constexpr int NVS = D / VS;                // V slices per head
  // Row stride of the [*, D] arrays: a multiple of 4 floats so rows can be read as float4, and 4
  // banks off a multiple of 32 so that 8 lanes reading float4s of 8 different rows hit 32 banks.
  static constexpr int LD = D + 4;
  static constexpr int LDV = VS;                    // row stride of the [C, VS] array (unpadded)

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
  // Blocks per multiprocessor the register budget must allow: small layouts fit several blocks in
  // shared memory, large ones one.
  static constexpr int kMinBlocks = kSmemBytes <= 76 * 1024 ? 2 : 1;

  static_assert(C % BS == 0, "chunk must be a whole number of sub-blocks");
  static_assert(D % VS == 0 && VS % kLanes == 0 && D % kLanes == 0, "slice layout");
  static_assert(C % kRowGroups == 0 && VS % kRowGroups == 0, "row-group layout");
  // Rows of A per thread in compute_offdiag_A (unused when the chunk is a single sub-block).
  static constexpr int kOffdiagRows = NB > 1 ? (C * C) / kThreads : 1;
  static_assert(NB == 1 || (C * C) % kThreads == 0, "off-diagonal A layout");
  static_assert(kOffdiagRows > 0 && BS % kOffdiagRows == 0, "a thread's A rows share one sub-block");
  static_assert(VS <= kThreads && D <= kThreads, "one thread per column / channel");
  static_assert(D % 4 == 0 && C % 4 == 0 && VS % 4 == 0, "float4 rows");
  static_assert((C * D) % kThreads == 0 && (C * VS) % kThreads == 0, "whole loads per thread");
};

constexpr float kLog2e = 1.4426950408889634f;
// Log-decays below this are clamped: e^{-1e30} is 0 like e^{-inf}, but differences of two clamped
// values stay finite (-inf - -inf would be NaN). NaN passes through the comparison unchanged.
constexpr float kMinLogDecay = -1e30f;

FLASH_KDA_DEVICE float sigmoid(float x) { return 1.0f / (1.0f + port::exp(-x)); }

// 16-byte shared-memory accesses (addresses are multiples of 4 floats by construction of Layout).
FLASH_KDA_DEVICE float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
FLASH_KDA_DEVICE float dot4(const float4& a, const float4& b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
FLASH_KDA_DEVICE float4 mul4(const float4& a, const float4& b) {
  return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}

// What one block works on.
struct Task {
  int n;       // sequence
  int h;       // value head
  int hk;      // query/key head
  int v0;      // first state row (V index) of the slice
  SeqRange r;  // token range of the sequence
};

template <class L>
FLASH_KDA_DEVICE Task block_task(const KdaParams& p, int block) {
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
template <class L>
FLASH_KDA_DEVICE void load_state(const KdaParams& p, const Task& t, float* sm, int tid) {
  constexpr int D = L::D;
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

template <class L>
FLASH_KDA_DEVICE void store_state(const KdaParams& p, const Task& t, const float* sm, int tid) {
  constexpr int D = L::D;
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
template <class L>
FLASH_KDA_DEVICE void load_chunk(const KdaParams& p, const Task& t, int64_t t0, int len, float exp_a,
                                 float* sm, int tid) {
  constexpr int D = L::D;
  constexpr int kPer = L::C * D / L::kThreads;        // q/k/g elements per thread
  constexpr int kPerV = L::C * L::VS / L::kThreads;   // v elements per thread
  const port::input_t* q = static_cast<const port::input_t*>(p.q);
  const port::input_t* k = static_cast<const port::input_t*>(p.k);
  const port::input_t* v = static_cast<const port::input_t*>(p.v);

  // A thread always reads the same channel c (D and VS divide the block), of rows i0, i0 + step, ...
  // so each tensor's address is computed once and then advanced by whole token strides.
  static_assert(L::kThreads % D == 0 && L::kThreads % L::VS == 0, "a thread keeps its channel");
  constexpr int kStep = L::kThreads / D, kStepV = L::kThreads / L::VS;
  const int c = tid % D, i0 = tid / D, cv = tid % L::VS, i0v = tid / L::VS;
  const int64_t q0 = token_offset(p.q_strides, t.r, t0 + i0, t.hk) + c;
  const int64_t k0 = token_offset(p.k_strides, t.r, t0 + i0, t.hk) + c;
  const int64_t g0 = token_offset(p.g_strides, t.r, t0 + i0, t.h) + c;
  const int64_t v0 = token_offset(p.v_strides, t.r, t0 + i0v, t.h) + t.v0 + cv;

  // Issue every global load of the chunk before using any, so that their latencies overlap.
  float qx[kPer], kx[kPer], gx[kPer], vx[kPerV], bx = 0.0f;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int i = i0 + r * kStep;
    qx[r] = kx[r] = gx[r] = 0.0f;
    if (i < len) {
      qx[r] = port::to_float(q[q0 + r * kStep * p.q_strides.token]);
      kx[r] = port::to_float(k[k0 + r * kStep * p.k_strides.token]);
      gx[r] = port::load_as_float(p.g, g0 + r * kStep * p.g_strides.token, p.g_fp32);
    }
  }
#pragma unroll
  for (int r = 0; r < kPerV; ++r) {
    const int i = i0v + r * kStepV;
    vx[r] = i < len ? port::to_float(v[v0 + r * kStepV * p.v_strides.token]) : 0.0f;
  }
  if (tid < len && tid < L::C) {
    bx = port::load_as_float(p.beta, token_offset(p.beta_strides, t.r, t0 + tid, t.h), p.beta_fp32);
  }

  const bool gate = p.A_log != nullptr;
  const float dtb = gate ? sm[L::kDtb + c] : 0.0f;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int i = i0 + r * kStep;
    float a = gx[r];
    if (gate && i < len) a = p.lower_bound * sigmoid(exp_a * (a + dtb));
    a = a < kMinLogDecay ? kMinLogDecay : a;
    sm[L::kQ + i * L::LD + c] = qx[r];
    sm[L::kK + i * L::LD + c] = kx[r];
    sm[L::kG + i * L::LD + c] = a;
  }
#pragma unroll
  for (int r = 0; r < kPerV; ++r) sm[L::kVx + (i0v + r * kStepV) * L::LDV + cv] = vx[r];
  if (tid < L::C) sm[L::kBeta + tid] = tid < len ? sigmoid(bx) : 0.0f;
}

// q <- scale · q / ||q||, k <- k / ||k|| (norms optional; one thread per row), and γ <- cumulative
// sum of a along the chunk in log2 units (one thread per channel).
template <class L>
FLASH_KDA_DEVICE void normalize_and_cumsum(const KdaParams& p, float* sm, int tid) {
  constexpr int D = L::D;
  for (int w = tid; w < 2 * L::C + D; w += L::kThreads) {
    if (w < 2 * L::C) {
      const bool is_q = w < L::C;
      float* row = sm + (is_q ? L::kQ : L::kK) + (w % L::C) * L::LD;
      float mult = is_q ? p.scale : 1.0f;
      if (p.use_qk_l2norm) {
        float ss = 0.0f;
        for (int c = 0; c < D; c += 4) {
          const float4 x = ld4(row + c);
          ss += dot4(x, x);
        }
        mult /= port::sqrt(ss + 1e-6f);
      }
      if (mult != 1.0f) {
        for (int c = 0; c < D; c += 4) {
          const float4 x = ld4(row + c);
          *reinterpret_cast<float4*>(row + c) = make_float4(x.x * mult, x.y * mult, x.z * mult, x.w * mult);
        }
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
template <class L>
FLASH_KDA_DEVICE void compute_diag_A(float* sm, int tid) {
  constexpr int D = L::D;
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
    for (int c = 0; c < D; c += 4) {
      const float4 gi = ld4(G + i * L::LD + c), gj = ld4(G + j * L::LD + c);
      const float4 e = make_float4(port::exp2(gi.x - gj.x), port::exp2(gi.y - gj.y),
                                   port::exp2(gi.z - gj.z), port::exp2(gi.w - gj.w));
      const float4 kj = mul4(ld4(K + j * L::LD + c), e);
      kk += dot4(ld4(K + i * L::LD + c), kj);
      qk += dot4(ld4(Q + i * L::LD + c), kj);
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
template <class L>
FLASH_KDA_DEVICE void scale_for_offdiag(float* sm, int tid) {
  constexpr int D = L::D;
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
template <class L>
FLASH_KDA_DEVICE void compute_offdiag_A_impl(float* sm, int tid) {
  constexpr int D = L::D;
  constexpr int RPT = L::kOffdiagRows;
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
  for (int c = 0; c < D; c += 4) {
    const float4 col = mul4(ld4(Ke + j * L::LD + c), ld4(M + c));
#pragma unroll
    for (int l = 0; l < RPT; ++l) {
      kk[l] += dot4(ld4(K + (r0 + l) * L::LD + c), col);
      qk[l] += dot4(ld4(Q + (r0 + l) * L::LD + c), col);
    }
  }
#pragma unroll
  for (int l = 0; l < RPT; ++l) {
    sm[L::kAkk + (r0 + l) * L::C + j] = kk[l];
    sm[L::kAqk + (r0 + l) * L::C + j] = qk[l];
  }
}

// A chunk of a single sub-block has no off-diagonal entries.
template <class L>
FLASH_KDA_DEVICE void compute_offdiag_A(float* sm, int tid) {
  if constexpr (L::NB > 1) compute_offdiag_A_impl<L>(sm, tid);
}

// k -> k e^{γ}, q -> q e^{γ} (both from the e^{γ - γ_b} forms: e^{γ_b} <= 1, a safe product) and
// ke -> k e^{γ_last - γ}; eg = e^{γ_last}.
template <class L>
FLASH_KDA_DEVICE void scale_for_state(float* sm, int tid) {
  constexpr int D = L::D;
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
template <class L>
struct OutTile {
  static constexpr int TI = L::C / L::kRowGroups;
  static constexpr int TV = L::VS / L::kLanes;
  float o[TI][TV];  // (Q e^γ) S0ᵀ, then + A_qk U
};

// Vx <- V - (K e^γ) S0ᵀ; tile.o <- (Q e^γ) S0ᵀ.
template <class L>
FLASH_KDA_DEVICE void project_state(float* sm, int tid, OutTile<L>& tile) {
  constexpr int D = L::D;
  using T = OutTile<L>;
  const int lane = tid % L::kLanes, i0 = (tid / L::kLanes) * T::TI;
  const float* K = sm + L::kK;
  const float* Q = sm + L::kQ;
  const float* S = sm + L::kS;
  float x[T::TI][T::TV];
#pragma unroll
  for (int l = 0; l < T::TI; ++l)
#pragma unroll
    for (int m = 0; m < T::TV; ++m) x[l][m] = tile.o[l][m] = 0.0f;
#pragma unroll 2
  for (int c = 0; c < D; c += 4) {
    float4 s[T::TV];
#pragma unroll
    for (int m = 0; m < T::TV; ++m) s[m] = ld4(S + (lane + L::kLanes * m) * L::LD + c);
#pragma unroll
    for (int l = 0; l < T::TI; ++l) {
      const float4 kx = ld4(K + (i0 + l) * L::LD + c), qx = ld4(Q + (i0 + l) * L::LD + c);
#pragma unroll
      for (int m = 0; m < T::TV; ++m) {
        x[l][m] += dot4(kx, s[m]);
        tile.o[l][m] += dot4(qx, s[m]);
      }
    }
  }
  float* Vx = sm + L::kVx;
#pragma unroll
  for (int l = 0; l < T::TI; ++l)
#pragma unroll
    for (int m = 0; m < T::TV; ++m) Vx[(i0 + l) * L::VS + lane + L::kLanes * m] -= x[l][m];
}

// Forward substitution inside the sub-block of BS rows starting at `base`, for column v of X
// (element (i, v) at X[i * ldx + v]): u_i = b_i (x_i - sum_{base <= j < i} A[i, j] u_j), in place.
// The earlier sub-blocks' contribution must already be subtracted. Shared by both GPU bodies.
template <int BS>
FLASH_KDA_DEVICE void substitute_column(float* X, int ldx, int v, const float* A, int lda,
                                        const float* beta, int base) {
  float u[BS];
#pragma unroll
  for (int ii = 0; ii < BS; ++ii) {
    const int i = base + ii;
    float acc = X[i * ldx + v];
#pragma unroll
    for (int jj = 0; jj < ii; ++jj) acc -= A[i * lda + base + jj] * u[jj];
    u[ii] = beta[i] * acc;
    X[i * ldx + v] = u[ii];
  }
}

// Vx <- U = (I + diag(b) A_kk)^{-1} diag(b) Vx, one sub-block of rows at a time: first every thread
// removes the contribution of the finished sub-blocks (parallel over rows x columns), then one thread
// per column substitutes inside the sub-block.
template <class L>
FLASH_KDA_DEVICE void solve_U(float* sm, int tid) {
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
    if (tid < L::VS) substitute_column<L::BS>(Vx, L::VS, tid, A, L::C, beta, base);
    port::block_sync();
  }
}

// out <- tile.o + A_qk U (causal sum only), for the real tokens of the chunk.
template <class L>
FLASH_KDA_DEVICE void write_output(const KdaParams& p, const Task& t, int64_t t0, int len,
                                   const float* sm, int tid, OutTile<L>& tile) {
  using T = OutTile<L>;
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

// S <- S diag(e^{γ_last}) + Uᵀ (K e^{γ_last - γ}). A thread owns rows v = rg·TR + l and channels
// c = lane + kLanes·m; it walks its rows in passes of PR to bound the accumulators it keeps live.
template <class L>
FLASH_KDA_DEVICE void update_state(float* sm, int tid) {
  constexpr int D = L::D;
  constexpr int TR = L::VS / L::kRowGroups;
  constexpr int TC = D / L::kLanes;
  constexpr int PR = TR < 8 ? TR : 8;
  static_assert(TR % PR == 0 && PR % 4 == 0, "state rows of a thread are read as float4");
  const int lane = tid % L::kLanes;
  float* S = sm + L::kS;
  const float* U = sm + L::kVx;
  const float* Kl = sm + L::kKe;
  const float* eg = sm + L::kEg;
  for (int v0 = (tid / L::kLanes) * TR; v0 < (tid / L::kLanes + 1) * TR; v0 += PR) {
    float acc[PR][TC];
#pragma unroll
    for (int l = 0; l < PR; ++l)
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
      for (int l4 = 0; l4 < PR; l4 += 4) {
        const float4 u4 = ld4(U + i * L::VS + v0 + l4);
        const float u[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
        for (int l = 0; l < 4; ++l)
#pragma unroll
          for (int m = 0; m < TC; ++m) acc[l4 + l][m] += u[l] * kl[m];
      }
    }
#pragma unroll
    for (int l = 0; l < PR; ++l)
#pragma unroll
      for (int m = 0; m < TC; ++m) S[(v0 + l) * L::LD + lane + L::kLanes * m] = acc[l][m];
  }
}

// ---------------------------------------------------------------------------------------------
// The whole block: every chunk of its sequence, then the final state.
// `sm` is the block's dynamic shared memory (L::kSmemBytes), `block` its linear index.
// ---------------------------------------------------------------------------------------------
template <class L>
FLASH_KDA_DEVICE void run_block(const KdaParams& p, float* sm, int block, int tid) {
  constexpr int D = L::D;
  const Task t = block_task<L>(p, block);
  float exp_a = 0.0f;
  if (p.A_log != nullptr) {
    exp_a = port::exp(p.A_log[t.h]);
    for (int c = tid; c < D; c += L::kThreads) {
      sm[L::kDtb + c] = p.dt_bias[t.h * p.dt_bias_head_stride + c];
    }
  }
  load_state<L>(p, t, sm, tid);
  port::block_sync();  // dt_bias and S are read by other threads below

  for (int64_t t0 = 0; t0 < t.r.len; t0 += L::C) {
    const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
    load_chunk<L>(p, t, t0, len, exp_a, sm, tid);
    port::block_sync();
    normalize_and_cumsum<L>(p, sm, tid);
    port::block_sync();
    compute_diag_A<L>(sm, tid);
    port::block_sync();
    scale_for_offdiag<L>(sm, tid);
    port::block_sync();
    compute_offdiag_A<L>(sm, tid);
    port::block_sync();
    scale_for_state<L>(sm, tid);
    port::block_sync();
    OutTile<L> tile;
    project_state<L>(sm, tid, tile);
    port::block_sync();
    solve_U<L>(sm, tid);  // ends with a barrier
    write_output<L>(p, t, t0, len, sm, tid, tile);
    update_state<L>(sm, tid);
    port::block_sync();
  }
  store_state<L>(p, t, sm, tid);
}

}  // namespace portable
}  // namespace flash_kda
