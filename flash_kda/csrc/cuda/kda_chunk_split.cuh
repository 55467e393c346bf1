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

// A fact the device compiler cannot see for itself, such as a thread index being non-negative (so
// that a division of it by a power of two needs no signed fix-up: 10 % of the preparation's SASS,
// docs/performance.md v25). nvcc's __builtin_assume; nothing for the host compiler (the emulator).
#if defined(__CUDACC__)
#define FLASH_KDA_ASSUME(x) __builtin_assume(x)
#else
#define FLASH_KDA_ASSUME(x) ((void)0)
#endif

// A_qk [C, C] in core-matrix order (core_offset<C> below) without its core matrices above the
// diagonal: 8-row group g keeps its blocks c = 0..g, which lie side by side in the full layout too,
// so group g is one contiguous run of (g + 1) 32 floats, starting at a_group_start(g) in the packed
// array and at 4 C g (g's offset in the full [C, C] layout) in a recurrence stage.
FLASH_KDA_HD constexpr int a_group_start(int g) { return 16 * g * (g + 1); }  // 32 floats x blocks before g
FLASH_KDA_HD constexpr int a_packed_floats(int C) { return a_group_start(C / 8); }

// One chunk's operands for the recurrence (offsets in floats). The B operands of its fp16 products
// come as scaled fp16 arrays in core-matrix order (core_offset below), two halves per float. U0
// (which the recurrence subtracts from) is fp16 in the same order, with one power-of-two scale per
// tile of 8 value channels (a tile is what one warp of apply_T computes, so its maximum is one warp
// reduction); e^{γ_last} stays fp32. Then U0's tiles' inverse scales, each other fp16 array's inverse
// scale (one per array and chunk) and Klᵀ's scale (the state update needs both), padded with zeros
// so that every record is a whole number of 128-byte lines (the records of a chunk's heads follow
// one another, and the recurrence copies whole core matrices: each should sit in one line).
// A_qk keeps only its core matrices on or below the diagonal, packed (a_group_start above): the other
// 6 of 16 are zero in every chunk (causal), and the recurrence zeroes them once in its stages
// instead of copying them (-2.2 % of the record's bytes, written once and read once).
// 8,672 floats at D = 128 (8,864 with A_qk whole; with fp32 U0 10,912; the fp32 record was 17,536).
// Why U0 in fp16 keeps its precision: fp16's normal range spans 29 binades, so every channel within
// 2^28 of its tile's largest U0 keeps an 11-bit mantissa (TF32's, and the other operands'); the
// recurrence's error model, tools/recurrence_precision_model.py, docs/performance.md v18 and v29.
template <int D, int C>
struct Record {
  static constexpr int kW = 0;                 // [C, D] fp16: W = T (K e^γ)
  static constexpr int kQ = kW + C * D / 2;    // [C, D] fp16: Q e^γ
  static constexpr int kKl = kQ + C * D / 2;   // [D, C] fp16: (K e^{γ_last - γ})ᵀ
  static constexpr int kA = kKl + C * D / 2;   // A_qk's core matrices (g, c), c <= g, fp16, packed
  static constexpr int kU = kA + a_packed_floats(C);  // [C, D] fp16: U0 = T V, scaled per tile of 8 channels
  static constexpr int kEg = kU + C * D / 2;   // [D] e^{γ_last}
  static constexpr int kInvU = kEg + D;        // [D / 8] inverse scales of U0's tiles,
  static constexpr int kInvW = kInvU + D / 8;  // inverse scales of W,
  static constexpr int kInvQ = kInvW + 1;      //   Q e^γ,
  static constexpr int kInvA = kInvQ + 1;      //   A_qk,
  static constexpr int kInvKl = kInvA + 1;     //   Klᵀ,
  static constexpr int kScaleKl = kInvKl + 1;  // Klᵀ's scale
  static constexpr int kFloats = (kScaleKl + 1 + 31) / 32 * 32;
  static constexpr int kTail = kFloats - kEg;  // e^{γ_last} and the scales: one contiguous copy
  static_assert(kScaleKl < kFloats, "the scales fit the padded tail");
  static_assert(kFloats % 32 == 0 && kU % 4 == 0 && kEg % 4 == 0 && D % 16 == 0 && C % 16 == 0,
                "128-byte records, 16-byte aligned arrays");
};

FLASH_KDA_HD int64_t chunks_of(int64_t len, int C) { return (len + C - 1) / C; }

// A varlen sequence n's first slot from its first token (the rule of the comment at the top; the
// slot search, varlen_slot, applies it to the boundaries it has loaded).
FLASH_KDA_HD int64_t varlen_slot_base(int64_t start, int n, int C) { return start / C + n; }

FLASH_KDA_HD int64_t slot_base(const KdaParams& p, int n, int C) {
  if (p.cu_seqlens == nullptr) return static_cast<int64_t>(n) * chunks_of(p.seq_len, C);
  return varlen_slot_base(seq_range(p, n).start, n, C);
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
// A launch may cover a stretch (see Piece): dense, chunks [c_begin, c_end) of every sequence, a grid
// of (sequences x stretch length x value heads) blocks; varlen, slots [c_begin, c_end), a grid of
// (stretch length x value heads) blocks. Either way a block's grid index is not its slot.
struct PrepGrid {
  FastDiv by_hv;      // block -> (index in the stretch, value head)
  FastDiv by_group;   // value head -> query/key head (hv / hqk value heads share one)
  FastDiv by_chunks;  // dense: index -> (sequence, chunk - c_begin); the stretch's length, < 2^31
  int64_t c_begin;    // the stretch's first chunk (dense) or slot (varlen)
  int64_t chunks;     // dense: chunks per sequence, so that slot = sequence * chunks + chunk
  VecOk vec;          // vec_ok of p
  // Non-zero: every block lets the recurrence launched behind this grid start as soon as it has
  // started itself (griddep_launch_dependents at its start, not only at its end), so that the
  // recurrence's blocks take the multiprocessors the last wave leaves and load their initial state
  // there. Set by the host only for a recurrence of one wave at one block per multiprocessor
  // (kda_cuda.cu, RecurrenceVariant::releases_early).
  int release_at_start = 0;
};

// The preparation's grid for chunks [c_begin, c_end) of every sequence (dense), or for slots
// [c_begin, c_end) (varlen; c_end unused here). prep_blocks gives its size.
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
  g.c_begin = c_begin;
  g.chunks = chunks;
  g.vec = vec_ok<L>(p);
  return g;
}

// Bytes of scratch the split path's records need for p (the host sizes the workspace with it).
template <int D, int C>
FLASH_KDA_HD int64_t split_scratch_bytes(const KdaParams& p) {
  return num_slots(p, C) * p.hv * static_cast<int64_t>(Record<D, C>::kFloats) * 4;
}

