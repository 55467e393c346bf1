// kda_split_prep.cuh: the split form's preparation kernel body (kda_chunk_split.cuh says why two
// kernels): one block per (slot, value head) writes the chunk's record (kda_split_records.cuh).
#pragma once

#include "../port.cuh"
#include "kda_chunk_tc.cuh"
#include "kda_split_fp16.cuh"
#include "kda_split_records.cuh"

namespace flash_kda {
namespace tc {

// A fact the device compiler cannot see for itself, such as a thread index being non-negative (so
// that a division of it by a power of two needs no signed fix-up: 10 % of the preparation's SASS,
// docs/performance.md v25). nvcc's __builtin_assume; nothing for the host compiler (the emulator).
#if defined(__CUDACC__)
#define FLASH_KDA_ASSUME(x) __builtin_assume(x)
#else
#define FLASH_KDA_ASSUME(x) ((void)0)
#endif

// ---------------------------------------------------------------------------------------------
// Preparation kernel: one block per (slot, value head)
// ---------------------------------------------------------------------------------------------
// The K-side arrays of the fused body's Layout (kda_chunk_tc.cuh), same member names so that its
// phase functions (load_chunk ... scale_for_state) apply, with the whole V width in Vx, no state,
// and T for the inversion.
template <int D_, int C_, int T_ = 256>
struct PrepLayout {
  static constexpr int D = D_;
  static constexpr int VS = D_;                    // the loader fills v's whole width
  static constexpr int C = C_;
  static constexpr int kThreads = T_;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int BS = 16;
  static constexpr int NB = C / BS;
  static constexpr int NPAIR = NB * (NB + 1) / 2;
  static constexpr int LD = D + 4;                 // strides as in tc::Layout (bank-conflict-free)
  static constexpr int LDV = VS + 8;
  static constexpr int LDA = C + 4;

