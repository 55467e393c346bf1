// kda_chunk_split.cuh: the two-kernel form of the tensor-core body (NVIDIA sm_80 and newer).
//
// Why two kernels. In the fused body (kda_chunk_tc.cuh, run_block) every chunk's K-side (loads,
// norms, decays, A_kk, A_qk: about two thirds of a chunk's time, docs/performance.md) sits on the
// sequential path of the recurrence, in a grid of only sequences x heads x V slices blocks. None of
// it depends on the state, so here it moves to a preparation kernel with one block per (chunk,
// head): every chunk of every sequence at once. It also solves the chunk's triangular system for
// the state-independent right-hand sides. With T = (I + diag(β) A_kk)^{-1} diag(β):
//     U  = T (V - (K e^γ) S0ᵀ) = U0 - W S0ᵀ,   U0 = T V,  W = T (K e^γ)
// so the recurrence kernel is left with three products against the state per chunk and no solve:
//     U = U0 - W S0ᵀ,   O = (Q e^γ) S0ᵀ + A_qk U,   S = S0 diag(e^{γ_last}) + Uᵀ (K e^{γ_last - γ}).
// The price is a scratch round trip (Record below) through global memory, which the recurrence
// overlaps with its math: it copies the next chunk's operands with cp.async while it works.
//
// Scratch. One Record per (slot, value head); the chunks of sequence n use the slots
// [slot_base(n), slot_base(n) + ceil(len_n / C)). Dense: slot_base(n) = n ceil(T / C). Varlen:
// slot_base(n) = floor(start_n / C) + n, which leaves room for every sequence's chunks (the chunks
// of n end at most at floor(start_{n+1} / C) + n + 1) and needs no prefix sum; some slots stay unused.
// Slots stay inside [0, num_slots) even for a malformed cu_seqlens (seq_range clamps it), so no
// access leaves the scratch; but non-increasing starts make sequences share slots, so such input
// gets undefined values (the front end rejects it before launching, as for every body).
#pragma once

#include "../fast_div.h"
#include "../kda_params.h"
#include "../port.cuh"
#include "kda_chunk_tc.cuh"