// One piece of a call cut into stretches: the preparation and the recurrence of a stretch, so that
// the recurrence of one stretch can run beside the preparation of the next (kda_cuda.cu,
// launch_split). Dense, a stretch is chunks [c_begin, c_end) of every sequence. Varlen, it is slots
// [c_begin, c_end) of the records (the host cannot see the sequences' lengths, but the slots are
// numbered without them, slot_base): a sequence takes its chunks whose slots fall in the stretch,
// none, some or all (piece_chunks). A sequence whose chunks in the stretch do not start at its
// chunk 0 takes its initial state from `carry`; one whose chunks do not reach its end leaves its
// state there. A call in one piece is {0, kAllChunks, nullptr}: the user's states at both ends.
struct Piece {
  int64_t c_begin;
  int64_t c_end;  // clipped to the sequence's chunk count (dense) or slot count (varlen)
  float* carry;   // fp32 [N, hv, D, D] (value-major, contiguous); null for a call in one piece
};
constexpr int64_t kAllChunks = INT64_MAX;

// Bytes of the carry state for p (needed only when a call is cut into several pieces).
template <int D>
FLASH_KDA_HD int64_t carry_bytes(const KdaParams& p) {
  return static_cast<int64_t>(p.num_seqs) * p.hv * D * D * 4;
}

// Stretch i of `pieces` over `chunks` chunks (or slots): [i chunks / pieces, (i + 1) chunks / pieces),
// so the stretches differ in length by at most one and none is empty while pieces <= chunks.
FLASH_KDA_HD int64_t stretch_begin(int64_t chunks, int64_t pieces, int64_t i) { return i * chunks / pieces; }

// The host side of pieces, shared by the launcher (kda_cuda.cu) and the CPU emulator
// (tests/simt/cuda_sim.cpp), so that the emulator runs the schedule the GPU gets.
//
// What a call is cut along: a dense sequence's chunks, or a varlen call's slots.
inline int64_t stretch_units(const KdaParams& p, int C) {
  return p.cu_seqlens == nullptr ? chunks_of(p.seq_len, C) : num_slots(p, C);
}

// How many pieces a call of chunk length C is cut into when `asked` are asked for: at most one per
// chunk (dense) or slot (varlen).
inline int64_t split_pieces(const KdaParams& p, int C, int64_t asked) {
  if (asked < 2) return 1;
  const int64_t units = stretch_units(p, C);
  return asked < units ? asked : (units > 1 ? units : 1);
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
  const int64_t units = stretch_units(p, C);
  float* carry = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + split_scratch_bytes<D, C>(p));
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t c_begin = stretch_begin(units, pieces, i), c_end = stretch_begin(units, pieces, i + 1);
    prep(c_begin, c_end);
    rec(Piece{c_begin, i + 1 == pieces ? kAllChunks : c_end, carry});
  }
}

// Blocks of the preparation's grid for chunks [c_begin, c_end) of every dense sequence, or for slots
// [c_begin, c_end) of a varlen call (c_end clipped to the chunk or slot count).
inline int64_t prep_blocks(const KdaParams& p, int C, int64_t c_begin, int64_t c_end) {
  const int64_t units = stretch_units(p, C);
  if (c_end > units) c_end = units;
  if (c_end <= c_begin) return 0;
  return (p.cu_seqlens == nullptr ? p.num_seqs : 1) * (c_end - c_begin) * p.hv;
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
// fp16 operands: power-of-two scales, packing, m16n8k16
// ---------------------------------------------------------------------------------------------
FLASH_KDA_DEVICE float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }

// A power of two `s` that brings a largest magnitude m (>= 0) into [2^14, 2^15), and its inverse.
// From m's exponent field: s = 2^(n - 127) with n = 268 - e, clamped to [1, kMaxScaleN]: s is at
// least 2^-126 (an inf or NaN m: s = 2^-114, and the inf or NaN values themselves go through the
// products as they would in fp32) and at most 2^40. The upper bound matters where two scales meet
// in one factor (the state update multiplies the state by Klᵀ's scale times U's row
// scale): a row or channel of zeros (m = 0) would otherwise get 2^126, and the product of two such
// scales is inf, which turns the zeros into NaN (tests' zero_channels). Rows whose largest
// magnitude is below 2^-26 stay below 2^14 after scaling; they keep full fp16 precision down to a
// largest magnitude of 2^-54.
constexpr int kMaxScaleN = 127 + 40;
struct Pow2 {
  float s, inv;
};
FLASH_KDA_DEVICE Pow2 pow2_scale(float m) {
  const int e = (__float_as_int(m) >> 23) & 0xff;
  const int n = min(max(268 - e, 1), kMaxScaleN);
  return {__int_as_float(n << 23), __int_as_float((254 - n) << 23)};
}

// U's row scale u, limited so that the state update's pre-scaled state stays finite: the row's
// largest state magnitude m_S < 2^15 / r (r: the state row's own scale, from the same chunk),
// times e^{γ_last} <= 1, times Klᵀ's scale <= 2^40, times u must stay below 2^126, so
// u <= 2^71 r. Where the cap binds, U is so small beside the state (by more than 2^-50 or so) that
// its fp16 rounding cannot show in the fp32 sum.
// (From r's inverse alone, which the chunk keeps anyway: 1 / x of a power of two by its exponent.)
FLASH_KDA_DEVICE Pow2 cap_by_state(Pow2 u, float r_inv) {
  const float floor_inv = r_inv * 0x1p-71f;  // >= 2^-111 (r_inv >= 2^-40)
  if (u.inv >= floor_inv) return u;
  return {__int_as_float((254 << 23) - __float_as_int(floor_inv)), floor_inv};
}

// Two fp32 values as one f16x2 register: lo in the low half (the smaller k index of a fragment).
FLASH_KDA_DEVICE uint32_t pack_f16(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// (mma16, the m16n8k16 fp16 product: ptx.cuh)

// The A fragment of k-block kb from accumulator tiles c0 = tile 2kb, c1 = tile 2kb + 1 (columns
// 16kb..16kb+7 and 16kb+8..16kb+15 of the same 16 rows), rows g and g + 8 scaled by s0 and s1.
FLASH_KDA_DEVICE void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4], float s0, float s1) {
  a[0] = pack_f16(c0[0] * s0, c0[1] * s0);
  a[1] = pack_f16(c0[2] * s1, c0[3] * s1);
  a[2] = pack_f16(c1[0] * s0, c1[1] * s0);
  a[3] = pack_f16(c1[2] * s1, c1[3] * s1);
}

// fp16 arrays are stored in core-matrix order, the layout wgmma reads from shared memory (ptx.cuh):
// element (r, c) of a [ROWS, COLS] array at half offset core_offset<COLS>(r, c), i.e. 8 x 8 blocks of
// 128 contiguous bytes, the blocks of an 8-row group side by side, the groups one after another.
// Both recurrences read the same records: wgmma through a descriptor (LBO 128 bytes, SBO 16 COLS),
// mma16 by ld_frag below.
template <int COLS>
FLASH_KDA_HD int core_offset(int r, int c) {
  return (r / 8) * 8 * COLS + (c / 8) * 64 + (r % 8) * 8 + c % 8;
}