  static constexpr int kK = 0;                      // [C, LD] k -> k e^{γ-γ_r} (apply_T applies e^{γ_r})
  static constexpr int kQ = kK + C * LD;            // [C, LD] q -> q e^{γ-γ_r}
  static constexpr int kKe = kQ + C * LD;           // [C, LD] a -> γ -> k e^{γ_c-γ}
  static constexpr int kG = kKe;
  static constexpr int kVx = kKe + C * LD;          // [C, LDV] v -> U0
  static constexpr int kAkk = kVx + C * LDV;        // [C, LDA]
  static constexpr int kAqk = kAkk + C * LDA;       // [C, LDA]
  static constexpr int kT = kAqk + C * LDA;         // [C, LDA] T = (I + diag(β) A_kk)^{-1} diag(β)
  static constexpr int kM = kT + C * LDA;           // [NPAIR, D]
  static constexpr int kGc = kM + NPAIR * D;        // [NB, D]
  static constexpr int kGm = kGc + NB * D;          // [NB, D]
  static constexpr int kEr = kGm + NB * D;          // [NB, D]
  static constexpr int kEl = kEr + NB * D;          // [NB, D]
  static constexpr int kBeta = kEl + NB * D;        // [C]
  static constexpr int kEg = kBeta + C;             // [D]
  static constexpr int kFlags = kEg + D;            // [4]
  static constexpr int kRed = kFlags + 4;           // [4, kWarps] warps' maxima for the fp16 scales (Q, Klᵀ, A, W)
  static constexpr int kFloats = kRed + 4 * kWarps;
  static constexpr int kSmemBytes = kFloats * 4;
  static constexpr int kMinBlocks = kSmemBytes <= 112 * 1024 ? 2 : 1;
  static constexpr bool kFoldLastM = true;         // the last sub-block's M in its column operand (ditto)
  static constexpr bool kCumsumSplit = kThreads >= 2 * D_;  // cumsum_and_boundaries' split scan
  static constexpr bool kKeepQK = true;            // load_chunk's q, k in registers to scale_for_A (QkRows)
  // prep_block's state-side tiles formed beside compute_A, by the warps without a unit, where they
  // hold at most 4 tiles each (D = 128 at 512 threads; else beside the inversion, as before)
  static constexpr int kUnitWarps = 2 * NPAIR;
  static constexpr bool kEarlyStateSide = 4 * (kWarps - kUnitWarps) >= 2 * (C * D / 256);
  static_assert(C == 32, "invert_T handles two 16-token sub-blocks");
  static_assert((C * D) % kThreads == 0 && C <= kThreads && D <= kThreads, "loader layout");
  static_assert(LD % 32 == 4 && LDA % 32 == 4 && LDV % 32 == 8, "bank-conflict-free fragments");
  static_assert(kK % 4 == 0 && kQ % 4 == 0 && kKe % 4 == 0 && kT % 4 == 0 && kM % 4 == 0, "16-byte rows for ldmatrix");
  static_assert(kAkk % 4 == 0 && kBeta % 4 == 0, "invert_T's float4 loads");
};

// T = (I + diag(β) A_kk)^{-1} diag(β) for a 32-token chunk, by one warp, in three levels of a
// blocked inverse (A_kk is strictly lower triangular, so T is lower triangular and each diagonal
// block of T is the inverse of the matching block of I + diag(β) A_kk, times diag(β)):
//   1. the four 8 x 8 diagonal blocks by forward substitution, lane 8b + j for column j of block b
//      (eight dependent rows, 28 FMAs a lane);
//   2. in each 16-token sub-block, its lower-left 8 x 8 block T21 = -T22 A21 T11 (two mma each);
//   3. the chunk's lower-left 16 x 16 block, the same product on the 16 x 16 blocks (eight mma).
// Warp 0 runs this while warps 1.. form the state-side operands (prep_block), and the block waits
// at a barrier for the longer of the two. In v29's profile that was warp 0, by about 1.7x: the
// one-level form (a 16-row substitution, 120 FMAs a lane, then level 3) issued 373 instructions
// (sm_90a, D = 128), this one 200 (the preparation alone −3 to −6 %, docs/performance.md v30).
//
// The products in levels 2 and 3 take P = A21 T11 as Pᵀ = T11ᵀ A21ᵀ, whose m16n8k8 accumulators are
// the B fragments of T21 = -T22 P as they stand, with the k index of both products permuted inside
// each 8-block (fragment slot t <-> k = 2t, slot t + 4 <-> k = 2t + 1): lane (g, t) holds
// Pᵀ[g][2t], Pᵀ[g][2t + 1] = P[2t][g], P[2t + 1][g], which is B's (k, n) = (2t, g), (2t + 1, g). So P
// never goes through shared memory, T22's A fragments are 8-byte loads, and T11's rows 2t, 2t + 1
// fall on distinct banks (LDA = 36: bank 8t + g). Sums over k do not depend on its order.
// T's strictly upper part is zero in the two 16 x 16 diagonal blocks (apply_T reads them whole)
// and never read in the upper-right 16 x 16 block (apply_T's first row block stops at column 16).
template <class L>
FLASH_KDA_DEVICE void invert_T(float* T, const float* A, const float* beta, Lane l, int lane) {
  constexpr int LDA = L::LDA;
  static_assert(L::BS == 16 && LDA % 4 == 0, "16-token sub-blocks, 16-byte rows");
  // Level 1. Row ii of block b needs A's row 8b + ii up to column 8b + ii - 1: whole float4s of it.
  {
    const int b8 = lane / 8 * 8, j = lane % 8;
    const float4 bl = ld4(beta + b8), bh = ld4(beta + b8 + 4);
    const float bt[8] = {bl.x, bl.y, bl.z, bl.w, bh.x, bh.y, bh.z, bh.w};
    float u[8];
#pragma unroll
    for (int ii = 0; ii < 8; ++ii) {
      const float* row = A + (b8 + ii) * LDA + b8;
      float a[8];
#pragma unroll
      for (int q = 0; q < (ii + 3) / 4; ++q) {
        const float4 x = ld4(row + 4 * q);
        a[4 * q] = x.x, a[4 * q + 1] = x.y, a[4 * q + 2] = x.z, a[4 * q + 3] = x.w;
      }
      float acc = ii == j ? 1.0f : 0.0f;
#pragma unroll
      for (int jj = 0; jj < ii; ++jj) acc -= a[jj] * u[jj];
      u[ii] = bt[ii] * acc;
      T[(b8 + ii) * LDA + b8 + j] = round_tf32(u[ii]);
    }
    // The upper-right 8 x 8 block of each 16 x 16 diagonal block: 2 x 8 rows of two float4s.
    const int r = lane / 2, c = lane % 2 * 4;                     // r < 16: sub-block r / 8, row r % 8
    st4(T + (r / 8 * 16 + r % 8) * LDA + r / 8 * 16 + 8 + c, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
  }
  __syncwarp();
  // Level 2: sub-block s's T21 (rows 16s + 8.., columns 16s..) from its 8 x 8 blocks. Rows g + 8 of
  // the m16 tiles are unused (their A fragments zero).
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const float* T11 = T + 16 * s * LDA + 16 * s;
    const float* T22 = T11 + 8 * LDA + 8;
    const float2 a21 = ld2(A + (16 * s + 8 + l.g) * LDA + 16 * s + 2 * l.t);
    const uint32_t at[4] = {tf32(T11[2 * l.t * LDA + l.g]), 0u, tf32(T11[(2 * l.t + 1) * LDA + l.g]), 0u};
    const uint32_t b[2] = {tf32(a21.x), tf32(a21.y)};
    float pt[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma(pt, at, b);                                                // Pᵀ rows g: P[2t][g], P[2t+1][g]
    const float2 t22 = ld2(T22 + l.g * LDA + 2 * l.t);
    const uint32_t a[4] = {tf32(t22.x), 0u, tf32(t22.y), 0u};
    const uint32_t bp[2] = {tf32(pt[0]), tf32(pt[1])};
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma(d, a, bp);
    st8_aligned(T + (16 * s + 8 + l.g) * LDA + 16 * s + 2 * l.t, make_float2(round_tf32(-d[0]), round_tf32(-d[1])));
  }
  __syncwarp();
  // Level 3: the chunk's T21 (rows 16.., columns 0..15). Pᵀ = T11ᵀ A21ᵀ: m = T11's column, n = A21's
  // row (two tiles nt), k = T11's row (two blocks kb; rows 0..7 of T11 are zero past column 7).
  float pt[2][4];
  zero(pt[0]);
  zero(pt[1]);
#pragma unroll
  for (int kb = 0; kb < 2; ++kb) {
    const float* r0 = T + (8 * kb + 2 * l.t) * LDA + l.g;
    const uint32_t at[4] = {tf32(r0[0]), kb == 0 ? 0u : tf32(r0[8]), tf32(r0[LDA]), kb == 0 ? 0u : tf32(r0[LDA + 8])};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const float2 a21 = ld2(A + (16 + 8 * nt + l.g) * LDA + 8 * kb + 2 * l.t);
      const uint32_t b[2] = {tf32(a21.x), tf32(a21.y)};
      mma(pt[nt], at, b);
    }
  }
  // T21 = -T22 P: m = T22's row, n = P's column (tiles n2: pt's rows g, g + 8), k = P's row (blocks
  // kb: pt[kb]; T22's rows 0..7 are zero past column 7).
  float d[2][4];
  zero(d[0]);
  zero(d[1]);
#pragma unroll
  for (int kb = 0; kb < 2; ++kb) {
    const float* r0 = T + (16 + l.g) * LDA + 16 + 8 * kb + 2 * l.t;
    const float2 lo = kb == 0 ? ld2(r0) : make_float2(0.0f, 0.0f), hi = ld2(r0 + 8 * LDA);
    const uint32_t a[4] = {tf32(lo.x), tf32(hi.x), tf32(lo.y), tf32(hi.y)};
#pragma unroll
    for (int n2 = 0; n2 < 2; ++n2) {
      const uint32_t b[2] = {tf32(pt[kb][2 * n2]), tf32(pt[kb][2 * n2 + 1])};
      mma(d[n2], a, b);
    }
  }
#pragma unroll
  for (int n2 = 0; n2 < 2; ++n2)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      st8_aligned(T + (16 + l.g + 8 * h) * LDA + 8 * n2 + 2 * l.t,
                  make_float2(round_tf32(-d[n2][2 * h]), round_tf32(-d[n2][2 * h + 1])));
}

// One warp's accumulator tile of C = 32 rows (two m16n8 row blocks, acc[mm]) and columns col0 ..
// col0 + 7 to a [32, D] fp16 array in core-matrix order, times s. Row r = 16 mm + 8 half + g lies
// in 8-row group 2 mm + half at row g, and columns col0 + 2t, + 1 in core matrix col0 / 8 at 2t:
// core_offset<D>(r, c) = 8 g + 2t + (2 mm + half) 8 D + 8 col0, so one lane address and constant
// offsets (the compiler cannot see g < 8 in core_offset). A lane's pair is one 4-byte word, and a
// warp's 32 words of one row group fill one 128-byte core matrix (coalesced).
template <int D>
FLASH_KDA_DEVICE void store_tile_f16(__half* dst, const float (&acc)[2][4], float s, int col0, Lane l) {
  __half* tile = dst + 8 * l.g + 2 * l.t + col0 * 8;
#pragma unroll
  for (int mm = 0; mm < 2; ++mm)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      *reinterpret_cast<uint32_t*>(tile + (2 * mm + half) * 8 * D) =
          pack_f16(acc[mm][2 * half] * s, acc[mm][2 * half + 1] * s);
}

// Column tiles of apply_T per warp: tile warp + step kWarps for step < kApplySteps.
template <class L>
constexpr int kApplySteps = (L::D / 8 + L::kWarps - 1) / L::kWarps;

// U0 <- T V, straight from the accumulators to the record in global memory: fp16 in core-matrix
// order (as W, store_w_f16: a warp's 32 lanes fill one 128-byte core matrix per store), each tile of
// 8 channels times the power of two that brings its largest magnitude into [2^14, 2^15) (pow2_scale),
// the inverse into inv_u[tile]. The warp holds its tile's 32 tokens, so the tile's maximum is one
// warp reduction and no barrier. And W <- T (K e^γ) left in the warp's accumulators w (zeros for a
// step past the last tile), for store_w_f16: its fp16 scale needs all of W first.
// A warp takes column tile j of both right-hand sides, so each fragment of T it loads serves
// two products; tiles go to warps in turn, a fixed number per warp (no runtime choice of operand).
// T is lower triangular, so row block m needs k < 16 (m + 1).
// K e^γ is not formed: K holds scale_for_A's K e^{γ-γ_r} (TF32 already), and e^{γ_r(I)} depends on
// the token's sub-block I and the channel only, so W = (T K e^{γ-γ_r})_{tokens of I = 0} e^{γ_r(0)} +
// (the same over I = 1) e^{γ_r(1)}, a factor per accumulator column (Er). Row block 0 meets only
// sub-block 0's tokens; row block 1 sums both, in two accumulators. (A pass that formed K e^γ in
// shared memory first cost 384 of the preparation's ~4,600 shared-memory wavefronts a block,
// docs/performance.md v36.) Lane (g, t)'s B loads, rows t, t + 4 of a k-block at column col0 + g,
// fall 2 to a bank (row stride 4 mod 32): 8 more wavefronts a tile.
template <class L>
FLASH_KDA_DEVICE void apply_T(const float* T, const float* V, const float* K, const float* Er, __half* U0,
                              float* inv_u, float (&w)[kApplySteps<L>][2][4], int warp, Lane l) {
  static_assert(L::C == 32 && L::BS == 16, "two row blocks of 16, one per sub-block");
  constexpr int kTiles = L::D / 8;
  const unsigned t_row = frag_a_row(T, L::LDA, 4 * l.g + l.t);
#pragma unroll
  for (int step = 0; step < kApplySteps<L>; ++step) {
    const int col0 = (warp + step * L::kWarps) * 8;
#pragma unroll
    for (int m = 0; m < 2; ++m) zero(w[step][m]);
    if (kTiles % L::kWarps != 0 && col0 >= L::D) break;
    uint32_t bv[4][2], bk[4][2];
    const float* kp = K + l.t * L::LD + col0 + l.g;
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      load_b_t(bv[kb], V + kb * 8 * L::LDV + col0, L::LDV, l);
      bk[kb][0] = tf32(kp[kb * 8 * L::LD]);
      bk[kb][1] = tf32(kp[(kb * 8 + 4) * L::LD]);
    }
    float u[2][4], w1[4];  // w1: row block 1 over sub-block 1's tokens (k-blocks 2, 3)
    zero(w1);
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      zero(u[m]);
#pragma unroll
      for (int kb = 0; kb < 2 * (m + 1); ++kb) {
        uint32_t a[4];
        ldmatrix_x4(a, t_row + 4 * (m * 16 * L::LDA + kb * 8));
        mma(u[m], a, bv[kb]);
        mma(kb < 2 ? w[step][m] : w1, a, bk[kb]);
      }
    }
    // the accumulators' columns col0 + 2t, + 1 (elements e & 1)
    const float2 e0 = ld2(Er + col0 + 2 * l.t), e1 = ld2(Er + L::D + col0 + 2 * l.t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float f0 = e & 1 ? e0.y : e0.x, f1 = e & 1 ? e1.y : e1.x;
      w[step][0][e] *= f0;
      w[step][1][e] = w[step][1][e] * f0 + w1[e] * f1;
    }
    float mu = 0.0f;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) mu = fmaxf(mu, fabsf(u[m][e]));
    const Pow2 f = pow2_scale(warp_max(mu));
    store_tile_f16<L::D>(U0, u, f.s, col0, l);
    if (l.g == 0 && l.t == 0) inv_u[col0 / 8] = f.inv;
  }
}