namespace flash_kda {
namespace tc {

// One chunk's operands for the recurrence, fp32, rows unpadded (row stride D, or C for A_qk).
template <int D, int C>
struct Record {
  static constexpr int kW = 0;             // [C, D] W = T (K e^γ)
  static constexpr int kQ = kW + C * D;    // [C, D] Q e^γ
  static constexpr int kKl = kQ + C * D;   // [D, C] (K e^{γ_last - γ})ᵀ: channel-major for the update
  static constexpr int kU = kKl + C * D;   // [C, V] U0 = T V
  static constexpr int kA = kU + C * D;    // [C, C] A_qk, zero above the diagonal
  static constexpr int kEg = kA + C * C;   // [D] e^{γ_last}
  static constexpr int kFloats = kEg + D;  // a multiple of 4: every array starts 16-byte aligned
  static_assert(kFloats % 4 == 0 && D % 4 == 0 && C % 4 == 0, "16-byte rows");
};

FLASH_KDA_HD int64_t chunks_of(int64_t len, int C) { return (len + C - 1) / C; }

FLASH_KDA_HD int64_t slot_base(const KdaParams& p, int n, int C) {
  if (p.cu_seqlens == nullptr) return static_cast<int64_t>(n) * chunks_of(p.seq_len, C);
  return seq_range(p, n).start / C + n;
}

FLASH_KDA_HD int64_t num_slots(const KdaParams& p, int C) {
  if (p.cu_seqlens == nullptr) return static_cast<int64_t>(p.num_seqs) * chunks_of(p.seq_len, C);
  return p.seq_len / C + p.num_seqs;
}

// What every preparation block would otherwise derive from p in each of its warps (about 200 of
// the ~1,600 instructions a warp executed per chunk, docs/performance.md v9): the divisors that split
// the block index, as FastDiv, and whether every input can be read by 16-byte loads. Computed once
// per launch on the host (make_prep_grid) and passed beside p.
//
// A launch may cover a stretch of chunks [c_begin, c_end) of every sequence (dense only; see Piece):
// its grid then holds (sequences x stretch length x value heads) blocks, and a block's grid index is
// not its slot.
struct PrepGrid {
  FastDiv by_hv;      // block -> (index in the stretch, value head)
  FastDiv by_group;   // value head -> query/key head (hv / hqk value heads share one)
  FastDiv by_chunks;  // dense: index -> (sequence, chunk - c_begin); the stretch's length, < 2^31
  int64_t c_begin;    // dense: the stretch's first chunk (varlen: 0, the whole grid)
  int64_t chunks;     // dense: chunks per sequence, so that slot = sequence * chunks + chunk
  VecOk vec;          // vec_ok of p
};

// The preparation's grid for chunks [c_begin, c_end) of every sequence (dense), or for every slot
// (varlen: c_begin = 0, c_end unused). prep_blocks gives its size.
template <class L>
PrepGrid make_prep_grid(const KdaParams& p, int64_t c_begin = 0, int64_t c_end = -1) {
  PrepGrid g;
  const int64_t chunks = p.cu_seqlens == nullptr ? chunks_of(p.seq_len, L::C) : 1;
  if (c_end < 0 || c_end > chunks) c_end = chunks;
  g.by_hv = FastDiv::of(p.hv);
  g.by_group = FastDiv::of(p.hv / p.hqk);
  // A stretch index is below 2^31 (it comes from a grid's x index), so capping the divisor at
  // 2^31 - 1 changes no quotient: a longer stretch holds every index as a chunk of sequence 0.
  g.by_chunks = FastDiv::of(p.cu_seqlens == nullptr ? c_end - c_begin : 1);
  g.c_begin = p.cu_seqlens == nullptr ? c_begin : 0;
  g.chunks = chunks;
  g.vec = vec_ok<L>(p);
  return g;
}

// Bytes of scratch the split path's records need for p (the host sizes the workspace with it).
template <int D, int C>
FLASH_KDA_HD int64_t split_scratch_bytes(const KdaParams& p) {
  return num_slots(p, C) * p.hv * static_cast<int64_t>(Record<D, C>::kFloats) * 4;
}

// One piece of a call cut into stretches of chunks (dense only): the preparation and the recurrence
// of chunks [c_begin, c_end) of every sequence, so that the recurrence of one stretch can run beside
// the preparation of the next (kda_cuda.cu, launch_split). A stretch that does not start at chunk 0
// takes its initial state from `carry`, one that does not reach the end leaves its state there.
// A call in one piece is {0, kAllChunks, nullptr}: the user's states at both ends.
struct Piece {
  int64_t c_begin;
  int64_t c_end;  // clipped to the sequence's chunk count
  float* carry;   // fp32 [N, hv, D, D] (value-major, contiguous); null for a call in one piece
};
constexpr int64_t kAllChunks = INT64_MAX;

// Bytes of the carry state for p (needed only when a call is cut into several pieces).
template <int D>
FLASH_KDA_HD int64_t carry_bytes(const KdaParams& p) {
  return static_cast<int64_t>(p.num_seqs) * p.hv * D * D * 4;
}

// Stretch i of `pieces` over `chunks` chunks: [i chunks / pieces, (i + 1) chunks / pieces), so the
// stretches differ in length by at most one chunk and none is empty while pieces <= chunks.
FLASH_KDA_HD int64_t stretch_begin(int64_t chunks, int64_t pieces, int64_t i) { return i * chunks / pieces; }

// The host side of pieces, shared by the launcher (kda_cuda.cu) and the CPU emulator
// (tests/simt/cuda_sim.cpp), so that the emulator runs the schedule the GPU gets.
//
// How many pieces a call of chunk length C is cut into when `asked` are asked for: dense calls only
// (the host cannot see varlen lengths without a copy from the device), at most one per chunk.
inline int64_t split_pieces(const KdaParams& p, int C, int64_t asked) {
  if (asked < 2 || p.cu_seqlens != nullptr) return 1;
  const int64_t chunks = chunks_of(p.seq_len, C);
  return asked < chunks ? asked : (chunks > 1 ? chunks : 1);
}

// Workspace of the split form cut into `pieces`: the records, then (pieces > 1) the carry, which
// starts 16-byte aligned since a record is a whole number of 16-byte rows.
template <int D, int C>
int64_t split_workspace_bytes(const KdaParams& p, int64_t pieces) {
  return split_scratch_bytes<D, C>(p) + (pieces > 1 ? carry_bytes<D>(p) : 0);
}

// Enqueues the pieces in order: prep(c_begin, c_end) for the stretch's preparation, then
// rec(piece) for its recurrence. `pieces` as split_pieces returned it; one piece covers every
// chunk with the user's states at both ends (c_end = kAllChunks, no carry).
template <int D, int C, class Prep, class Rec>
void enqueue_pieces(const KdaParams& p, int64_t pieces, Prep&& prep, Rec&& rec) {
  if (pieces <= 1) {
    prep(int64_t{0}, kAllChunks);
    rec(Piece{0, kAllChunks, nullptr});
    return;
  }
  const int64_t chunks = chunks_of(p.seq_len, C);
  float* carry = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + split_scratch_bytes<D, C>(p));
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t c_begin = stretch_begin(chunks, pieces, i), c_end = stretch_begin(chunks, pieces, i + 1);
    prep(c_begin, c_end);
    rec(Piece{c_begin, i + 1 == pieces ? kAllChunks : c_end, carry});
  }
}