// Lane (g, t)'s m16n8k16 B fragment for k-block kb, from `rows` = the array's 8-row group plus
// (g, 2t) (core_offset<COLS>(8 group + g, 2t)): two 4-byte loads, one per 8-column block. (Lanes
// read 32 different words of one 128-byte block: no bank conflict.)
FLASH_KDA_DEVICE uint2 ld_frag(const __half* rows, int kb) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(rows + 128 * kb);
  return make_uint2(w[0], w[32]);
}

// Largest magnitude over the quad (the four lanes that hold one accumulator row).
FLASH_KDA_DEVICE float quad_max(float m) {
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
}

// Scale factors of the two accumulator rows a lane holds (g and g + 8) over NT tiles.
template <int NT>
FLASH_KDA_DEVICE void row_scales(const float (&x)[NT][4], Pow2& r0, Pow2& r1) {
  float m0 = 0.0f, m1 = 0.0f;
#pragma unroll
  for (int it = 0; it < NT; ++it) {
    m0 = fmaxf(m0, fmaxf(fabsf(x[it][0]), fabsf(x[it][1])));
    m1 = fmaxf(m1, fmaxf(fabsf(x[it][2]), fabsf(x[it][3])));
  }
  r0 = pow2_scale(quad_max(m0));
  r1 = pow2_scale(quad_max(m1));
}

// Largest value of m over the warp, in every lane, for m a magnitude: +0 to +inf, never NaN (every
// caller's m is an fmaxf over fabsf values starting from 0, and fmaxf drops NaN). Those floats order
// as their bit patterns do as unsigned integers, so the maximum is one integer reduction
// (warp_max_u32: one instruction on sm_80+ where the float butterfly took ten).
FLASH_KDA_DEVICE float warp_max(float m) { return __uint_as_float(warp_max_u32(__float_as_uint(m))); }

// Largest of red[0 .. N) (N <= 32 warps' maxima, all >= 0), in every lane of the calling warp: one
// load per lane and a shuffle reduction. (Each thread reading all N cost N loads and N maxima per
// thread: 45 of each for the three state-side arrays, ~4 % of the preparation's instructions, v10.)
template <int N>
FLASH_KDA_DEVICE float max_of(const float* red, int lane) {
  static_assert(N <= 32, "one value per lane");
  return warp_max(lane < N ? red[lane] : 0.0f);
}

// Eight values times s as fp16: one 16-byte store (dst global, 16-byte aligned).
FLASH_KDA_DEVICE void store8_f16(__half* dst, const float (&v)[8], float s) {
  uint4 h;
  h.x = pack_f16(v[0] * s, v[1] * s);
  h.y = pack_f16(v[2] * s, v[3] * s);
  h.z = pack_f16(v[4] * s, v[5] * s);
  h.w = pack_f16(v[6] * s, v[7] * s);
  st16_global(dst, h);
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
    const unsigned below = __ballot_sync(0xffffffffu, load && m <= hi && m < p.num_seqs && varlen_slot_base(a, m, C) <= slot);
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
            if (i / L::BS == j / L::BS && ((flags >> (i / L::BS)) & 1)) ma = fmaxf(ma, max_abs(ld4(sm + L::kAqk + i * L::LDA + j)));
          });
        }
      }
      put_warp_maxima<L>(red, warp, m, ma, lane);
    });
    if (warp == 0) {  // (the phase's longest path: it reads no scale)
      invert_T<L>(sm + L::kT, sm + L::kAkk, sm + L::kBeta, l, tid);
    } else {
      const Pow2 fq = pow2_scale(max_of<L::kWarps>(red, lane)), fkl = pow2_scale(max_of<L::kWarps>(red + L::kWarps, lane));
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
    const Pow2 fq = pow2_scale(max_of<kRestWarps>(red, lane)), fkl = pow2_scale(max_of<kRestWarps>(red + L::kWarps, lane));
    if (warp != 0) tiles.store(rec_h, fq, fkl, rt);
    store_aqk_and_tail<L, L::kThreads>(sm, rec, fq, fkl, pow2_scale(max_of<kRestWarps>(red + 2 * L::kWarps, lane)), tid);
  }
  float w[kApplySteps<L>][2][4];
  apply_T<L>(sm + L::kT, sm + L::kVx, sm + L::kK, sm + L::kEr, rec_h + 2 * R::kU, rec + R::kInvU, w, warp, l);
  store_w_f16<L>(w, rec_h + 2 * R::kW, rec + R::kInvW, red + 3 * L::kWarps, warp, l, tid);
}

// ---------------------------------------------------------------------------------------------
// Recurrence kernel: one block per (sequence, value head, V slice)
// ---------------------------------------------------------------------------------------------
// Each warp owns 16 rows of the state for the whole sequence and keeps them in registers, as the
// accumulators of the state update (fp32). The products against the state run on fp16 operands
// (mma m16n8k16, fp32 accumulation), transposed so that U, O and S never leave the warp:
//     Xᵀ = S0 Wᵀ,  Oᵀ = S0 (Q e^γ)ᵀ,  Uᵀ = U0ᵀ - Xᵀ,  Oᵀ += Uᵀ A_qkᵀ,  S = S diag(e^{γ_last}) + Uᵀ Kl.
// Why fp16: the TF32 form of this kernel was bound by shared-memory reads (every warp reads all of
// a chunk's W, Q e^γ, Klᵀ and A_qk; docs/performance.md v6); 16-bit operands halve those bytes
// and the mma count, and fp16 keeps TF32's 10-bit mantissa. Its range (max 65504, subnormal below
// 2^-14) is handled by power-of-two scales, which are exact: each row of the state and of U, and
// each of the chunk's arrays W, Q e^γ, A_qk and Klᵀ as a whole, is multiplied by 2^n so that its
// largest magnitude lies in [2^14, 2^15) before rounding (round to nearest), and the fp32 products
// are multiplied back (tools/recurrence_precision_model.py: same error as TF32, where unscaled fp16
// fails on large or small values).
//
// A chunk's record arrives in a stage buffer by cp.async, fp16 rows and all: the preparation has
// already scaled, rounded and ordered them (core-matrix order, core_offset), so the fp16 part of a
// stage is a copy of the record's. The A fragments come from the accumulators: the A operand of
// k-block kb is the accumulator tiles 2kb and 2kb+1 in natural order (pack_a). Shared memory holds
// a ring of kStages stage buffers; with two, the copies of chunk c + 1 are issued when chunk c starts.
//
// Two ways to run the products, same record and stage (kMma):
// - mma16: each warp runs m16n8k16 tiles for its 16 rows and reads every B fragment itself;
// - wgmma (sm_90a, VS a multiple of 64): each warpgroup of 4 warps issues one m64nNk16 per k-block
//   and the tensor cores read B from shared memory once per warpgroup, a quarter of mma16's
//   shared-memory reads (the bound of the TF32 form, docs/performance.md v6). Where the pass cannot
//   issue wgmma (kArchHasWgmma, ptx.cuh) it falls back to mma16.
enum class RecurrenceMma { kAuto, kMma16 };

