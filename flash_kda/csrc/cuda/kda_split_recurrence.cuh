// kda_split_recurrence.cuh: the split form's recurrence kernel body (kda_chunk_split.cuh says why
// two kernels): one block per (sequence, value head, V slice) carries the state across the
// chunks, reading each chunk's record (kda_split_records.cuh) into shared memory.
#pragma once

#include "../port.cuh"
#include "kda_chunk_tc.cuh"
#include "kda_split_fp16.cuh"
#include "kda_split_records.cuh"

namespace flash_kda {
namespace tc {

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
    scale_rows(s, uk0, uk1);
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
  scale_rows(s, u0.inv * sc[L::sKl], u1.inv * sc[L::sKl]);
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
  port::input_t* out_c =
      static_cast<port::input_t*>(p.out) + token_offset(p.out_strides, t.r, 0, t.h) + t.v0 + row0 + l.g;
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
    const float* stage = sm + (L::kStages == 2 ? (c & 1) * L::kStage : 0);
    recurrence_chunk<L, kLockstep>(out_c, ostride, len, stage, row0, vtile, l, s);
    out_c += L::C * ostride;
  }
  if (kLockstep && count > 0) cluster_wait();  // the last arrival's pair
  cp_async_wait<0>();
  const StateRef out = final_ref(p, piece, c_end, nchunks, L::D);
  if (out.ptr != nullptr) state_rows_io<L, true>(out, t, row0, l, s);
}

}  // namespace tc
}  // namespace flash_kda