// Blocks of the preparation's grid for chunks [c_begin, c_end) of every dense sequence (c_end
// clipped to the chunk count), or for every slot of a varlen call (one piece).
inline int64_t prep_blocks(const KdaParams& p, int C, int64_t c_begin, int64_t c_end) {
  if (p.cu_seqlens != nullptr) return num_slots(p, C) * p.hv;
  const int64_t chunks = chunks_of(p.seq_len, C);
  if (c_end > chunks) c_end = chunks;
  return c_end > c_begin ? p.num_seqs * (c_end - c_begin) * p.hv : 0;
}

// (cp_async16, shared_address, cp_async_commit, cp_async_wait: ptx.cuh)

// A [ROWS, COLS] tile from src (row stride LDS) to dst (row stride LDD), 16 bytes per copy. The
// thread's first source and destination addresses are formed once; every further copy of the thread
// is a constant offset from them, which the copy instruction takes as an immediate. (Offsets formed
// in int and then added to the pointer cost a 64-bit multiply-add chain per copy instead: 19 % of
// the recurrence's instructions, docs/performance.md v6.)
template <int ROWS, int COLS, int LDS, int LDD, int kThreads>
FLASH_KDA_DEVICE void copy_tile_async(float* dst, const float* src, int tid) {
  constexpr int kPerRow = COLS / 4, kItems = ROWS * kPerRow;
  if constexpr (kThreads % kPerRow == 0) {
    constexpr int kRowStep = kThreads / kPerRow;
    const int r0 = tid / kPerRow, c = (tid % kPerRow) * 4;
    const float* s = src + (r0 * LDS + c);
    const unsigned d = shared_address(dst + r0 * LDD + c);
#pragma unroll
    for (int k = 0; k < (kItems + kThreads - 1) / kThreads; ++k) {
      if (kItems % kThreads == 0 || r0 + k * kRowStep < ROWS) {
        cp_async16(d + k * kRowStep * LDD * 4, s + k * kRowStep * LDS);
      }
    }
  } else {
    for_each_quad<ROWS, COLS, kThreads>(
        tid, [&](int r, int c) { cp_async16(shared_address(dst + r * LDD + c), src + r * LDS + c); });
  }
}

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

  static constexpr int kK = 0;                      // [C, LD] k -> k e^{γ-γ_r} -> k e^γ -> W
  static constexpr int kQ = kK + C * LD;            // [C, LD] q -> q e^{γ-γ_r} -> q e^γ
  static constexpr int kKe = kQ + C * LD;           // [C, LD] a -> γ -> k e^{γ_e-γ} -> k e^{γ_last-γ}
  static constexpr int kG = kKe;
  static constexpr int kVx = kKe + C * LD;          // [C, LDV] v -> U0
  static constexpr int kAkk = kVx + C * LDV;        // [C, LDA]
  static constexpr int kAqk = kAkk + C * LDA;       // [C, LDA]
  static constexpr int kT = kAqk + C * LDA;         // [C, LDA] T = (I + diag(β) A_kk)^{-1} diag(β)
  static constexpr int kM = kT + C * LDA;           // [NPAIR, D]
  static constexpr int kGb = kM + NPAIR * D;        // [NB + 1, D]
  static constexpr int kGm = kGb + (NB + 1) * D;    // [NB, D]
  static constexpr int kEr = kGm + NB * D;          // [NB, D]
  static constexpr int kEl = kEr + NB * D;          // [NB, D]
  static constexpr int kBeta = kEl + NB * D;        // [C]
  static constexpr int kEg = kBeta + C;             // [D]
  static constexpr int kFlags = kEg + D;            // [4]
  static constexpr int kFloats = kFlags + 4;
  static constexpr int kSmemBytes = kFloats * 4;
  static constexpr int kMinBlocks = kSmemBytes <= 112 * 1024 ? 2 : 1;
  static_assert(C == 32, "invert_T handles two 16-token sub-blocks");
  static_assert((C * D) % kThreads == 0 && C <= kThreads && D <= kThreads, "loader layout");
  static_assert(LD % 32 == 4 && LDA % 32 == 4 && LDV % 32 == 8, "bank-conflict-free fragments");
  static_assert(kK % 4 == 0 && kQ % 4 == 0 && kKe % 4 == 0 && kT % 4 == 0 && kM % 4 == 0, "16-byte rows for ldmatrix");
};