// W from apply_T's accumulators to the record: scaled by one power of two for the chunk (the one
// that brings its largest magnitude into [2^14, 2^15), pow2_scale), fp16 in core-matrix order;
// *inv = the inverse scale. Straight from registers: no pass of W through shared
// memory, and one barrier (the chunk's maximum through red, kWarps floats) where a conversion of a
// shared-memory W needed two.
template <class L>
FLASH_KDA_DEVICE void store_w_f16(const float (&w)[kApplySteps<L>][2][4], __half* dst, float* inv, float* red,
                                  int warp, Lane l, int tid) {
  constexpr int kTiles = L::D / 8;
  float m = 0.0f;
#pragma unroll
  for (int step = 0; step < kApplySteps<L>; ++step)
#pragma unroll
    for (int mm = 0; mm < 2; ++mm)
#pragma unroll
      for (int e = 0; e < 4; ++e) m = fmaxf(m, fabsf(w[step][mm][e]));
  m = warp_max(m);
  if (tid % 32 == 0) red[warp] = m;
  port::block_sync();
  const Pow2 f = pow2_scale(max_of<L::kWarps>(red, tid % 32));
#pragma unroll
  for (int step = 0; step < kApplySteps<L>; ++step) {
    const int col0 = (warp + step * L::kWarps) * 8;
    if (kTiles % L::kWarps != 0 && col0 >= L::D) break;
    store_tile_f16<L::D>(dst, w[step], f.s, col0, l);
  }
  if (tid == 0) *inv = f.inv;
}