template <int D_, int VS_, int C_, int kStages_, RecurrenceMma kMma_ = RecurrenceMma::kAuto>
struct RecurrenceLayout {
  static constexpr int D = D_, VS = VS_, C = C_, kStages = kStages_;
  static constexpr int kWarps = VS / 16;            // 16 state rows per warp
  static constexpr int kThreads = kWarps * 32;
  static constexpr int NVS = D / VS;
  // wgmma where this pass has it and the rows fill warpgroups (device code only: see kArchHasWgmma);
  // D <= 128 because ptx.cuh's wgmma_f16 goes up to N = 128 (the update's N is D)
  static constexpr bool kWgmmaShape = kMma_ == RecurrenceMma::kAuto && VS % 64 == 0 && D <= 128;
  // A stage, in floats (an fp16 array of n halves takes n / 2); fp16 arrays as in Record
  static constexpr int kW = 0;                      // [C, D] fp16
  static constexpr int kQ = kW + C * D / 2;         // [C, D] fp16
  static constexpr int kKl = kQ + C * D / 2;        // [D, C] fp16
  static constexpr int kA = kKl + D * C / 2;        // [C, C] fp16, whole (the record's is packed)
  static constexpr int kU = kA + C * C / 2;         // [C, VS] fp16 U0, the slice's core matrices
  static constexpr int kEg = kU + C * VS / 2;       // e^{γ_last} [D], then the scales (Record's tail):
  static constexpr int kInvU = kEg + D;             //   U0's tiles' [D / 8] (all of the record's),
  static constexpr int kSc = kInvU + D / 8;         //   the arrays' (sW ...)
  static constexpr int sW = 0, sQ = 1, sA = 2, sKl = 3, sKlScale = 4;  // in kSc (Record's order)
  // A stage is a whole number of 128-byte lines, so that every stage's fp16 arrays start 128-byte
  // aligned (a second stage 32 bytes off its line made the recurrence 12 % slower, v10).
  static constexpr int kStage = (kEg + Record<D, C>::kTail + 31) / 32 * 32;
  static constexpr int kFloats = kStages * kStage;
  // After the stages, one 8-byte mbarrier per stage, for the bulk copies (recurrence_block's kBulk;
  // reserved in every pass, so that the host's launch size does not depend on the device pass).
  static constexpr int kBars = kFloats;
  static constexpr int kSmemBytes = (kFloats + 2 * kStages) * 4;
  static constexpr int kMinBlocks = 1;
  using R = Record<D, C>;
  static_assert(kA == R::kA && R::kU == kA + a_packed_floats(C), "the stage's W, Q, Klᵀ are the record's");
  static_assert(R::kInvU - R::kEg == kInvU - kEg && R::kInvW - R::kEg == kSc - kEg + sW &&
                    R::kInvQ - R::kEg == kSc - kEg + sQ && R::kInvA - R::kEg == kSc - kEg + sA &&
                    R::kInvKl - R::kEg == kSc - kEg + sKl && R::kScaleKl - R::kEg == kSc - kEg + sKlScale,
                "the stage's scales in the record's order");
  static_assert(kStages == 1 || kStages == 2, "one or two operand buffers");
  static_assert(VS % 16 == 0 && C % 16 == 0 && D % 16 == 0, "m16n8k16 tiling");
  static_assert(VS % 8 == 0, "U0's slice in whole core matrices");
  static_assert(kStage % 32 == 0 && kU % 4 == 0 && kEg % 4 == 0, "128-byte stages, 16-byte aligned arrays");
};

// Issues the copies of one chunk's record (of U0, the block's V slice) into a stage buffer.
template <class L>
FLASH_KDA_DEVICE void fetch_chunk(const float* rec, int v0, float* st, int tid) {
  using R = Record<L::D, L::C>;
  constexpr int C = L::C, D = L::D, T = L::kThreads;
  static_assert(R::kA % (D / 2) == 0, "W, Q e^γ and Klᵀ as rows of D / 2 floats");
  copy_tile_async<R::kA / (D / 2), D / 2, D / 2, D / 2, T>(st, rec, tid);  // W, Q e^γ, Klᵀ as they are
  // A_qk's packed core matrices to their places in the whole [C, C] layout: quad i of the stage's
  // array lies in 8-row group g = i / C, core matrix c = i / 8 % (C / 8); those with c <= g come
  // from the record's group g, a_group_start(g) on (Record). (The quad index is the thread's, so g
  // is its warp's where the threads cover the array in one pass; the others were zeroed once,
  // zero_upper_a.) At D = 256 both addresses are offsets from rec + 4 tid and st + 4 tid, which the
  // copy above forms too: with their own per-quad addresses, held across the chunk loop, the D = 256
  // VS 32 recurrence spilled 32-48 bytes (none this way; 16 before the packing). At D = 128 the
  // per-quad form measured 0.9-1.6 % faster (docs/performance.md v40), with the same registers.
  constexpr int kAQuads = C * C / 8;
  constexpr bool kFromCopyBases = D >= 256;
  const float* src = rec + 4 * tid;
  const unsigned dst = shared_address(st + 4 * tid);
#pragma unroll
  for (int k = 0; k < (kAQuads + T - 1) / T; ++k) {
    const int i = tid + k * T, g = i / C, c = i / 8 % (C / 8);
    if ((kAQuads % T == 0 || i < kAQuads) && c <= g) {
      if constexpr (kFromCopyBases) {
        cp_async16(dst + 4 * (L::kA + 4 * k * T), src + (R::kA + 4 * k * T) + (a_group_start(g) - 4 * C * g));
      } else {
        cp_async16(shared_address(st + L::kA + 4 * i), rec + R::kA + a_group_start(g) + 4 * (i % C));
      }
    }
  }
  // U0's slice: in each of the C / 8 row blocks, its VS / 8 core matrices are contiguous
  copy_tile_async<C / 8, 4 * L::VS, 4 * D, 4 * L::VS, T>(st + L::kU, rec + R::kU + 4 * v0, tid);
  // (The tail as rows of 32 floats: as one row of kTail, 8 quads a row do not divide the threads
  // and the copy took copy_tile_async's general loop, a division and a branch per quad, v28.)
  static_assert(R::kTail % 32 == 0, "the tail in whole rows of 32 floats");
  copy_tile_async<R::kTail / 32, 32, 32, 32, T>(st + L::kEg, rec + R::kEg, tid);
}