// T = (I + diag(β) A_kk)^{-1} diag(β) for a 32-token chunk, by one warp. Lane j < 16 substitutes
// column j of the identity through the first sub-block (T11), lane 16 + j through the second (T22);
// then T21 = -T22 A21 T11 on the tensor cores. (A_kk is strictly lower triangular.)
template <class L>
FLASH_KDA_DEVICE void invert_T(float* T, const float* A, const float* beta, Lane l, int lane) {
  constexpr int LDA = L::LDA, BS = L::BS;
  const int base = (lane / BS) * BS, j = lane % BS;
  float u[BS];
#pragma unroll
  for (int ii = 0; ii < BS; ++ii) {
    const int i = base + ii;
    float acc = ii == j ? 1.0f : 0.0f;
#pragma unroll
    for (int jj = 0; jj < ii; ++jj) acc -= A[i * LDA + base + jj] * u[jj];
    u[ii] = beta[i] * acc;
    T[i * LDA + base + j] = round_tf32(u[ii]);
    if (base == 0) T[i * LDA + BS + j] = 0.0f;  // T12
  }
  __syncwarp();
  // P = A21 T11 (16 x 16) into T21's place, then T21 = -T22 P.
  float pc[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    zero(pc[nt]);
#pragma unroll
    for (int kb = 0; kb < BS; kb += 8) {
      uint32_t a[4], b[2];
      load_a(a, A + BS * LDA + kb, LDA, l);
      load_b_t(b, T + kb * LDA + nt * 8, LDA, l);
      mma(pc[nt], a, b);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      T[(BS + l.g + (e >= 2 ? 8 : 0)) * LDA + nt * 8 + 2 * l.t + (e & 1)] = pc[nt][e];
  __syncwarp();
  uint32_t b[2][2][2];  // [nt][kb][2]: all of P before T21 is overwritten
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) load_b_t(b[nt][kb], T + (BS + kb * 8) * LDA + nt * 8, LDA, l);
  __syncwarp();
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    float acc[4];
    zero(acc);
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
      uint32_t a[4];
      load_a(a, T + BS * LDA + BS + kb * 8, LDA, l);
      mma(acc, a, b[nt][kb]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
      T[(BS + l.g + (e >= 2 ? 8 : 0)) * LDA + nt * 8 + 2 * l.t + (e & 1)] = round_tf32(-acc[e]);
  }
}

// U0 <- T V and W <- T (K e^γ), straight from the accumulators to the record (rows of stride D; each
// quad of lanes writes 32 contiguous bytes per row). A warp takes column tile j of both right-hand
// sides, so each fragment of T it loads serves two products; tiles go to warps in turn, a fixed
// number per warp (no runtime choice of operand). W is an operand from here on: rounded to TF32
// once, as the fused body's producers do; U0 is not (the recurrence subtracts from it in fp32).
// T is lower triangular, so row block m needs k < 16 (m + 1).
template <class L>
FLASH_KDA_DEVICE void apply_T(const float* T, const float* V, const float* K, float* U0, float* W, int warp,
                              Lane l) {
  static_assert(L::C == 32, "two row blocks of 16");
  constexpr int kTiles = L::D / 8, kSteps = (kTiles + L::kWarps - 1) / L::kWarps;
  const unsigned t_row = frag_a_row(T, L::LDA, 4 * l.g + l.t);
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int col0 = (warp + step * L::kWarps) * 8;
    if (kTiles % L::kWarps != 0 && col0 >= L::D) break;
    uint32_t bv[4][2], bk[4][2];
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      load_b_t(bv[kb], V + kb * 8 * L::LDV + col0, L::LDV, l);
      load_b_t(bk[kb], K + kb * 8 * L::LD + col0, L::LD, l);
    }
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      float u[4], w[4];
      zero(u);
      zero(w);
#pragma unroll
      for (int kb = 0; kb < 2 * (m + 1); ++kb) {
        uint32_t a[4];
        ldmatrix_x4(a, t_row + 4 * (m * 16 * L::LDA + kb * 8));
        mma(u, a, bv[kb]);
        mma(w, a, bk[kb]);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int o = (m * 16 + l.g + 8 * half) * L::D + col0 + 2 * l.t;
        *reinterpret_cast<float2*>(U0 + o) = make_float2(u[2 * half], u[2 * half + 1]);
        *reinterpret_cast<float2*>(W + o) = make_float2(round_tf32(w[2 * half]), round_tf32(w[2 * half + 1]));
      }
    }
  }
}