// Largest magnitudes of the record's Q e^γ and Klᵀ values (their fp16 chunk scales).
struct StateSideMax {
  float q, ke;
};

// The record's Q e^γ [C, D] and Klᵀ [D, C] (row c = channel c of K e^{γ_last - γ}), fp16 in
// core-matrix order, in warp tiles of 32 units of 8 elements (one 16-byte store each): Q e^γ's
// tiles, then Klᵀ's. Warps 1.. form them from scale_for_A's forms while warp 0 inverts (Q e^{γ-γ_r}
// times e^{γ_r(I)}, K e^{γ_c-γ} times e^{γ_last-γ_c(I)}), keep them in registers (v) with their
// largest magnitudes, and store them after the barrier that gives the chunk's scales. (Until v29,
// scale_for_state wrote both arrays to shared memory and every warp read them back after the
// barrier: 512 of a block's ~6,050 shared-memory wavefronts, in a preparation bound by its L1.)
// Tile w of warp rw (of kN / 32): w = rw + k kN / 32. Q tile w: rows 8 rg + lane % 8, columns
// 32 cg + 8 (lane / 8) .. + 7 (rg = w / (D / 32), cg = w % (D / 32)); in core-matrix order its units
// are 4 whole core matrices side by side, so unit (w, lane) lies at half offset 256 w + 8 lane. Klᵀ
// tile t: channel c = 32 (t % (D / 32)) + lane, tokens 8 tb .. 8 tb + 7 (tb = t / (D / 32)), at
// core_offset<C>(c, 8 tb) = 8 C (c / 8) + 64 tb + 8 (c % 8). The shared-memory reads are
// conflict-free (Q: the 8 lanes of a quarter-warp read 8 rows, 4 banks apart with row strides of 4
// mod 32; Klᵀ: a warp's 32 lanes read 32 consecutive channels of one token).
template <class L, int kN>
struct StateSideTiles {
  static constexpr int kQ = L::C * L::D / 256, kTiles = 2 * kQ, kWarpsHere = kN / 32;
  static constexpr int kPer = (kTiles + kWarpsHere - 1) / kWarpsHere;
  static_assert(kN % 32 == 0 && L::C % 32 == 0 && L::D % 32 == 0 && L::BS == 16, "whole warp tiles");
  float v[kPer][8];