// fetch_chunk's copies as bulk copies (ptx.cuh): each part of the record that is contiguous in both
// places is one copy (W, Q e^γ and Klᵀ; A_qk's C / 8 row groups; U0's C / 8 row blocks of the slice;
// the tail: ten at C = 32), all reported to the stage's barrier `bar`, whose phase completes when
// the whole record has landed. Part j is issued by lane 0 of warp j % kWarps (kWarp here), which
// first arrives on the barrier (kWarps arrivals a phase) announcing its parts' bytes, so the bytes
// announced never fall behind the bytes landed. Spread over the warps because a warp that lags
// holds the warpgroup's next wgmma (v28). fetch_chunk instead has every thread issue ~17 16-byte
// copies and form their addresses: on the GPU those were ~16 % of the recurrence's stall samples at
// T=32768 H=32, a third of them at registers waiting for a queued copy to read its address
// (docs/performance.md v43).
template <class L, int kWarp>
FLASH_KDA_DEVICE void fetch_chunk_parts(const float* rec, int v0, float* st, unsigned bar) {
  using R = Record<L::D, L::C>;
  constexpr int C = L::C, D = L::D, VS = L::VS, kParts = 2 + 2 * (C / 8);
  static_assert(kParts >= L::kWarps, "every warp issues a part (the barrier expects kWarps arrivals)");
  const unsigned s = shared_address(st);
  // Part j: its shared byte address, its source and its length in bytes
  auto part = [&](int j, unsigned& dst, const float*& src) -> unsigned {
    if (j == 0) {  // W, Q e^γ, Klᵀ as they are
      dst = s, src = rec;
      return R::kA * 4;
    }
    if (j <= C / 8) {  // A_qk's row group g: its g + 1 core matrices, the first 8 (g + 1) quads of the
      const int g = j - 1;  // stage's rows g C .. (fetch_chunk's quads with c <= g), packed in the record
      dst = s + 4 * (L::kA + 4 * C * g), src = rec + R::kA + a_group_start(g);
      return 128 * (g + 1);
    }
    if (j <= C / 4) {  // U0's row block r: the slice's VS / 8 core matrices, 4 VS floats
      const int r = j - 1 - C / 8;
      dst = s + 4 * (L::kU + r * 4 * VS), src = rec + R::kU + 4 * v0 + r * 4 * D;
      return 16 * VS;
    }
    dst = s + 4 * L::kEg, src = rec + R::kEg;  // the tail
    return R::kTail * 4;
  };
  unsigned bytes = 0, dst;
  const float* src;
#pragma unroll
  for (int j = kWarp; j < kParts; j += L::kWarps) bytes += part(j, dst, src);
  mbar_arrive_expect_tx(bar, bytes);
#pragma unroll
  for (int j = kWarp; j < kParts; j += L::kWarps) {
    const unsigned n = part(j, dst, src);
    bulk_copy_g2s(dst, src, n, bar);
  }
}
// Lane 0 of warp `warp` issues its parts; the warp index made a template argument, so that each
// warp's parts are constants (as a runtime test per part, every warp stepped through all ten,
// predicated).
template <class L, int kWarp = 0>
FLASH_KDA_DEVICE void fetch_chunk_bulk(const float* rec, int v0, float* st, unsigned bar, int warp) {
  if (warp == kWarp) {
    fetch_chunk_parts<L, kWarp>(rec, v0, st, bar);
  } else if constexpr (kWarp + 1 < L::kWarps) {
    fetch_chunk_bulk<L, kWarp + 1>(rec, v0, st, bar, warp);
  }
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
// (c_begin, c_end: the sequence's chunks in the piece, piece_chunks)
FLASH_KDA_DEVICE StateRef initial_ref(const KdaParams& p, const Piece& piece, int64_t c_begin, int64_t D) {
  if (c_begin == 0) return StateRef{const_cast<void*>(p.initial_state), p.h0_strides, p.state_fp32};
  return carry_ref(p, piece, D);
}
FLASH_KDA_DEVICE StateRef final_ref(const KdaParams& p, const Piece& piece, int64_t c_end, int64_t nchunks,
                                    int64_t D) {
  if (c_end >= nchunks) return StateRef{p.final_state, p.ht_strides, p.state_fp32};
  return carry_ref(p, piece, D);
}

// Sequence n's chunks [c_begin, c_end) in a piece (n has nchunks chunks, its first in slot `base`):
// dense, the piece's chunk range; varlen, the chunks whose slots lie in the piece's slot range. Both
// clipped to [0, nchunks]. False where the sequence has nothing to do in the piece: no chunk in it,
// except that an empty sequence (nchunks = 0) copies its initial state to its final state once, in
// the piece that starts at 0.
FLASH_KDA_HD bool piece_chunks(const KdaParams& p, const Piece& piece, int64_t base, int64_t nchunks,
                               int64_t& c_begin, int64_t& c_end) {
  const int64_t shift = p.cu_seqlens == nullptr ? 0 : base;  // kAllChunks - shift does not overflow
  c_begin = piece.c_begin - shift;
  c_end = piece.c_end - shift;
  c_begin = c_begin < 0 ? 0 : (c_begin > nchunks ? nchunks : c_begin);
  c_end = c_end < 0 ? 0 : (c_end > nchunks ? nchunks : c_end);
  return c_begin < c_end || (nchunks == 0 && piece.c_begin == 0);
}

// Whether an fp32 state's elements can move in pairs (channels c, c + 1 as one 8-byte access; c is
// even in every fragment): every stride even and the base 8-byte aligned. Uniform over the block.
FLASH_KDA_DEVICE bool fp32_state_pairs(const StateRef& ref) {
  return ref.ptr != nullptr && ref.fp32 && ((ref.strides.seq | ref.strides.head | ref.strides.row) & 1) == 0 &&
         (reinterpret_cast<uintptr_t>(ref.ptr) & 7) == 0;
}

// Reads or writes the warp's state rows: element e of tile nt is (row r(e), channel c(e)).
template <class L, bool kStore>
FLASH_KDA_DEVICE void state_rows_io(const StateRef& ref, const portable::Task& t, int row0, Lane l,
                                    float (&s)[L::D / 8][4]) {
  if (fp32_state_pairs(ref)) {
    // Half the instructions, and each warp access covers 8 rows of 32 whole bytes.
    float* base = static_cast<float*>(ref.ptr);
#pragma unroll
    for (int nt = 0; nt < L::D / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; e += 2) {
        const int v = t.v0 + row0 + l.g + (e >= 2 ? 8 : 0), c = nt * 8 + 2 * l.t;
        float* at = base + state_offset(ref.strides, t.n, t.h, v) + c;
        if (kStore) {
          st8_aligned(at, make_float2(s[nt][e], s[nt][e + 1]));
        } else {
          const float2 x = ld8_aligned(at);
          s[nt][e] = x.x;
          s[nt][e + 1] = x.y;
        }
      }
    return;
  }
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

// Two products of one warpgroup with the same A fragments, d1 += A B1 and d2 += A B2 over K
// k-blocks (B1, B2: core-matrix arrays at desc1 and desc2, 256 bytes per k-block), each in its own
// commit group; kNew1 / kNew2: d1 = A B1 / d2 = A B2 instead, the accumulators' old values ignored
// (they need not be zeroed first). Returns when d1 is done; d2's group may still run, so d2 and a
// must stay untouched until a later wgmma_wait.
struct Nothing {
  FLASH_KDA_DEVICE void operator()() const {}
};
// (`meanwhile()` runs once both are issued: work that touches neither d1, d2 nor a.)
template <bool kNew1, bool kNew2, int K, int N1, int N2, class Meanwhile = Nothing>
FLASH_KDA_DEVICE void wgmma_pair(float (&d1)[N1][4], float (&d2)[N2][4], uint32_t (&a)[K][4], uint64_t desc1,
                                 uint64_t desc2, Meanwhile&& meanwhile = Meanwhile{}) {
  if constexpr (!kNew1) wgmma_fence_operand(d1);
  if constexpr (!kNew2) wgmma_fence_operand(d2);
  wgmma_fence_operand(a);
  wgmma_fence();
  wgmma_f16<8 * N1, !kNew1>(d1, a[0], desc1);
#pragma unroll
  for (int k = 1; k < K; ++k) wgmma_f16<8 * N1>(d1, a[k], wgmma_desc_at(desc1, 256 * k));
  wgmma_commit();
  wgmma_f16<8 * N2, !kNew2>(d2, a[0], desc2);
#pragma unroll
  for (int k = 1; k < K; ++k) wgmma_f16<8 * N2>(d2, a[k], wgmma_desc_at(desc2, 256 * k));
  wgmma_commit();
  meanwhile();
  wgmma_wait<1>();
  wgmma_fence_operand(d1);
}

// One chunk for one warp: rows [row0, row0 + 16) of the block's slice, operands in stage `st`.
// (With wgmma the four warps of a warpgroup run it together: every wgmma step is issued by all.)
// `out` is the output element of the chunk's first token in this lane's first state row (the lane
// writes rows l.g and l.g + 8 of its 16, tokens 2 l.t, 2 l.t + 1 of each 8); tokens follow every
// `ostride` elements. `vtile`: the record's U0 tile (8 value channels) that holds row row0.
template <class L, bool kDecayBeside = false>
FLASH_KDA_DEVICE void recurrence_chunk(port::input_t* out, int64_t ostride, int len, const float* st, int row0,
                                       int vtile, Lane l, float (&s)[L::D / 8][4]) {
  constexpr bool kWgmma = L::kWgmmaShape && kArchHasWgmma;
  constexpr int C = L::C, D = L::D;
  constexpr int NT = C / 8;   // token tiles (n = 8)
  constexpr int KB = D / 16;  // channel k-blocks
  constexpr int JB = C / 16;  // token k-blocks
  const __half* h = reinterpret_cast<const __half*>(st);  // fp16 arrays: float offset k is half 2k
  const __half* W = h + 2 * L::kW;
  const __half* Q = h + 2 * L::kQ;
  const __half* A = h + 2 * L::kA;
  const __half* Kl = h + 2 * L::kKl;
  const float* sc = st + L::kSc;
  const int lane_at = l.g * 8 + 2 * l.t;  // core_offset of lane (g, t)'s B fragment in a block
  float x[NT][4], o[NT][4];  // Xᵀ -> Uᵀ, Oᵀ: [16 rows, C tokens] (wgmma's first k-block sets them)
  // Xᵀ = S Wᵀ, Oᵀ = S (Q e^γ)ᵀ, with the state rows scaled into fp16 as A operands.
  Pow2 r0, r1;
  row_scales<D / 8>(s, r0, r1);
  uint32_t a[KB][4];
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) pack_a(a[kb], s[2 * kb], s[2 * kb + 1], r0.s, r1.s);
  // The state's decay, S diag(e^{γ_last}), needs nothing from this chunk's products. kDecayBeside
  // (wgmma only): it runs while they do (the state's fp32 registers are not their operands), off
  // the chain between X and the update. That pays where blocks share multiprocessors (the in-step
  // kernel's case) and costs where a block has one to itself (docs/performance.md v24).
  const float* eg = st + L::kEg + 2 * l.t;
  auto decay = [&] {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const float2 e2 = ld2(eg + nt * 8);
      s[nt][0] *= e2.x;
      s[nt][1] *= e2.y;
      s[nt][2] *= e2.x;
      s[nt][3] *= e2.y;
    }
  };
  // U0, unscaled by its tiles' scales (this lane's rows g and g + 8 lie in the record's tiles vtile
  // and vtile + 1): element (token 8 it + 2t + (e & 1), row g + 8 (e >= 2)) is in core matrix
  // (it, row0 / 8 + (e >= 2)) at 8 (2t + (e & 1)) + g. Read while X's products run: none of it waits
  // for X (after X's wait, ptxas kept the loads there and their conversions on the chain).
  float u0v[NT][4];
  auto load_u0 = [&] {
    const __half* U0 = h + 2 * L::kU + 8 * row0 + 16 * l.t + l.g;
    const float us0 = st[L::kInvU + vtile], us1 = st[L::kInvU + vtile + 1];
#pragma unroll
    for (int it = 0; it < NT; ++it)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        u0v[it][e] = __half2float(U0[it * 8 * L::VS + (e >= 2 ? 64 : 0) + (e & 1) * 8]) * (e >= 2 ? us1 : us0);
  };
  if constexpr (kWgmma) {
    // X (on the state's critical path) and O (not) in separate groups: O's products run while
    // this warpgroup computes U from X.
    if constexpr (kDecayBeside) {
      wgmma_pair<true, true>(x, o, a, wgmma_desc(W, 128, 16 * D), wgmma_desc(Q, 128, 16 * D), [&] {
        decay();
        load_u0();
      });
    } else {
      wgmma_pair<true, true>(x, o, a, wgmma_desc(W, 128, 16 * D), wgmma_desc(Q, 128, 16 * D), load_u0);
    }
    // (X done; O may still run: o and a stay untouched until the wait below)
  } else {
    load_u0();
#pragma unroll
    for (int it = 0; it < NT; ++it) {
      zero(x[it]);
      zero(o[it]);
    }
#pragma unroll
    for (int kb = 0; kb < KB; ++kb)
#pragma unroll
      for (int it = 0; it < NT; ++it) {
        mma16(x[it], a[kb], ld_frag(W + it * 8 * D + lane_at, kb));
        mma16(o[it], a[kb], ld_frag(Q + it * 8 * D + lane_at, kb));
      }
  }
  // U = U0 - X, X unscaled (rows by the state's scales, all of it by W's one scale).
  const float xs0 = r0.inv * sc[L::sW], xs1 = r1.inv * sc[L::sW];
#pragma unroll
  for (int it = 0; it < NT; ++it)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[it][e] = fmaf(-x[it][e], e >= 2 ? xs1 : xs0, u0v[it][e]);
  // U's rows as fp16 A fragments, one per token k-block (used twice: by O and by the update).
  Pow2 u0, u1;
  row_scales<NT>(x, u0, u1);
  u0 = cap_by_state(u0, r0.inv);
  u1 = cap_by_state(u1, r1.inv);
  uint32_t ua[JB][4];
#pragma unroll
  for (int jb = 0; jb < JB; ++jb) pack_a(ua[jb], x[2 * jb], x[2 * jb + 1], u0.s, u1.s);
  // S <- S diag(e^{γ_last}) + Uᵀ Kl. The product carries U's row scale u_v and Klᵀ's scale k, so
  // S (decayed above) is brought into those units first and back after: element (v, c) times u_v k
  // (powers of two: exact), then the mma, then times 1 / (u_v k).
  const float uk0 = u0.s * sc[L::sKlScale], uk1 = u1.s * sc[L::sKlScale];
  if constexpr (kWgmma && kDecayBeside) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      s[nt][0] *= uk0;
      s[nt][1] *= uk0;
      s[nt][2] *= uk1;
      s[nt][3] *= uk1;
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const float2 e2 = ld2(eg + nt * 8);
      s[nt][0] *= e2.x * uk0;
      s[nt][1] *= e2.y * uk0;
      s[nt][2] *= e2.x * uk1;
      s[nt][3] *= e2.y * uk1;
    }
  }
  // The state update's product and O2ᵀ = Uᵀ A_qkᵀ (A_qk is zero above its diagonal: mma16 skips
  // those blocks, token tile it needs the k-blocks jb <= it / 2; wgmma multiplies the zeros).
  float o2[NT][4];  // (wgmma's first k-block sets it)
  if constexpr (kWgmma) {
    wgmma_pair<false, true>(s, o2, ua, wgmma_desc(Kl, 128, 16 * C), wgmma_desc(A, 128, 16 * C));
    wgmma_fence_operand(o);  // O's group, older, has retired too (groups retire in order)
  } else {
#pragma unroll
    for (int it = 0; it < NT; ++it) zero(o2[it]);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
      for (int jb = 0; jb < JB; ++jb) mma16(s[nt], ua[jb], ld_frag(Kl + nt * 8 * C + lane_at, jb));
#pragma unroll
    for (int it = 0; it < NT; ++it)
#pragma unroll
      for (int jb = 0; jb <= it / 2; ++jb) mma16(o2[it], ua[jb], ld_frag(A + it * 8 * C + lane_at, jb));
  }
  // S back from U's and Klᵀ's units: one factor per row.
  const float ui0 = u0.inv * sc[L::sKl], ui1 = u1.inv * sc[L::sKl];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    s[nt][0] *= ui0;
    s[nt][1] *= ui0;
    s[nt][2] *= ui1;
    s[nt][3] *= ui1;
  }
  if constexpr (kWgmma) {
    wgmma_wait<0>();
    wgmma_fence_operand(o2);
  }
  // O = O + O2, each unscaled (O: the state's rows and Q e^γ's scale; O2: U's rows and A_qk's
  // scale), stored.
  const float oq0 = r0.inv * sc[L::sQ], oq1 = r1.inv * sc[L::sQ];
  const float oa0 = u0.inv * sc[L::sA], oa1 = u1.inv * sc[L::sA];
  // Token i's element by pointer steps (8 tokens per tile, one to the odd token), not by
  // token_offset's 64-bit products per element (~80 of the chunk loop's ~990 instructions).
  port::input_t* even = out + 2 * l.t * ostride;
  const int64_t tile_step = 8 * ostride;