// The (sequence, chunk) of a block's index in the grid, and the slot of its record: dense by
// division (index -> sequence, chunk within the stretch), varlen by binary search over slot_base
// (the index is the slot). False for an unused slot.
FLASH_KDA_DEVICE bool slot_chunk(const KdaParams& p, const PrepGrid& g, uint32_t index, int C, int& n,
                                 int64_t& chunk, int64_t& slot) {
  if (p.cu_seqlens == nullptr) {
    uint32_t q, r;
    g.by_chunks.divmod(index, q, r);
    n = static_cast<int>(q);
    chunk = g.c_begin + r;
    slot = static_cast<int64_t>(n) * g.chunks + chunk;
    return true;
  }
  slot = index;
  int lo = 0, hi = p.num_seqs - 1;  // largest n with slot_base(n) <= slot
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (slot_base(p, mid, C) <= slot) lo = mid; else hi = mid - 1;
  }
  n = lo;
  chunk = slot - slot_base(p, n, C);
  return chunk >= 0 && chunk * C < seq_range(p, n).len;
}

// Copies a [ROWS, COLS] array (row stride LDS floats) to global rows of stride COLS, 16 bytes a step.
template <int ROWS, int COLS, int LDS, int kThreads>
FLASH_KDA_DEVICE void store_rows(float* dst, const float* src, int tid) {
  for_each_quad<ROWS, COLS, kThreads>(tid, [&](int r, int c) { st4_global(dst + r * COLS + c, ld4(src + r * LDS + c)); });
}