  // The tiles' values and largest magnitudes (by threads [0, kN) renumbered). kBesideA: called in
  // compute_A's phase, before split_scan_absolute has stored e^{γ_r(1)}: formed here the same way.
  template <bool kBesideA = false>
  FLASH_KDA_DEVICE StateSideMax form(const float* sm, int tid) {
    constexpr int D = L::D;
    const int lane = tid % 32, rw = tid / 32;
    StateSideMax m{0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int w = rw + k * kWarpsHere;
      if (kTiles % kWarpsHere != 0 && w >= kTiles) break;  // (warp-uniform)
      if (w < kQ) {
        const int rg = w / (D / 32), c = 32 * (w % (D / 32)) + 8 * (lane / 8);
        const float* e = sm + L::kQ + (lane % 8 + 8 * rg) * L::LD + c;
        const float* f = sm + L::kEr + (rg / 2) * D + c;  // e^{γ_r(I)}, I = row / 16 = rg / 2
        float4 f0, f1;
        if (kBesideA && L::kCumsumSplit && rg / 2 == 1) {  // (split_scan_absolute's formula; warp-uniform)
          const float* gc = sm + L::kGc + c;      // γ_c(0) = γ_e(0)
          const float* gm = sm + L::kGm + D + c;  // γ_r(1) in sub-block 1's units
          f0 = fast_exp2(ld4(gc) + ld4(gm));
          f1 = fast_exp2(ld4(gc + 4) + ld4(gm + 4));
        } else {
          f0 = ld4(f);
          f1 = ld4(f + 4);
        }
        const float4 a = ld4(e) * f0, b = ld4(e + 4) * f1;
        v[k][0] = a.x, v[k][1] = a.y, v[k][2] = a.z, v[k][3] = a.w;
        v[k][4] = b.x, v[k][5] = b.y, v[k][6] = b.z, v[k][7] = b.w;
        m.q = fmaxf(m.q, fmaxf(max_abs(a), max_abs(b)));
      } else {
        const int t = w - kQ, tb = t / (D / 32), c = 32 * (t % (D / 32)) + lane;
        const float* e = sm + L::kKe + 8 * tb * L::LD + c;
        const float el = sm[L::kEl + (tb / 2) * D + c];  // e^{γ_last-γ_c(I)}, I = 8 tb / 16
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          v[k][j] = e[j * L::LD] * el;
          m.ke = fmaxf(m.ke, fabsf(v[k][j]));
        }
      }
    }
    return m;
  }

  // Their stores, scaled by the chunk's fq and fkl (the same threads, after the barrier).
  FLASH_KDA_DEVICE void store(__half* rec_h, Pow2 fq, Pow2 fkl, int tid) const {
    using R = Record<L::D, L::C>;
    constexpr int C = L::C, D = L::D;
    const int lane = tid % 32, rw = tid / 32;
    __half* q_dst = rec_h + 2 * R::kQ + 8 * lane;
    __half* kl_dst = rec_h + 2 * R::kKl + (lane / 8) * 8 * C + (lane % 8) * 8;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int w = rw + k * kWarpsHere;
      if (kTiles % kWarpsHere != 0 && w >= kTiles) break;
      if (w < kQ) {
        store8_f16(q_dst + 256 * w, v[k], fq.s);
      } else {
        const int t = w - kQ;
        store8_f16(kl_dst + 32 * C * (t % (D / 32)) + 64 * (t / (D / 32)), v[k], fkl.s);
      }
    }
  }
};

