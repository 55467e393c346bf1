// kda_split_records.cuh: what the two kernels of the split form (kda_chunk_split.cuh) share
// through global memory and the host: a chunk's record (Record) and its slots, the
// preparation's grid (PrepGrid), and the cut of a call into pieces (Piece, enqueue_pieces).
#pragma once

#include "../fast_div.h"
#include "../kda_params.h"
#include "../port.cuh"
#include "kda_chunk_tc.cuh"

namespace flash_kda {
namespace tc {

// A_qk [C, C] in core-matrix order (core_offset<C>, kda_split_fp16.cuh) without its core matrices above the
// diagonal: 8-row group g keeps its blocks c = 0..g, which lie side by side in the full layout too,
// so group g is one contiguous run of (g + 1) 32 floats, starting at a_group_start(g) in the packed
// array and at 4 C g (g's offset in the full [C, C] layout) in a recurrence stage.
FLASH_KDA_HD constexpr int a_group_start(int g) { return 16 * g * (g + 1); }  // 32 floats x blocks before g
FLASH_KDA_HD constexpr int a_packed_floats(int C) { return a_group_start(C / 8); }

// One chunk's operands for the recurrence (offsets in floats). The B operands of its fp16 products
// come as scaled fp16 arrays in core-matrix order (core_offset, kda_split_fp16.cuh), two halves per float. U0
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

// A varlen sequence n's first slot from its first token (the rule in kda_chunk_split.cuh's header; the
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

}  // namespace tc
}  // namespace flash_kda