template <class L>
FLASH_KDA_DEVICE void prep_block(const KdaParams& p, const PrepGrid& g, float* scratch, float* sm, uint32_t block,
                                 int tid) {
  using R = Record<L::D, L::C>;
  uint32_t index, hu;  // (block < 2^31: a grid's x index)
  g.by_hv.divmod(block, index, hu);
  const int h = static_cast<int>(hu);
  portable::Task t;
  int64_t chunk, slot;
  if (!slot_chunk(p, g, index, L::C, t.n, chunk, slot)) return;  // uniform: the whole block leaves
  t.h = h;
  t.hk = static_cast<int>(g.by_group.div(hu));
  t.v0 = 0;
  t.r = seq_range(p, t.n);
  const int64_t t0 = chunk * L::C;
  const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
  const int warp = tid / 32;
  const Lane l{(tid % 32) / 4, tid % 4};

  k_side_A<L>(p, t, t0, len, g.vec, sm, tid, warp, l);

  float* rec = scratch + (slot * p.hv + h) * static_cast<int64_t>(R::kFloats);
  constexpr int C = L::C, D = L::D, kRest = L::kThreads - 32;
  if (warp == 0) {
    invert_T<L>(sm + L::kT, sm + L::kAkk, sm + L::kBeta, l, tid);
  } else {
    // Meanwhile the other warps finish the state-side operands and store every part of the record
    // that does not need T, so those stores overlap the inversion (a barrier of their own).
    const int rt = tid - 32;
    scale_for_state<L, kRest>(sm, rt);
    named_barrier<1, kRest>();
    store_rows<C, D, L::LD, kRest>(rec + R::kQ, sm + L::kQ, rt);
    for_each_quad<D, C, kRest>(rt, [&](int c, int i) {  // transposed: row c of Klᵀ, tokens i..i+3
      const float* col = sm + L::kKe + i * L::LD + c;
      st4_global(rec + R::kKl + c * C + i, make_float4(col[0], col[L::LD], col[2 * L::LD], col[3 * L::LD]));
    });
    // A_qk: compute_A leaves the tiles above the diagonal sub-blocks unwritten; store zeros there.
    // (Four columns never straddle a 16-column sub-block.)
    for_each_quad<C, C, kRest>(rt, [&](int i, int j) {
      st4_global(rec + R::kA + i * C + j, j / L::BS <= i / L::BS ? ld4(sm + L::kAqk + i * L::LDA + j)
                                                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
    });
    for (int c = rt; c < D; c += kRest) rec[R::kEg + c] = sm[L::kEg + c];
  }
  port::block_sync();  // T and the state-side K visible
  apply_T<L>(sm + L::kT, sm + L::kVx, sm + L::kK, rec + R::kU, rec + R::kW, warp, l);
}

// ---------------------------------------------------------------------------------------------
// Recurrence kernel: one block per (sequence, value head, V slice)
// ---------------------------------------------------------------------------------------------
// Each warp owns 16 rows of the state for the whole sequence and keeps them in registers, as the
// accumulators of the state update (fp32). The same registers are the A operand of the
// projections: an mma's contraction order is free, so the k index of an A fragment is permuted to
// match the accumulator layout (k = t <-> column 2t, k = t + 4 <-> column 2t + 1), and the B operands
// are read in the same order, as adjacent pairs (8-byte loads). The projections run transposed,
//     Xᵀ = S0 Wᵀ,  Oᵀ = S0 (Q e^γ)ᵀ,  Uᵀ = U0ᵀ - Xᵀ,  Oᵀ += Uᵀ A_qkᵀ,  S = S diag(e^{γ_last}) + Uᵀ Kl,
// so U, O and S never leave the warp: no barrier inside a chunk, only around the operand buffers.
// Shared memory holds a ring of kStages chunk operand buffers; with two, the copies of chunk c + 1
// are issued when chunk c starts.
template <int D_, int VS_, int C_, int kStages_>
struct RecurrenceLayout {
  static constexpr int D = D_, VS = VS_, C = C_, kStages = kStages_;
  static constexpr int kWarps = VS / 16;            // 16 state rows per warp
  static constexpr int kThreads = kWarps * 32;
  static constexpr int NVS = D / VS;
  // Row strides: pairs read by 8 lanes x 4 rows per half-warp need stride = 8 (mod 32); the
  // scalar U0 reads (4 rows x 8 columns) need 4 (mod 32).
  static constexpr int LDW = D + 8;                 // W, Q e^γ: [C, LDW]
  static constexpr int LDK = C + 8;                 // Klᵀ: [D, LDK]; A_qk: [C, LDK]
  static constexpr int LDU = VS + 4;                // U0: [C, LDU]
  static constexpr int kW = 0;
  static constexpr int kQ = kW + C * LDW;
  static constexpr int kKl = kQ + C * LDW;
  static constexpr int kU = kKl + D * LDK;
  static constexpr int kA = kU + C * LDU;
  static constexpr int kEg = kA + C * LDK;
  static constexpr int kStage = kEg + D;
  static constexpr int kFloats = kStages * kStage;
  static constexpr int kSmemBytes = kFloats * 4;
  static constexpr int kMinBlocks = 1;
  static_assert(kStages == 1 || kStages == 2, "one or two operand buffers");
  static_assert(VS % 16 == 0 && C % 8 == 0 && D % 8 == 0, "mma tiling");
  static_assert(LDW % 32 == 8 && LDK % 32 == 8 && LDU % 32 == 4, "bank-conflict-free fragments");
  static_assert(kStage % 4 == 0, "16-byte aligned stages");
};

FLASH_KDA_DEVICE float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }

// Issues the copies of one chunk's operands (the block's V slice of U0) into a stage buffer.
template <class L>
FLASH_KDA_DEVICE void fetch_chunk(const float* rec, int v0, float* st, int tid) {
  using R = Record<L::D, L::C>;
  constexpr int C = L::C, D = L::D, T = L::kThreads;
  copy_tile_async<C, D, D, L::LDW, T>(st + L::kW, rec + R::kW, tid);
  copy_tile_async<C, D, D, L::LDW, T>(st + L::kQ, rec + R::kQ, tid);
  copy_tile_async<D, C, C, L::LDK, T>(st + L::kKl, rec + R::kKl, tid);
  copy_tile_async<C, L::VS, D, L::LDU, T>(st + L::kU, rec + R::kU + v0, tid);
  copy_tile_async<C, C, C, L::LDK, T>(st + L::kA, rec + R::kA, tid);
  copy_tile_async<1, D, D, D, T>(st + L::kEg, rec + R::kEg, tid);
}