// The warp's largest magnitudes of Q e^γ, Klᵀ (m) and A_qk (ma), each over its lanes, to column
// `slot` of red's first three rows (kWarps floats each), whence the chunk's fp16 scales come.
template <class L>
FLASH_KDA_DEVICE void put_warp_maxima(float* red, int slot, StateSideMax m, float ma, int lane) {
  m.q = warp_max(m.q);
  m.ke = warp_max(m.ke);
  ma = warp_max(ma);
  if (lane == 0) {
    red[slot] = m.q;
    red[L::kWarps + slot] = m.ke;
    red[2 * L::kWarps + slot] = ma;
  }
}

// The rest of the record's state-side part, by threads [0, kN) (all of the preparation's): A_qk's
// core matrices on or below the diagonal (packed: a_group_start) from shared memory to fp16 times its chunk
// scale fa, in warp tiles as StateSideTiles' Q (warp tile w is 8-row group w; its lanes 8c .. 8c + 7
// fill core matrix c, one 128-byte line, and lanes of matrices above the diagonal store nothing),
// then e^{γ_last}, the inverse scales and the padding.
template <class L, int kN>
FLASH_KDA_DEVICE void store_aqk_and_tail(const float* sm, float* rec, Pow2 fq, Pow2 fkl, Pow2 fa, int tid) {
  using R = Record<L::D, L::C>;
  constexpr int C = L::C, D = L::D;
  constexpr unsigned kTiles = C / 8;
  static_assert(kN % 32 == 0 && C == 32, "a warp tile is one 8-row group of 4 core matrices");
  __half* rec_h = reinterpret_cast<__half*>(rec);
  const unsigned lane = static_cast<unsigned>(tid) % 32, cb = lane / 8;
  for (unsigned w = static_cast<unsigned>(tid) / 32; w < kTiles; w += kN / 32) {
    if (cb > w) continue;  // above the diagonal: zero, not stored
    const float* e = sm + L::kAqk + static_cast<int>(lane % 8 + 8 * w) * L::LDA + 8 * static_cast<int>(cb);
    const float4 a = ld4(e), b = ld4(e + 4);
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    // (group w's core matrix cb at packed float a_group_start(w) + 32 cb, row lane % 8 at 4 (lane % 8))
    store8_f16(rec_h + 2 * (R::kA + a_group_start(static_cast<int>(w))) + 8 * static_cast<int>(lane), v, fa.s);
  }
  for (int c = tid; c < D; c += kN) rec[R::kEg + c] = sm[L::kEg + c];
  if (tid == 0) {
    rec[R::kInvQ] = fq.inv;
    rec[R::kInvA] = fa.inv;
    rec[R::kInvKl] = fkl.inv;
    rec[R::kScaleKl] = fkl.s;
  }
  // the padding, which the recurrence copies with the tail: zeros rather than old scratch bytes
  for (int e = R::kScaleKl + 1 + tid; e < R::kFloats; e += kN) rec[e] = 0.0f;
}