#pragma unroll
  for (int it = 0; it < NT; ++it, even += tile_step) {
    const int i = it * 8 + 2 * l.t;
    port::input_t* odd = even + ostride;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float y = fmaf(o[it][e], e >= 2 ? oq1 : oq0, o2[it][e] * (e >= 2 ? oa1 : oa0));
      if (i + (e & 1) < len) ((e & 1) ? odd : even)[e >= 2 ? 8 : 0] = port::from_float<port::input_t>(y);
    }
  }
}

// The sequence of rank r among a varlen call's sequences sorted longest first (ties in batch order),
// for calls of up to kMaxSorted sequences; rank r itself otherwise. The recurrence takes its blocks'
// sequences in this order: a block runs its sequence's chunks one after another, so the blocks of
// the longest sequences set the kernel's length, and the GPU starts blocks in index order; in batch
// order a long last sequence starts last (docs/performance.md v16). Lane i holds sequence i's
// length; every lane of the warp calls it with the same r.
constexpr int kMaxSorted = 32;
FLASH_KDA_DEVICE int longest_first(const KdaParams& p, int r, int lane) {
  const int N = p.num_seqs;
  if (p.cu_seqlens == nullptr || N > kMaxSorted) return r;
  const int64_t len64 = lane < N ? seq_range(p, lane).len : 0;
  const int len = len64 > 0x7fffffff ? 0x7fffffff : static_cast<int>(len64);  // an order, not a length
  int rank = 0;  // sequences before this lane's in the order
  for (int i = 0; i < N; ++i) {
    const int other = __shfl_sync(0xffffffffu, len, i);
    rank += other > len || (other == len && i < lane);
  }
  // (rank, lane) is a permutation of [0, N) even for a malformed cu_seqlens: one lane matches.
  const unsigned hit = __ballot_sync(0xffffffffu, lane < N && rank == r);
  return hit == 0 ? r : 31 - __clz(hit);
}