// A fragment from an accumulator tile, in the permuted k order described above.
FLASH_KDA_DEVICE void acc_as_a(uint32_t (&a)[4], const float (&c)[4]) {
  a[0] = tf32(c[0]);
  a[1] = tf32(c[2]);
  a[2] = tf32(c[1]);
  a[3] = tf32(c[3]);
}
// B fragment from an adjacent pair (k = t, t + 4 in the permuted order).
FLASH_KDA_DEVICE void pair_as_b(uint32_t (&b)[2], float2 x) {
  b[0] = tf32(x.x);
  b[1] = tf32(x.y);
}

// Where a block's state comes from or goes: the user's states, or a piece's carry (fp32).
struct StateRef {
  void* ptr;  // null: no state (zero in, nothing out)
  StateStrides strides;
  bool fp32;
};
FLASH_KDA_DEVICE StateRef carry_ref(const KdaParams& p, const Piece& piece, int64_t D) {
  return StateRef{piece.carry, StateStrides{p.hv * D * D, D * D, D}, true};
}
FLASH_KDA_DEVICE StateRef initial_ref(const KdaParams& p, const Piece& piece, int64_t D) {
  if (piece.c_begin == 0) return StateRef{const_cast<void*>(p.initial_state), p.h0_strides, p.state_fp32};
  return carry_ref(p, piece, D);
}
FLASH_KDA_DEVICE StateRef final_ref(const KdaParams& p, const Piece& piece, int64_t nchunks, int64_t D) {
  if (piece.c_end >= nchunks) return StateRef{p.final_state, p.ht_strides, p.state_fp32};
  return carry_ref(p, piece, D);
}

// Reads or writes the warp's state rows: element e of tile nt is (row r(e), channel c(e)).
template <class L, bool kStore>
FLASH_KDA_DEVICE void state_rows_io(const StateRef& ref, const portable::Task& t, int row0, Lane l,
                                    float (&s)[L::D / 8][4]) {
#pragma unroll
  for (int nt = 0; nt < L::D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int v = t.v0 + row0 + l.g + (e >= 2 ? 8 : 0), c = nt * 8 + 2 * l.t + (e & 1);
      // (The offset is formed inside each branch: formed once before them, ptxas stopped hoisting
      // the output addresses out of the chunk loop, +80 instructions per chunk at D = 128 VS 64.)
      if (kStore) {
        port::store_from_float(ref.ptr, state_offset(ref.strides, t.n, t.h, v) + c, ref.fp32, s[nt][e]);
      } else {
        s[nt][e] = ref.ptr == nullptr
                       ? 0.0f
                       : port::load_as_float(ref.ptr, state_offset(ref.strides, t.n, t.h, v) + c, ref.fp32);
      }
    }
}

// One chunk for one warp: rows [row0, row0 + 16) of the block's slice, operands in stage `st`.
template <class L>
FLASH_KDA_DEVICE void recurrence_chunk(const KdaParams& p, const portable::Task& t, int64_t t0, int len,
                                       const float* st, int row0, Lane l, float (&s)[L::D / 8][4]) {
  constexpr int NT = L::C / 8;  // token tiles
  float x[NT][4], o[NT][4];     // Xᵀ -> Uᵀ, Oᵀ: [16 rows, C tokens]
#pragma unroll
  for (int it = 0; it < NT; ++it) {
    zero(x[it]);
    zero(o[it]);
  }
  const float* W = st + L::kW + l.g * L::LDW + 2 * l.t;
  const float* Q = st + L::kQ + l.g * L::LDW + 2 * l.t;
#pragma unroll
  for (int nt = 0; nt < L::D / 8; ++nt) {
    uint32_t a[4];
    acc_as_a(a, s[nt]);
#pragma unroll
    for (int it = 0; it < NT; ++it) {
      uint32_t b[2];
      pair_as_b(b, ld2(W + it * 8 * L::LDW + nt * 8));
      mma(x[it], a, b);
      pair_as_b(b, ld2(Q + it * 8 * L::LDW + nt * 8));
      mma(o[it], a, b);
    }
  }
  const float* U0 = st + L::kU + row0 + l.g;
#pragma unroll
  for (int it = 0; it < NT; ++it)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = it * 8 + 2 * l.t + (e & 1);
      x[it][e] = U0[i * L::LDU + (e >= 2 ? 8 : 0)] - x[it][e];
    }
  // Oᵀ += Uᵀ A_qkᵀ over the causal token tiles (A_qk is zero above its diagonal).
  const float* A = st + L::kA + l.g * L::LDK + 2 * l.t;