// Where record slot `slot` of a varlen call belongs: its sequence n (the last with slot_base(n) <=
// slot), the chunk within it and the sequence's tokens; false for an unused slot (past its sequence's
// last chunk, or past the last sequence, as with a malformed cu_seqlens). The warp's lanes test up to
// 32 boundaries m at once (slot_base(m) = varlen_slot_base(cu_boundary(m), m, C)), narrowing the
// boundaries [lo, hi] that can hold the answer 32-fold per round; the last round (at most 31
// candidates) also loads the boundary after them, so the sequence's start and end come from the same
// loads, by shuffles. Up to 30 sequences take one round of loads, up to 991 two. A binary search took
// log2 N dependent loads, and the bounds were then read again twice (by each of a block's 16 warps:
// +10 % of the varlen preparation's instructions, docs/performance.md v17). Every lane calls it with
// the same slot.
FLASH_KDA_DEVICE bool varlen_slot(const KdaParams& p, int64_t slot, int C, int lane, int& n, int64_t& chunk,
                                  SeqRange& r) {
  int lo = 0, hi = p.num_seqs;  // boundary num_seqs ends the last sequence: as an answer, no sequence
  for (;;) {
    const bool last = hi - lo <= 30;
    const int step = last ? 1 : (hi - lo) / 32 + 1;  // 32 candidates lo + j step cover [lo, hi]
    const int m = lo + lane * step;
    const bool load = m <= (last ? hi + 1 : hi) && m <= p.num_seqs;
    const int64_t a = load ? cu_boundary(p, m) : 0;
    // (boundary num_seqs is loaded as the last sequence's end, never taken as an answer: with a
    // malformed cu_seqlens whose slot bases decrease it could claim slots the old search gave n - 1)
    const unsigned below =
        __ballot_sync(0xffffffffu, load && m <= hi && m < p.num_seqs && varlen_slot_base(a, m, C) <= slot);
    const int k = below == 0 ? 0 : 31 - __clz(below);  // the last candidate at or below the slot
    if (last) {
      // lane k + 1 <= hi - lo + 1 <= 31 loaded boundary n + 1 whenever n < num_seqs
      const int64_t start = __shfl_sync(0xffffffffu, a, k), end = __shfl_sync(0xffffffffu, a, k + 1);
      n = lo + k;
      r = varlen_range(start, end);
      chunk = slot - varlen_slot_base(start, n, C);
      return n < p.num_seqs && chunk >= 0 && chunk * C < r.len;
    }
    lo += k * step;
    hi = lo + step - 1 < hi ? lo + step - 1 : hi;
  }
}

// The (sequence, chunk) of a block's index in the grid, the slot of its record and the sequence's
// tokens: dense by division (index -> sequence, chunk within the stretch), varlen by varlen_slot
// (the index is the slot within the stretch). False for an unused slot.
FLASH_KDA_DEVICE bool slot_chunk(const KdaParams& p, const PrepGrid& g, uint32_t index, int C, int lane, int& n,
                                 int64_t& chunk, int64_t& slot, SeqRange& r) {
  if (p.cu_seqlens == nullptr) {
    uint32_t q, rem;
    g.by_chunks.divmod(index, q, rem);
    n = static_cast<int>(q);
    chunk = g.c_begin + rem;
    slot = static_cast<int64_t>(n) * g.chunks + chunk;
    r = seq_range(p, n);
    return true;
  }
  slot = g.c_begin + index;
  return varlen_slot(p, slot, C, lane, n, chunk, r);
}