// Zeroes A_qk's core matrices above the diagonal in every stage, which fetch_chunk never writes
// (the record leaves them out: Record). Once per block, before the first chunk's barrier (whose
// fence_proxy_async also makes these stores visible to wgmma).
template <class L>
FLASH_KDA_DEVICE void zero_upper_a(float* sm, int tid) {
  constexpr int n = L::C / 8, kQuads = L::C * L::C / 8;  // core matrices a side; float4s of [C, C] fp16
  for (int i = tid; i < L::kStages * kQuads; i += L::kThreads) {
    const int s = i / kQuads, f = i % kQuads, b = f / 8;  // 8 float4s a core matrix
    if (b % n > b / n) st4(sm + s * L::kStage + L::kA + 4 * f, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
  }
}

// The block's sequence's chunks in the piece (piece_chunks; all of them for a call in one piece).
// kLockstep: the grid was launched in clusters of a head's V slices, to be kept in step (below). A
// template parameter, not a kernel argument: the argument's untaken branches cost 2.5 % at
// T=32768 H=32 (a constant load and a test on each chunk's critical path; docs/performance.md v18),
// and without it the chunk loop is the one before clusters.
template <class L, bool kLockstep>
FLASH_KDA_DEVICE void recurrence_block(const KdaParams& p, const Piece& piece, const float* scratch, float* sm,
                                       int block, int tid) {
  using R = Record<L::D, L::C>;
  portable::Task t = portable::block_task<L>(p, block);
  t.n = longest_first(p, t.n, tid % 32);  // the grid's sequence index is a rank (dense: the same)
  t.r = seq_range(p, t.n);
  const int row0 = (tid / 32) * 16;
  const int vtile = (t.v0 + row0) / 8;  // U0's tile of the warp's first row (recurrence_chunk)
  const Lane l{(tid % 32) / 4, tid % 4};
  const int64_t nchunks = chunks_of(t.r.len, L::C);
  const int64_t base = slot_base(p, t.n, L::C);
  int64_t c_begin, c_end;
  if (!piece_chunks(p, piece, base, nchunks, c_begin, c_end)) return;  // uniform: the whole block leaves
  const int64_t rec_step = static_cast<int64_t>(p.hv) * R::kFloats;  // next slot, same head
  const float* rec0 = scratch + (base * p.hv + t.h) * static_cast<int64_t>(R::kFloats) + c_begin * rec_step;

  // The initial state first: the preparation does not write it, so where this kernel was launched
  // to overlap the preparation's tail (programmatic dependent launch, kda_cuda.cu) its loads need
  // not wait; the records do (griddep_wait: nothing to wait for otherwise).
  float s[L::D / 8][4];
  state_rows_io<L, false>(initial_ref(p, piece, c_begin, L::D), t, row0, l, s);
  // kBulk: each stage's record arrives by fetch_chunk_bulk (issued by each warp's lane 0) and is
  // waited for on the stage's mbarrier; otherwise every thread copies its share (fetch_chunk,
  // cp.async groups). Only in the in-step kernel: on the H100 (docs/performance.md v43, per kernel,
  // three rounds) the in-step recurrence took 5.6 % less time this way at T=8192 H=96 (0.9 % on
  // varlen 6 seqs), but the plain one 4.6 % more at T=32768 H=32 and 1.7 % more at T=8192 H=64. Its
  // profile shows the copies' issue (an elected-lane loop per copy, 'wait' stalls) costing about what
  // the 16-byte copies did, and the wait on the barrier adding ~2 % of the samples; why the two
  // kernels part ways is not known.
  constexpr bool kBulk = kLockstep && L::kWgmmaShape && kArchHasWgmma && L::kStages == 2;
  const unsigned bars = shared_address(sm + L::kBars);
  if constexpr (kBulk) {
    if (tid == 0) {
      mbar_init(bars, L::kWarps);  // one arrival per warp (fetch_chunk_bulk)
      mbar_init(bars + 8, L::kWarps);
      fence_mbar_init();
    }
  }
  zero_upper_a<L>(sm, tid);
  if constexpr (kBulk) {
    fence_proxy_async();  // the zeros, visible to wgmma (the loop has no fence of its own)
    port::block_sync();   // and the barriers' initialisation to every thread
  }
  griddep_wait();
  if constexpr (kBulk) {
    if (c_begin < c_end && tid % 32 == 0) fetch_chunk_bulk<L>(rec0, t.v0, sm, bars, tid / 32);
  } else {
    if (c_begin < c_end) fetch_chunk<L>(rec0, t.v0, sm, tid);
    cp_async_commit();
  }
  // From here on the stretch is the sequence: its chunk c is the sequence's chunk c_begin + c, so the
  // loop is the one-piece loop (a stretch starting at an odd chunk still starts in stage 0).
  t.r.start += c_begin * L::C;
  t.r.len -= c_begin * L::C;
  const int64_t count = c_end - c_begin;
  int64_t next = 0;  // offset of chunk c + 1's record from rec0 (a step per chunk, no multiply)
  // The output of chunk c's first token in this lane's first row, a step per chunk
  const int64_t ostride = p.out_strides.token;
  port::input_t* out_c = static_cast<port::input_t*>(p.out) + token_offset(p.out_strides, t.r, 0, t.h) + t.v0 + row0 + l.g;
  for (int64_t c = 0; c < count; ++c) {
    next += rec_step;
    // kLockstep: the blocks of a cluster (the head's V slices, kda_cuda.cu, RecurrenceVariant) stay
    // within a chunk of each other: this block copies chunk c + 1 only once every block of the
    // cluster has issued its copies of chunk c. They read the same fp16 arrays of each record; left
    // to drift apart, the later block's reads missed L2 and went to DRAM again (Nsight Compute,
    // docs/performance.md v17-v18: 1.44 GB read where 1.07 GB are needed). Every block of a cluster
    // has the same sequence and so the same count: the arrivals and waits pair up. (The pair costs a
    // few percent where each block has a multiprocessor to itself: hence a choice, not always on.)
    if (kLockstep && c > 0) cluster_wait();
    port::block_sync();  // every warp is done with chunk c - 1's buffer
    if constexpr (kBulk) {
      // Chunk c + 1 into the other stage; chunk c's record (issued a chunk ago) waited for on its
      // stage's barrier, whose phase (c / 2) % 2 it completes: one barrier per stage, one phase
      // per use. No second block barrier: the wait itself makes the record visible to every thread.
      const int nxt = static_cast<int>((c + 1) & 1);
      if (tid % 32 == 0 && c + 1 < count)
        fetch_chunk_bulk<L>(rec0 + next, t.v0, sm + nxt * L::kStage, bars + 8 * nxt, tid / 32);
      if (kLockstep) cluster_arrive_relaxed();
      mbar_wait(bars + 8 * static_cast<unsigned>(c & 1), static_cast<unsigned>((c >> 1) & 1));
    } else if (L::kStages == 2) {
      if (c + 1 < count) fetch_chunk<L>(rec0 + next, t.v0, sm + ((c + 1) & 1) * L::kStage, tid);
      if (kLockstep) cluster_arrive_relaxed();
      cp_async_commit();   // possibly empty: one group per chunk keeps the count exact
      cp_async_wait<1>();  // every group but the newest, i.e. chunk c's, has landed
    } else {
      if (c > 0) fetch_chunk<L>(rec0 + (next - rec_step), t.v0, sm, tid);
      if (kLockstep) cluster_arrive_relaxed();
      cp_async_commit();
      cp_async_wait<0>();
    }
    if constexpr (!kBulk) {
      if constexpr (L::kWgmmaShape) fence_proxy_async();  // the copies, visible to wgmma's reads
      port::block_sync();
    }
    const int64_t t0 = c * L::C;
    const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
    recurrence_chunk<L, kLockstep>(out_c, ostride, len, sm + (L::kStages == 2 ? (c & 1) * L::kStage : 0), row0, vtile, l, s);
    out_c += L::C * ostride;
  }
  if (kLockstep && count > 0) cluster_wait();  // the last arrival's pair
  cp_async_wait<0>();
  const StateRef out = final_ref(p, piece, c_end, nchunks, L::D);
  if (out.ptr != nullptr) state_rows_io<L, true>(out, t, row0, l, s);
}

}  // namespace tc
}  // namespace flash_kda