#pragma unroll
  for (int jt = 0; jt < NT; ++jt) {
    uint32_t a[4];
    acc_as_a(a, x[jt]);
#pragma unroll
    for (int it = jt; it < NT; ++it) {
      uint32_t b[2];
      pair_as_b(b, ld2(A + it * 8 * L::LDK + jt * 8));
      mma(o[it], a, b);
    }
  }
  port::input_t* out = static_cast<port::input_t*>(p.out);
#pragma unroll
  for (int it = 0; it < NT; ++it)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = it * 8 + 2 * l.t + (e & 1);
      if (i < len) {
        const int v = t.v0 + row0 + l.g + (e >= 2 ? 8 : 0);
        out[token_offset(p.out_strides, t.r, t0 + i, t.h) + v] = port::from_float<port::input_t>(o[it][e]);
      }
    }
  // S <- S diag(e^{γ_last}) + Uᵀ Kl.
  const float* eg = st + L::kEg + 2 * l.t;
  const float* Kl = st + L::kKl + l.g * L::LDK + 2 * l.t;
#pragma unroll
  for (int nt = 0; nt < L::D / 8; ++nt) {
    const float2 e2 = ld2(eg + nt * 8);
    s[nt][0] *= e2.x;
    s[nt][1] *= e2.y;
    s[nt][2] *= e2.x;
    s[nt][3] *= e2.y;
  }
#pragma unroll
  for (int it = 0; it < NT; ++it) {
    uint32_t a[4];
    acc_as_a(a, x[it]);
#pragma unroll
    for (int nt = 0; nt < L::D / 8; ++nt) {
      uint32_t b[2];
      pair_as_b(b, ld2(Kl + nt * 8 * L::LDK + it * 8));
      mma(s[nt], a, b);
    }
  }
}

// Chunks [piece.c_begin, piece.c_end) of the block's sequence (all of them for a call in one piece).
template <class L>
FLASH_KDA_DEVICE void recurrence_block(const KdaParams& p, const Piece& piece, const float* scratch, float* sm,
                                       int block, int tid) {
  using R = Record<L::D, L::C>;
  portable::Task t = portable::block_task<L>(p, block);
  const int row0 = (tid / 32) * 16;
  const Lane l{(tid % 32) / 4, tid % 4};
  const int64_t nchunks = chunks_of(t.r.len, L::C);
  const int64_t c_begin = piece.c_begin < nchunks ? piece.c_begin : nchunks;
  const int64_t c_end = piece.c_end < nchunks ? piece.c_end : nchunks;
  const int64_t rec_step = static_cast<int64_t>(p.hv) * R::kFloats;  // next slot, same head
  const float* rec0 =
      scratch + (slot_base(p, t.n, L::C) * p.hv + t.h) * static_cast<int64_t>(R::kFloats) + c_begin * rec_step;

  if (c_begin < c_end) fetch_chunk<L>(rec0, t.v0, sm, tid);
  cp_async_commit();
  float s[L::D / 8][4];
  state_rows_io<L, false>(initial_ref(p, piece, L::D), t, row0, l, s);
  // From here on the stretch is the sequence: its chunk c is the sequence's chunk c_begin + c, so the
  // loop is the one-piece loop (a stretch starting at an odd chunk still starts in stage 0).
  t.r.start += c_begin * L::C;
  t.r.len -= c_begin * L::C;
  const int64_t count = c_end - c_begin;
  int64_t next = 0;  // offset of chunk c + 1's record from rec0 (a step per chunk, no multiply)
  for (int64_t c = 0; c < count; ++c) {
    next += rec_step;
    port::block_sync();  // every warp is done with chunk c - 1's buffer
    if (L::kStages == 2) {
      if (c + 1 < count) fetch_chunk<L>(rec0 + next, t.v0, sm + ((c + 1) & 1) * L::kStage, tid);
      cp_async_commit();   // possibly empty: one group per chunk keeps the count exact
      cp_async_wait<1>();  // every group but the newest, i.e. chunk c's, has landed
    } else {
      if (c > 0) fetch_chunk<L>(rec0 + (next - rec_step), t.v0, sm, tid);
      cp_async_commit();
      cp_async_wait<0>();
    }
    port::block_sync();
    const int64_t t0 = c * L::C;
    const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
    recurrence_chunk<L>(p, t, t0, len, sm + (L::kStages == 2 ? (c & 1) * L::kStage : 0), row0, l, s);
  }
  cp_async_wait<0>();
  const StateRef out = final_ref(p, piece, nchunks, L::D);
  if (out.ptr != nullptr) state_rows_io<L, true>(out, t, row0, l, s);
}

}  // namespace tc
}  // namespace flash_kda