template <class L>
FLASH_KDA_DEVICE void prep_block(const KdaParams& p, const PrepGrid& g, float* scratch, float* sm, uint32_t block,
                                 int tid) {
  using R = Record<L::D, L::C>;
  FLASH_KDA_ASSUME(tid >= 0 && tid < L::kThreads);
  uint32_t index, hu;  // (block < 2^31: a grid's x index)
  g.by_hv.divmod(block, index, hu);
  const int h = static_cast<int>(hu);
  portable::Task t;
  int64_t chunk, slot;
  // (uniform: for an unused slot the whole block leaves)
  if (!slot_chunk(p, g, index, L::C, tid % 32, t.n, chunk, slot, t.r)) return;
  t.h = h;
  t.hk = static_cast<int>(g.by_group.div(hu));
  t.v0 = 0;
  const int64_t t0 = chunk * L::C;
  const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
  FLASH_KDA_ASSUME(len >= 1 && len <= L::C && t0 >= 0 && t.h >= 0 && t.hk >= 0);  // (a used slot)
  const int warp = tid / 32;
  const Lane l{(tid % 32) / 4, tid % 4};

  float* rec = scratch + (slot * p.hv + h) * static_cast<int64_t>(R::kFloats);
  __half* rec_h = reinterpret_cast<__half*>(rec);
  float* red = sm + L::kRed;
  const int lane = tid % 32;
  if constexpr (L::kEarlyStateSide) {
    // The warps without a compute_A unit form the record's Q e^γ and Klᵀ (in registers) beside the
    // units, and every warp leaves its largest magnitudes of them and of A_qk in red; after the
    // phase's barrier the stores overlap warp 0's inversion, and only apply_T follows it. (Formed
    // beside the inversion, with the maxima after it, the stores ran after the inversion's barrier,
    // in the same phase as apply_T: docs/performance.md v40.)
    constexpr int kTileThreads = (L::kWarps - L::kUnitWarps) * 32;
    const int tt = tid - L::kUnitWarps * 32;  // (tile warps: their thread index from 0)
    StateSideTiles<L, kTileThreads> tiles;
    k_side_A<L, false>(p, t, t0, len, g.vec, sm, tid, warp, l, [&](int flags, float ma) {
      StateSideMax m{0.0f, 0.0f};
      if (warp >= L::kUnitWarps) {
        m = tiles.template form<true>(sm, tt);
        // a flagged sub-block's diagonal A_qk tile is compute_diag_fallback's (before this phase),
        // not a unit's
        if (flags != 0) {
          for_each_quad<L::C, L::C, kTileThreads>(tt, [&](int i, int j) {
            if (i / L::BS == j / L::BS && ((flags >> (i / L::BS)) & 1))
              ma = fmaxf(ma, max_abs(ld4(sm + L::kAqk + i * L::LDA + j)));
          });
        }
      }
      put_warp_maxima<L>(red, warp, m, ma, lane);
    });
    if (warp == 0) {  // (the phase's longest path: it reads no scale)
      invert_T<L>(sm + L::kT, sm + L::kAkk, sm + L::kBeta, l, tid);
    } else {
      const Pow2 fq = pow2_scale(max_of<L::kWarps>(red, lane));
      const Pow2 fkl = pow2_scale(max_of<L::kWarps>(red + L::kWarps, lane));
      if (warp < L::kUnitWarps) {
        const Pow2 fa = pow2_scale(max_of<L::kWarps>(red + 2 * L::kWarps, lane));
        store_aqk_and_tail<L, (L::kUnitWarps - 1) * 32>(sm, rec, fq, fkl, fa, tid - 32);
      } else {
        tiles.store(rec_h, fq, fkl, tt);
      }
    }
    port::block_sync();  // T visible to every warp, and the stores' reads of A_qk done before apply_T
  } else {
    k_side_A<L, false>(p, t, t0, len, g.vec, sm, tid, warp, l);  // (A_qk goes to the record as fp16)
    constexpr int C = L::C, kRest = L::kThreads - 32, kRestWarps = kRest / 32;
    const int rt = tid - 32;   // (warps 1..: their thread index from 0)
    StateSideTiles<L, kRest> tiles;
    if (warp == 0) {
      invert_T<L>(sm + L::kT, sm + L::kAkk, sm + L::kBeta, l, tid);
    } else {
      // Meanwhile the other warps form the record's Q e^γ and Klᵀ (in registers), with the largest
      // magnitudes: the three fp16 arrays' chunk scales come from one reduction.
      const int rw = rt / 32;
      StateSideMax m = tiles.form(sm, rt);
      float ma = 0.0f;
      for_each_quad<C, C, kRest>(rt, [&](int i, int j) {  // A_qk's written tiles (4 columns: one sub-block)
        if (j / L::BS <= i / L::BS) ma = fmaxf(ma, max_abs(ld4(sm + L::kAqk + i * L::LDA + j)));
      });
      put_warp_maxima<L>(red, rw, m, ma, lane);
    }
    // T and the maxima visible to every warp. One block-wide barrier: the record's state-side
    // stores come after it (Q e^γ and Klᵀ from warps 1..'s registers, A_qk by all warps) and overlap
    // apply_T instead of the inversion. (Session 14's form had warps 1.. store them during the
    // inversion, behind a named barrier of their own, 2-3 % faster in the preparation; compute-
    // sanitizer's racecheck reported a hazard in 7 of 10 of its runs, on store_w_f16's reduction
    // below, and 0 of 10 with every warp at one barrier: docs/performance.md v15. Session 30's
    // wip/a-halves, with named barriers inside compute_A, drew the same kind of report: v30.)
    port::block_sync();
    const Pow2 fq = pow2_scale(max_of<kRestWarps>(red, lane));
    const Pow2 fkl = pow2_scale(max_of<kRestWarps>(red + L::kWarps, lane));
    if (warp != 0) tiles.store(rec_h, fq, fkl, rt);
    const Pow2 fa = pow2_scale(max_of<kRestWarps>(red + 2 * L::kWarps, lane));
    store_aqk_and_tail<L, L::kThreads>(sm, rec, fq, fkl, fa, tid);
  }
  float w[kApplySteps<L>][2][4];
  apply_T<L>(sm + L::kT, sm + L::kVx, sm + L::kK, sm + L::kEr, rec_h + 2 * R::kU, rec + R::kInvU, w, warp, l);
  store_w_f16<L>(w, rec_h + 2 * R::kW, rec + R::kInvW, red + 3 * L::kWarps, warp, l, tid);
}

}  // namespace tc
}  // namespace flash_kda
