// kda_chunk_tc.cuh: the tensor-core chunked KDA forward body (NVIDIA sm_80 and newer).
//
// Same algorithm, work split and numerics contract as the portable body (kda_chunk_portable.cuh,
// read its header first), with every chunk product done by warp-level tensor-core instructions
// (mma.sync m16n8k8, TF32 operands, fp32 accumulation) instead of fp32 FMAs:
//     A_kk, A_qk  [C x C]  = (K, Q scaled) (K scaled)ᵀ              contraction over D
//     X, O        [C x VS] = (K e^γ, Q e^γ) S0ᵀ                       contraction over D
//     U rows of sub-block I -= A_kk[I, <I] U[<I]                       contraction over 16·I
//     O          += A_qk U                                             contraction over the causal part of C
//     S           = S diag(e^{γ_last}) + Uᵀ (K e^{γ_last - γ})         contraction over C, S kept in fp32
// TF32 (10-bit mantissa; rounding: see tf32() below) rather than bf16: the operands live in fp32
// shared memory already, and the state, which is accumulated in fp32 registers, only ever meets
// rounding in the increments. The triangular substitution inside a 16-token sub-block, the
// normalisations and the decays stay in fp32 on CUDA cores.
//
// Phases of a chunk (barriers between them): load + norms + gate (load_chunk), per-channel
// cumulative decay and sub-block boundaries (cumsum_and_boundaries), the rare fallback tiles,
// A-operand scaling, A on the tensor cores, state-operand scaling, the state projections, the
// blocked solve, then output and state update. Measured costs and the plan to shorten this
// critical path: docs/performance.md.
//
// Decays in A. Sub-block I holds tokens [16I, 16I + 16); b(I) = 16I - 1 is the last token before it
// (γ_b(0) = 0), e(J) = 16J + 15 the last token of J, and r(I) a reference token, chosen per channel
// (below). For a token i of I and j of J <= I,
//     e^{γ_i - γ_j} = e^{γ_i - γ_r(I)} · e^{γ_e(J) - γ_j} · e^{γ_r(I) - γ_e(J)}
// where the first factor goes into the row operand (independent of J), the second into the column
// operand (independent of I) and the third is a per-channel vector M[I, J] folded into the column
// operand as it is loaded. For J < I the last two are <= 1. The column operand's reference, γ_c(J),
// is γ_e(J) as written here, except for the last sub-block where the layout has L::kFoldLastM: only
// its own diagonal tile reads its column operand, so the third factor goes into the operand itself
// there (γ_c = γ_r; M[I, I] = 1 is neither stored nor loaded). A channel of that sub-block that takes
// the fallback below keeps γ_e: its column factors would overflow, and only the state side reads its
// column then.
//   The reference is the middle token m(I) = 16I + 7 where the decay over each half of the
// sub-block spans at most kMaxSpan (log2 units): then every row factor is <= 2^kMaxSpan and the
// diagonal tile's column factors e^{γ_m - γ_j} are too. A gate with KDA's lower bound of -5
// (natural log per token; 57.7 in log2 units over 8 tokens) always qualifies. Elsewhere it is b(I),
// as in the portable body: row factors <= 1, and the diagonal column factors reach the inverse
// decay of the whole sub-block, 2^{span}, which stays finite if span <= kMaxSpan. A sub-block with a
// channel beyond both gets its diagonal tile from the direct per-element formula instead
// (compute_diag_fallback), so no input can overflow. (With b(I) alone, a bound of -5 allows spans of
// 115 and sent ~40 % of the benchmark's chunks to the fallback: docs/performance.md, v5.)
//
// Masked entries (j > i) are computed by the tensor cores and discarded by a select, not a multiply.
// As in the portable body, a NaN in a token can reach earlier tokens of its chunk through
// 0 · NaN inside a product; the reference and the tests allow that (see test_nan_*).
#pragma once

#include "../kda_params.h"
#include "../port.cuh"
#include "kda_chunk_portable.cuh"
#include "ptx.cuh"

#if defined(__MUSACC__) || defined(FLASH_KDA_BACKEND_MUSA)
#error "kda_chunk_tc.cuh uses NVIDIA inline PTX; MUSA builds use the portable body only"
#endif

namespace flash_kda {
namespace tc {

// Block layout for head dim D_, V slice VS_, chunk C_ and T_ threads. Arrays hold fp32. (Member
// names follow the portable Layout so that its state loaders and task split apply.)
template <int D_, int VS_, int C_, int T_ = 256>
struct Layout {
  static constexpr int D = D_;
  static constexpr int VS = VS_;
  static constexpr int C = C_;
  static constexpr int kThreads = T_;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int BS = 16;                    // sub-block = the mma's M
  static constexpr int NB = C / BS;
  static constexpr int NPAIR = NB * (NB + 1) / 2;  // sub-block pairs J <= I
  static constexpr int NVS = D / VS;
  // Padding. An mma fragment load touches 8 rows x 4 columns (or the transpose). Arrays read along
  // their rows ("row-major" fragments: K, Q, Ke, S, A) use a row stride = 4 (mod 32) floats, which
  // puts those 32 words in 32 banks; U is only read transposed and uses a stride = 8 (mod 32).
  static constexpr int LD = D + 4;
  static constexpr int LDV = VS + 8;
  static constexpr int LDA = C + 4;

  static constexpr int kK = 0;                      // [C, LD] k -> k e^{γ-γ_r} -> k e^γ
  static constexpr int kQ = kK + C * LD;            // [C, LD] q -> q e^{γ-γ_r} -> q e^γ
  static constexpr int kKe = kQ + C * LD;           // [C, LD] a -> γ -> k e^{γ_c-γ} -> k e^{γ_last-γ}
  static constexpr int kG = kKe;                    //         (the loaders' name for γ's array)
  static constexpr int kS = kKe + C * LD;           // [VS, LD] the block's rows of the state
  static constexpr int kVx = kS + VS * LD;          // [C, LDV] v -> v - K S0ᵀ -> U
  static constexpr int kAkk = kVx + C * LDV;        // [C, LDA]
  static constexpr int kAqk = kAkk + C * LDA;       // [C, LDA]
  static constexpr int kM = kAqk + C * LDA;         // [NPAIR, D] e^{γ_r(I) - γ_e(J)} (the last pair's unused)
  static constexpr int kGc = kM + NPAIR * D;        // [NB, D] the column operands' reference γ_c(I) (see above)
  static constexpr int kGm = kGc + NB * D;          // [NB, D] γ at the reference token (see above)
  static constexpr int kEr = kGm + NB * D;          // [NB, D] e^{γ_r(I)}          } scale_for_state's
  static constexpr int kEl = kEr + NB * D;          // [NB, D] e^{γ_last - γ_c(I)} } factors
  static constexpr int kBeta = kEl + NB * D;        // [C]
  static constexpr int kEg = kBeta + C;             // [D] e^{γ_last}
  static constexpr int kFlags = kEg + D;            // [4] bit I: sub-block I takes the fallback
  static constexpr int kFloats = kFlags + 4;
  static constexpr int kSmemBytes = kFloats * 4;
  static constexpr int kMinBlocks = kSmemBytes <= 112 * 1024 && kThreads <= 256 ? 2 : 1;
  // The last sub-block's M in its column operand ("Decays in A"): no. (It spilled 2 bytes at D = 128
  // with 256 threads, as did scale_for_A with two rows per step.)
  static constexpr bool kFoldLastM = false;
  // cumsum_and_boundaries with one thread per channel: scale_for_state reads absolute γ factors
  // in the same phase as the sums (the preparation's layouts split the scan: PrepLayout)
  static constexpr bool kCumsumSplit = false;
  // q and k through shared memory between the loader and scale_for_A (QkRows): with C = 64, each
  // thread's rows would hold 64 registers across the scan
  static constexpr bool kKeepQK = false;

  // Warp tiling of the [C, VS] products (X, O): WM row blocks of 16 x WN column groups.
  static constexpr int WM = C / 16;
  static constexpr int WN = kWarps / WM;
  static constexpr int OT = VS / (8 * WN);          // n8 tiles per warp
  // Warp tiling of the state update [VS, D]: 2 x UN warps.
  static constexpr int UN = kWarps / 2;
  static constexpr int SMT = VS / 32;               // m16 tiles per warp
  static constexpr int SNT = D / (8 * UN);          // n8 tiles per warp

  static_assert(C % 16 == 0 && kWarps % WM == 0, "chunk tiling");
  static_assert(OT >= 1 && VS % (8 * WN) == 0, "output tiling");
  static_assert(VS % 32 == 0 && SNT >= 1 && D % (8 * UN) == 0, "state tiling");
  static_assert(VS <= kThreads, "one thread per state column in the substitution");
  static_assert((C * D) % kThreads == 0 && (C * VS) % kThreads == 0, "whole loads per thread");
  static_assert(C <= kThreads && D <= kThreads, "the loaders give one thread per token / channel");
  static_assert(LD % 32 == 4 && LDA % 32 == 4 && LDV % 32 == 8, "bank-conflict-free fragments");
  static_assert(kK % 4 == 0 && kQ % 4 == 0 && kKe % 4 == 0 && kM % 4 == 0, "16-byte rows for ldmatrix (compute_A)");
};

// log2 of the largest inverse decay a diagonal tile may carry (see the header comment): operands
// stay within 2^±kMaxSpan times |k|, far from fp32 overflow and, for |k| >= 2^-30, from denormals.
constexpr float kMaxSpan = 96.0f;

// ---------------------------------------------------------------------------------------------
// mma.sync m16n8k8 TF32 and its fragments. g = lane / 4, t = lane % 4. A (16 x 8): a0 (g, t),
// a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4). B (8 x 8, k x n): b0 (t, g), b1 (t+4, g). C (16 x 8):
// c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
// ---------------------------------------------------------------------------------------------
struct Lane {
  int g, t;
};

// fp32 -> TF32 operand. The tensor cores read the top 19 bits of the register, so passing the fp32
// bits truncates (toward zero). Operands that are written once and read by several warps are
// rounded to nearest when written instead (round_tf32, in the scale phases and for A); the rest
// (S, U, and the column operand of A, formed in registers) are truncated: a per-element conversion
// costs an instruction on sm_90 and three before it (round_tf32), and the cheap integer-add
// rounding would turn fp32's canonical NaN (0x7fffffff) into -0, hiding a NaN.
FLASH_KDA_DEVICE uint32_t tf32(float x) { return __float_as_uint(x); }

FLASH_KDA_DEVICE float4 round_tf32(float4 x) {  // (round_tf32(float): ptx.cuh)
  return make_float4(round_tf32(x.x), round_tf32(x.y), round_tf32(x.z), round_tf32(x.w));
}

FLASH_KDA_DEVICE float4 fast_exp2(float4 x) {  // (fast_exp2(float): ptx.cuh)
  return make_float4(fast_exp2(x.x), fast_exp2(x.y), fast_exp2(x.z), fast_exp2(x.w));
}
FLASH_KDA_DEVICE float4 operator-(float4 a, float4 b) {
  return make_float4(a.x - b.x, a.y - b.y, a.z - b.z, a.w - b.w);
}
FLASH_KDA_DEVICE float4 operator+(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
FLASH_KDA_DEVICE float4 operator*(float4 a, float4 b) {
  return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}
using portable::ld4;  // 16-byte shared-memory read
FLASH_KDA_DEVICE void st4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }
FLASH_KDA_DEVICE float max_abs(float4 x) { return fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(x.z), fabsf(x.w))); }

// 1 / (1 + 2^{-y}): the sigmoid of y / log2(e), for callers that have their argument in log2 units
// already. 2^{-y} = inf for very negative y gives 0, as it should.
FLASH_KDA_DEVICE float fast_sigmoid_log2(float y) { return __fdividef(1.0f, 1.0f + fast_exp2(-y)); }
// 1 / (1 + e^{-x}).
FLASH_KDA_DEVICE float fast_sigmoid(float x) { return fast_sigmoid_log2(x * portable::kLog2e); }

// A tile whose element (m, k) is p[m * ld + k].
FLASH_KDA_DEVICE void load_a(uint32_t (&a)[4], const float* p, int ld, Lane l) {
  a[0] = tf32(p[l.g * ld + l.t]);
  a[1] = tf32(p[(l.g + 8) * ld + l.t]);
  a[2] = tf32(p[l.g * ld + l.t + 4]);
  a[3] = tf32(p[(l.g + 8) * ld + l.t + 4]);
}
// A tile whose element (m, k) is p[k * ld + m].
FLASH_KDA_DEVICE void load_a_t(uint32_t (&a)[4], const float* p, int ld, Lane l) {
  a[0] = tf32(p[l.t * ld + l.g]);
  a[1] = tf32(p[l.t * ld + l.g + 8]);
  a[2] = tf32(p[(l.t + 4) * ld + l.g]);
  a[3] = tf32(p[(l.t + 4) * ld + l.g + 8]);
}
// B tile whose element (k, n) is p[n * ld + k].
FLASH_KDA_DEVICE void load_b(uint32_t (&b)[2], const float* p, int ld, Lane l) {
  b[0] = tf32(p[l.g * ld + l.t]);
  b[1] = tf32(p[l.g * ld + l.t + 4]);
}
// B tile whose element (k, n) is p[k * ld + n].
FLASH_KDA_DEVICE void load_b_t(uint32_t (&b)[2], const float* p, int ld, Lane l) {
  b[0] = tf32(p[l.t * ld + l.g]);
  b[1] = tf32(p[(l.t + 4) * ld + l.g]);
}

// The same A (load_a) and B (load_b) fragments by ldmatrix (ptx.cuh): one instruction instead of
// four or two shared loads. The lane's row address is formed once (frag_a_row / frag_b_row of the
// tile's top-left element p, row stride ld floats); the tile k columns to the right is at + 4k bytes.
// Rows must start 16-byte aligned (p and ld multiples of 4 floats). Lane i gives A's row i % 16,
// columns 4 (i / 16) .. + 3 (the four 8 x 4 quarters a0..a3), and B's row (column n) i % 8, k
// columns 4 ((i / 8) % 2) .. + 3 (b0, b1; lanes 16..31 repeat 0..15, unused by .x2).
FLASH_KDA_DEVICE unsigned frag_a_row(const float* p, int ld, int lane) {
  return shared_address(p + (lane % 16) * ld + (lane / 16) * 4);
}
FLASH_KDA_DEVICE unsigned frag_b_row(const float* p, int ld, int lane) {
  return shared_address(p + (lane % 8) * ld + ((lane / 8) % 2) * 4);
}

FLASH_KDA_DEVICE void zero(float (&d)[4]) { d[0] = d[1] = d[2] = d[3] = 0.0f; }

FLASH_KDA_DEVICE int pair_index(int I, int J) { return I * (I + 1) / 2 + J; }  // J <= I

// Calls f(r, c) for every group of four floats (row r, columns c..c+3) of a [ROWS, COLS] tile, the
// groups dealt to kThreads threads in turn. The shapes are compile-time constants and a thread's
// groups lie a fixed number of rows apart, so the loop unrolls into a fixed sequence whose addresses
// differ by immediates: no division, no 64-bit arithmetic per group. (The runtime-bounded loops this
// replaces spent a third of the recurrence kernel's instructions on copy indexing: docs/performance.md.)
template <int ROWS, int COLS, int kThreads, class F>
FLASH_KDA_DEVICE void for_each_quad(int tid, F&& f) {
  constexpr int kPerRow = COLS / 4, kItems = ROWS * kPerRow;
  static_assert(COLS % 4 == 0, "groups of four");
  if constexpr (kThreads % kPerRow == 0) {
    constexpr int kRowStep = kThreads / kPerRow;
    const int r0 = tid / kPerRow, c = (tid % kPerRow) * 4;
#pragma unroll
    for (int k = 0; k < (kItems + kThreads - 1) / kThreads; ++k) {
      if (kItems % kThreads == 0 || r0 + k * kRowStep < ROWS) f(r0 + k * kRowStep, c);
    }
  } else {  // thread counts that do not cover whole rows (not a multiple of 32): the plain loop
    for (int idx = tid; idx < kItems; idx += kThreads) f(idx / kPerRow, (idx % kPerRow) * 4);
  }
}

// ---------------------------------------------------------------------------------------------
// K-side of a chunk
// ---------------------------------------------------------------------------------------------
// Whether a tensor's rows can be read as 16-byte vectors: aligned base and strides that keep every
// row start aligned (`per16` elements per 16 bytes, a power of two: bit tests rather than 64-bit
// remainders, which cost dozens of instructions each). Checked once per block (the preparation:
// once per launch, on the host, PrepGrid); otherwise scalar loads.
FLASH_KDA_HD bool rows_aligned(const void* base, const TokenStrides& s, int per16) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && ((s.batch | s.token | s.head) & (per16 - 1)) == 0;
}

// Largest element offset of a token-major tensor over `batches` x `tokens` x `heads` x `dim`, or -1
// if a stride is negative (then no bound is claimed).
FLASH_KDA_HD int64_t max_token_offset(const TokenStrides& s, int64_t batches, int64_t tokens, int64_t heads,
                                      int64_t dim) {
  if (s.batch < 0 || s.token < 0 || s.head < 0) return -1;
  const auto last = [](int64_t n) { return n > 1 ? n - 1 : int64_t{0}; };
  return last(batches) * s.batch + last(tokens) * s.token + last(heads) * s.head + last(dim);
}

// Whether every element offset load_chunk forms (q, k, v, g, beta, dt_bias) lies in [0, 2^31): then
// its offsets are computed in 32-bit integers, each a few instructions where a 64-bit product of a
// stride and an index takes a multiply chain (the address arithmetic was about a fifth of the
// loading phase's instructions, docs/performance.md v27). Every partial sum is a sum of
// non-negative terms of such an offset, so none overflows.
FLASH_KDA_HD bool offsets_fit_int32(const KdaParams& p) {
  const int64_t b = p.cu_seqlens == nullptr ? p.num_seqs : 1, t = p.seq_len, d = p.head_dim;
  const int64_t m[] = {max_token_offset(p.q_strides, b, t, p.hqk, d), max_token_offset(p.k_strides, b, t, p.hqk, d),
                       max_token_offset(p.v_strides, b, t, p.hv, d), max_token_offset(p.g_strides, b, t, p.hv, d),
                       max_token_offset(p.beta_strides, b, t, p.hv, 1),
                       // dt_bias's last element read (a negative head stride: -1, out of range)
                       p.dt_bias == nullptr        ? 0
                       : p.dt_bias_head_stride < 0 ? -1
                                                   : (p.hv - 1) * p.dt_bias_head_stride + d - 1};
  for (const int64_t x : m) {
    if (x < 0 || x > INT32_MAX) return false;
  }
  return true;
}

// How load_chunk may form its reads: 16-byte loads per tensor (q .. dtb), and 32-bit offsets (off32).
struct VecOk {
  bool q, k, v, g, dtb;
  bool off32;
  FLASH_KDA_HD bool all() const { return q && k && v && g && dtb; }
};

template <class L>
FLASH_KDA_HD VecOk vec_ok(const KdaParams& p) {
  constexpr int h = 16 / sizeof(port::input_t);
  const bool dtb = p.dt_bias == nullptr ||
                   (reinterpret_cast<uintptr_t>(p.dt_bias) % 16 == 0 && (p.dt_bias_head_stride & 3) == 0);
  return {rows_aligned(p.q, p.q_strides, h),
          rows_aligned(p.k, p.k_strides, h),
          rows_aligned(p.v, p.v_strides, h),
          rows_aligned(p.g, p.g_strides, p.g_fp32 ? 4 : h),
          dtb,
          offsets_fit_int32(p)};
}

// token_offset in the offset type Off: int where offsets_fit_int32 holds (the caller's promise),
// otherwise int64_t.
template <class Off>
FLASH_KDA_DEVICE Off token_offset_as(const TokenStrides& s, const SeqRange& r, int64_t t, int h) {
  if constexpr (sizeof(Off) == 4) {
    return static_cast<int>(r.batch) * static_cast<int>(s.batch) +
           static_cast<int>(r.start + t) * static_cast<int>(s.token) + h * static_cast<int>(s.head);
  } else {
    return token_offset(s, r, t, h);
  }
}

// Eight consecutive elements of a tensor holding the input dtype, or fp32 if `fp32`; 16-byte loads
// if `vec` (always with kVec: the caller checked every tensor, and the scalar path is not compiled,
// so it costs no predicated instructions). `swap` (input dtype only): x holds elements 4..7, then
// 0..3, as store8_swapped wants them; exchanged as four packed words before the conversion, where
// eight floats exchanged at the store took eight selects.
template <bool kVec, class Off>
FLASH_KDA_DEVICE void load8(const void* base, Off off, bool fp32, bool vec_, float (&x)[8], bool swap = false) {
  const bool vec = kVec || vec_;
  if (fp32) {
    const float* f = static_cast<const float*>(base) + off;
    if (vec) {
      const float4 a = ld4(f), b = ld4(f + 4);
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = f[e];
    }
  } else {
    const port::input_t* h = static_cast<const port::input_t*>(base) + off;
    if (vec) {
      const uint4 r = *reinterpret_cast<const uint4*>(h);
      uint4 u;
      u.x = swap ? r.z : r.x, u.y = swap ? r.w : r.y, u.z = swap ? r.x : r.z, u.w = swap ? r.y : r.w;
      port::to_float2(u.x, x[0], x[1]);
      port::to_float2(u.y, x[2], x[3]);
      port::to_float2(u.z, x[4], x[5]);
      port::to_float2(u.w, x[6], x[7]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = port::to_float(h[e ^ (swap ? 4 : 0)]);
    }
  }
}

FLASH_KDA_DEVICE void store8(float* dst, const float (&x)[8]) {
  st4(dst, make_float4(x[0], x[1], x[2], x[3]));
  st4(dst + 4, make_float4(x[4], x[5], x[6], x[7]));
}

// store8 with the two 16-byte halves in the other order where `swap`, x as load8(..., swap) gives
// it (elements 4..7 first there). Where the 8 lanes of a quarter-warp store 8-float groups side by
// side (a row of V), their first stores fall on words 2p, 4 of the 8 16-byte bank groups (2-way
// conflicts on both stores); with lanes 4-7 of each quarter storing their second half first, each
// store covers all 8 (docs/performance.md v29).
FLASH_KDA_DEVICE void store8_swapped(float* dst, const float (&x)[8], bool swap) {
  const int first = swap ? 4 : 0;
  st4(dst + first, make_float4(x[0], x[1], x[2], x[3]));
  st4(dst + (4 - first), make_float4(x[4], x[5], x[6], x[7]));
}

// Element i of a buffer of fp32 or of the input dtype, as raw bits (a 16-bit element in the low
// half), and its value: load_as_float in two steps, so that the read can be issued early and the
// conversion, which waits for it, placed late.
template <class Off>
FLASH_KDA_DEVICE uint32_t load_bits(const void* base, Off i, bool is_fp32) {
  return is_fp32 ? static_cast<const uint32_t*>(base)[i] : static_cast<const uint16_t*>(base)[i];
}
FLASH_KDA_DEVICE float float_from_bits(uint32_t bits, bool is_fp32) {
  if (is_fp32) return __uint_as_float(bits);
  const uint16_t h = static_cast<uint16_t>(bits);
  port::input_t x;
  memcpy(&x, &h, sizeof(x));  // (the 16 bits as the input type, without type punning)
  return port::to_float(x);
}

// Zeros for a row past the chunk's end (a select, not a multiply: the reread row may hold a NaN).
FLASH_KDA_DEVICE void zero_past_end(bool dead, float (&x)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = dead ? 0.0f : x[e];
}

// Which row (of the warp's 32 / RV) and which 8-channel group a lane takes in load_chunk, RV lanes
// per row. A lane stores its 8 channels as two 16-byte words, and a 16-byte store is served a
// quarter-warp (8 lanes) at a time: with a row's lanes side by side, those 8 lanes wrote words 2p
// of one row, which fall on 4 of the 8 16-byte bank groups (2-way conflicts on every store: 8 %
// of the preparation's shared-memory wavefronts, docs/performance.md v14). Here a quarter-warp
// takes R = 32 / RV rows (LD = 4 mod 32: a row starts one group further on) and in each row
// channel groups p whose 2p are distinct mod 8, so its 8 words fill all 8 bank groups (R = 2, 4,
// 8; one row per warp, R = 1, keeps the 2-way conflict: its 8 lanes have only 4 even 2p).
struct RowLane {
  int row, group;  // row within the warp's R rows; channels [8 group, 8 group + 8)
};
template <int RV>
FLASH_KDA_DEVICE RowLane row_lane(int lane) {
  constexpr int R = 32 / RV;
  if constexpr (R == 1) {
    return {0, lane};
  } else {
    constexpr int H = R / 2;
    const int m = lane % 8, q = lane / 8, pp = m / R;  // quarter q, slot pp of its row in it
    return {m % R, 4 * (q / H) + (pp * H + q) % 4};
  }
}

// A thread's rows in load_chunk: kPass rows kRowsPerPass apart from row0, channels [c, c + 8).
template <class L>
struct LoaderRows {
  static constexpr int RV = L::D / 8;  // vectors per row = lanes sharing a row
  static constexpr int kPass = L::C * RV / L::kThreads;
  static constexpr int kRowsPerPass = L::kWarps * (32 / RV);
  static_assert(RV <= 32 && 32 % RV == 0 && (L::C * RV) % L::kThreads == 0, "row lanes");
  int row0, c;
  FLASH_KDA_DEVICE explicit LoaderRows(int tid) {
    const RowLane rl = row_lane<RV>(tid % 32);
    row0 = (tid / 32) * (32 / RV) + rl.row;
    c = rl.group * 8;
  }
  FLASH_KDA_DEVICE int row(int r) const { return row0 + r * kRowsPerPass; }
};

// The loader's normalised q and k rows, kept in registers until scale_for_A's step (L::kKeepQK):
// they skip a store to shared memory and a load back (512 of the preparation's ~4,600 shared-memory
// wavefronts a block at D = 128, in a kernel bound by its L1; docs/performance.md v37). Only the
// rare fallback reads them raw from shared memory: k_side_A stores them for it.
template <class L>
struct QkRows {
  float q[LoaderRows<L>::kPass][8], k[LoaderRows<L>::kPass][8];
};

// Chunk input, normalised on the way in: q <- scale · q / ||q||, k <- k / ||k|| (norms optional),
// a <- the gate's log-decay in log2 units (clamped like the portable body), v, sigmoid(b). A thread
// reads 8 consecutive channels of a row; the D / 8 lanes of a row (one warp or part of one, as
// row_lane places them) reduce the squared norm with shuffles. Tokens past the sequence end are zero.
//
// Every global read of the chunk (q, k, g, dt_bias, v, b and A_log[h]) is issued before any loaded
// value is used, in code without branches around the reads, so that their latencies overlap: one
// round trip per chunk. (Written with the reads under `if (i < len)` and v and b after the norms,
// the SASS waited for q and k before issuing v's read and for v before b's, and for A_log before
// all of them: four DRAM or L2 round trips in a row per block, docs/performance.md v11.) Rows past
// the chunk's end read the chunk's last row instead, which lies in the tensor (len >= 1: the
// callers never load an empty chunk), and are replaced by zeros afterwards, as the arrays held
// before. (The gates' zeros are what the result needs, to keep γ_last at the last real token; q,
// k and v of those rows meet only zero coefficients, β = 0, and the reread row is a real one.)
template <class L, bool kVec, class Off = int64_t>
FLASH_KDA_DEVICE void load_chunk(const KdaParams& p, const portable::Task& t, int64_t t0, int len, VecOk vec,
                                 float* sm, int tid, QkRows<L>& keep) {
  using Rows = LoaderRows<L>;
  constexpr int RV = Rows::RV, kPass = Rows::kPass;
  constexpr int kVItems = L::C * L::VS / 8;  // v's 8-element items, a fixed count per thread
  constexpr int kVPass = (kVItems + L::kThreads - 1) / L::kThreads;
  const bool gate = p.A_log != nullptr;
  const Rows rows(tid);
  const int last = len - 1;
  const bool v_swap = (tid >> 2) & 1;  // store8_swapped's lanes 4-7 of each quarter-warp

  // 1. The reads.
  float qx[kPass][8], kx[kPass][8], gx[kPass][8], dtb[kPass][8], vx[kVPass][8];
  const float a_log = gate ? p.A_log[t.h] : 0.0f;
  // b as raw bits, converted in part 2: a conversion here would wait for the read and hold back
  // every read issued after it
  uint32_t b_bits = 0;
  if (tid < L::C) {
    b_bits = load_bits(p.beta, token_offset_as<Off>(p.beta_strides, t.r, t0 + min(tid, last), t.h), p.beta_fp32);
  }
#pragma unroll
  for (int r = 0; r < kPass; ++r) {
    const int i = min(rows.row(r), last), c = rows.c;
    // dt_bias straight from global memory (cached: every block of the head reads the same row)
    if (gate) {
      load8<kVec>(p.dt_bias, static_cast<Off>(t.h) * static_cast<Off>(p.dt_bias_head_stride) + c, true, vec.dtb,
                  dtb[r]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dtb[r][e] = 0.0f;
    }
    load8<kVec>(p.q, token_offset_as<Off>(p.q_strides, t.r, t0 + i, t.hk) + c, false, vec.q, qx[r]);
    load8<kVec>(p.k, token_offset_as<Off>(p.k_strides, t.r, t0 + i, t.hk) + c, false, vec.k, kx[r]);
    load8<kVec>(p.g, token_offset_as<Off>(p.g_strides, t.r, t0 + i, t.h) + c, p.g_fp32, vec.g, gx[r]);
  }
#pragma unroll
  for (int r = 0; r < kVPass; ++r) {  // (items past kVItems, where threads outnumber them, reread the last)
    const int item = min(tid + r * L::kThreads, kVItems - 1);
    const int i = min(item / (L::VS / 8), last), c = (item % (L::VS / 8)) * 8;
    load8<kVec>(p.v, token_offset_as<Off>(p.v_strides, t.r, t0 + i, t.h) + t.v0 + c, false, vec.v, vx[r], v_swap);
  }

  // 2. Their uses. Rows past the end are zeroed just before their stores, the norms and gates having
  // been computed from the reread row; for whole chunks (the common case) this costs nothing.
  const bool short_chunk = len < L::C;  // uniform
#pragma unroll
  for (int r = 0; r < kVPass; ++r) {
    const int item = tid + r * L::kThreads;
    if (kVItems % L::kThreads != 0 && item >= kVItems) break;
    const int i = item / (L::VS / 8), c = (item % (L::VS / 8)) * 8;
    if (short_chunk) zero_past_end(i >= len, vx[r]);
    store8_swapped(sm + L::kVx + i * L::LDV + c, vx[r], v_swap);
  }
  if (tid < L::C) sm[L::kBeta + tid] = tid < len ? fast_sigmoid(float_from_bits(b_bits, p.beta_fp32)) : 0.0f;

  // The gate's sigmoid argument in log2 units in one product per element: (g + dt_bias) times
  // e^{A_log} log2(e), the constant rounded once here (it took a second product per element).
  const float exp_a2 = gate ? port::exp(a_log) * portable::kLog2e : 0.0f;
  const float lb2 = p.lower_bound * portable::kLog2e;
  constexpr float kMin2 = portable::kMinLogDecay;  // log2 units; only needs to stay finite
  // With the gate, every log-decay is lb2 times a sigmoid in [0, 1], so it lies between lb2 and 0
  // and the clamp below changes nothing unless lb2 itself is below kMin2 (NaN passes both ways).
  const bool clamp = !gate || lb2 < kMin2;  // uniform
#pragma unroll
  for (int r = 0; r < kPass; ++r) {
    const int i = rows.row(r), c = rows.c;
    float qs = 0.0f, ks = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qs += qx[r][e] * qx[r][e];
      ks += kx[r][e] * kx[r][e];
    }
#pragma unroll
    for (int m = 16; m >= 32 / RV; m /= 2) {  // a row's lanes: one lane % (32 / RV) (row_lane)
      qs += __shfl_xor_sync(0xffffffffu, qs, m);
      ks += __shfl_xor_sync(0xffffffffu, ks, m);
    }
    const float qm = p.use_qk_l2norm ? p.scale * rsqrtf(qs + 1e-6f) : p.scale;
    const float km = p.use_qk_l2norm ? rsqrtf(ks + 1e-6f) : 1.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qx[r][e] *= qm;
      kx[r][e] *= km;
    }
    // (computed for every row and then selected: a branch per element would serialise the
    // elements' exp2 / reciprocal chains)
    if (gate) {  // uniform
#pragma unroll
      for (int e = 0; e < 8; ++e) gx[r][e] = lb2 * fast_sigmoid_log2((gx[r][e] + dtb[r][e]) * exp_a2);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) gx[r][e] *= portable::kLog2e;
    }
    if (clamp) {
#pragma unroll
      for (int e = 0; e < 8; ++e) gx[r][e] = gx[r][e] < kMin2 ? kMin2 : gx[r][e];  // NaN passes
    }
    if (short_chunk) {
      zero_past_end(i >= len, qx[r]);
      zero_past_end(i >= len, kx[r]);
      zero_past_end(i >= len, gx[r]);
    }
    if constexpr (L::kKeepQK) {
#pragma unroll
      for (int e = 0; e < 8; ++e) keep.q[r][e] = qx[r][e], keep.k[r][e] = kx[r][e];
    } else {
      store8(sm + L::kQ + i * L::LD + c, qx[r]);
      store8(sm + L::kK + i * L::LD + c, kx[r]);
    }
    store8(sm + L::kG + i * L::LD + c, gx[r]);
  }
}

// q and k as load_chunk normalised them, from QkRows to their arrays (L::kKeepQK; for the
// fallback, which reads them raw).
template <class L>
FLASH_KDA_DEVICE void store_qk_rows(float* sm, int tid, const QkRows<L>& keep) {
  const LoaderRows<L> rows(tid);
#pragma unroll
  for (int r = 0; r < LoaderRows<L>::kPass; ++r) {
    const int o = rows.row(r) * L::LD + rows.c;
    store8(sm + L::kQ + o, keep.q[r]);
    store8(sm + L::kK + o, keep.k[r]);
  }
}

// Offset of a sub-block's reference token m(I) (see "Decays in A" above).
constexpr int kRef = 7;

// A column of N log-decays (stride LD) <- its running sum, in place; the sums stay in gam.
template <int LD, int N>
FLASH_KDA_DEVICE void scan_column(float* col, float (&gam)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) gam[i] = col[i * LD];
#pragma unroll
  for (int i = 1; i < N; ++i) gam[i] += gam[i - 1];
#pragma unroll
  for (int i = 0; i < N; ++i) col[i * LD] = gam[i];
}

struct SubBlockRef {
  float ref;      // γ_r(I), the sub-block's reference
  bool fallback;  // the diagonal tile needs compute_diag_fallback
};

// A sub-block's reference from γ at the token before it (lo), at token kRef (mid) and at its last
// token (hi): the middle token where both halves span <= kMaxSpan (largest row factor, largest
// column factor), else the token before the sub-block, which keeps every row factor <= 1 (a middle
// reference would make the row factors before a huge decay overflow, and inf times the zero column
// factors of the other tiles is NaN). With that reference the diagonal tile is finite only if the
// whole span is <= kMaxSpan; otherwise the fallback computes it.
FLASH_KDA_DEVICE SubBlockRef sub_block_ref(float lo, float mid, float hi) {
  const bool in_mid = lo - mid <= kMaxSpan && mid - hi <= kMaxSpan;
  return {in_mid ? mid : lo, !in_mid && lo - hi > kMaxSpan};
}

// One thread per channel: γ <- cumulative sum of the log-decays (in place), then from its own
// column the references (Gm, Gc), e^{γ_last}, the vectors M and the fallback flags.
//
// L::kCumsumSplit (the preparation's layouts with 2 D threads or more): one thread per channel and
// sub-block, sub-block I on whole warps (threads [I D, I D + D)), and no thread waits for another.
// Each scans its 16 tokens from zero, so sub-block I's γ, Gc(I) and Gm(I) are relative to γ at
// the token before it (γ_b(I); for I = 0 that is 0, the chunk's own units). Everything up to A uses
// them only in differences within one sub-block (scale_for_A's e^{γ - γ_r(I)} and e^{γ_c(I) - γ},
// compute_diag_fallback, M(I, I)), or relative to γ_e(0) = γ_b(1), which is sub-block 1's zero
// (M(1, 0) = e^{γ_r(1) - γ_e(0)}, El(0) = e^{γ_last - γ_e(0)}). The two absolute factors, e^{γ_r(1)}
// and e^{γ_last}, are first needed after A: split_scan_absolute forms them beside compute_A's
// units. Why: the one-thread form ran a 32-add chain on 4 of 16 warps while the other 12 waited
// at the barrier (5.4 % of the preparation's stall samples, docs/performance.md v31); this one has
// a 16-add chain on 8 warps and issues fewer instructions per block. (Session 31's
// cumsum-halves put both sub-blocks of a channel in one warp and lost: its branches diverged.)
template <class L>
FLASH_KDA_DEVICE void cumsum_and_boundaries(float* sm, int tid) {
  constexpr int D = L::D;
  int* flags = reinterpret_cast<int*>(sm + L::kFlags);
  if constexpr (L::kCumsumSplit) {
    constexpr int BS = L::BS;
    static_assert(L::NB == 2 && L::kThreads >= 2 * D && D % 32 == 0, "two sub-blocks of whole warps");
    if (tid >= 2 * D) return;
    const int I = tid / D, c = tid % D;  // (I uniform per warp)
    float gam[BS];
    scan_column<L::LD>(sm + L::kG + I * BS * L::LD + c, gam);
    // In the sub-block's units, γ_b(I) = 0. (Passed as -0.0f: -0.0f - x is exactly -x, so the
    // compiler drops the subtractions; 0.0f - x differs from -x in a zero's sign and stays.)
    const float hi = gam[BS - 1];
    const SubBlockRef r = sub_block_ref(-0.0f, gam[kRef], hi);
    const float ref = r.ref;
    const bool fallback = r.fallback;
    if (fallback) atomicOr(flags, 1 << I);
    const bool last = L::kFoldLastM && I == 1;
    const float gc = last && !fallback ? ref : hi;  // γ_c(I) (see "Decays in A")
    sm[L::kGc + I * D + c] = gc;
    sm[L::kGm + I * D + c] = ref;
    if (!last) sm[L::kM + pair_index(I, I) * D + c] = fast_exp2(ref - hi);
    if (I == 0) {
      sm[L::kEr + c] = fast_exp2(ref);
    } else {
      sm[L::kM + pair_index(1, 0) * D + c] = fast_exp2(ref);  // e^{γ_r(1) - γ_e(0)}
      sm[L::kEl + c] = fast_exp2(hi);                          // e^{γ_last - γ_c(0)}, γ_c(0) = γ_e(0)
      sm[L::kEl + D + c] = fast_exp2(hi - gc);                 // e^{γ_last - γ_c(1)}
      sm[L::kEg + c] = hi;  // γ_last in sub-block 1's units: split_scan_absolute makes it e^{γ_last}
    }
  } else {  // (an else, not a return above: nvcc warned that the loop was unreachable)
    for (int c = tid; c < D; c += L::kThreads) {
      float gam[L::C];
      scan_column<L::LD>(sm + L::kG + c, gam);
      float gb[L::NB + 1];
      gb[0] = 0.0f;
#pragma unroll
      for (int m = 1; m <= L::NB; ++m) gb[m] = gam[m * L::BS - 1];
      sm[L::kEg + c] = fast_exp2(gb[L::NB]);
#pragma unroll
      for (int I = 0; I < L::NB; ++I) {
        const SubBlockRef r = sub_block_ref(gb[I], gam[I * L::BS + kRef], gb[I + 1]);
        const float ref = r.ref;
        const bool fallback = r.fallback;
        if (fallback) atomicOr(flags, 1 << I);
        const bool last = L::kFoldLastM && I == L::NB - 1;
        const float gc = last && !fallback ? ref : gb[I + 1];  // γ_c(I) (see "Decays in A")
        sm[L::kGm + I * D + c] = ref;
        sm[L::kGc + I * D + c] = gc;
        // scale_for_state's factors, which depend on the sub-block and channel only (per element
        // they were 16 exponentials of the same value per channel, one per row)
        sm[L::kEr + I * D + c] = fast_exp2(ref);
        sm[L::kEl + I * D + c] = fast_exp2(gb[L::NB] - gc);
#pragma unroll
        for (int J = 0; J < (last ? I : I + 1); ++J) sm[L::kM + pair_index(I, J) * D + c] = fast_exp2(ref - gb[J + 1]);
      }
    }
  }
}

// kCumsumSplit's absolute factors, e^{γ_r(1)} (Er(1)) and e^{γ_last} (Eg), from Gc(0) = γ_e(0) (in the
// chunk's units) and sub-block 1's relative Gm(1) and γ_last (which the scan left in Eg), by the
// block's last 128 threads: called after compute_A's units, where those warps have none (512
// threads, D = 128) or the fewest. Their readers come after the barrier that ends compute_A's phase.
template <class L>
FLASH_KDA_DEVICE void split_scan_absolute(float* sm, int tid) {
  constexpr int D = L::D, kN = 128;
  static_assert(L::kThreads >= kN, "the last 128 threads");
  for (int c = tid - (L::kThreads - kN); c >= 0 && c < D; c += kN) {
    const float g1 = sm[L::kGc + c];  // γ_c(0) = γ_e(0), in the chunk's units
    sm[L::kEr + D + c] = fast_exp2(g1 + sm[L::kGm + D + c]);
    sm[L::kEg + c] = fast_exp2(g1 + sm[L::kEg + c]);
  }
}

// Diagonal tile of a flagged sub-block from the direct formula (raw k, q and γ); the whole 16 x 16
// tile is written, zeros above the diagonal, as compute_A would.
template <class L>
FLASH_KDA_DEVICE void compute_diag_fallback(float* sm, int tid, int flags) {
  const float* K = sm + L::kK;
  const float* Q = sm + L::kQ;
  const float* G = sm + L::kG;
  for (int it = tid; it < L::NB * L::BS * L::BS; it += L::kThreads) {
    const int I = it / (L::BS * L::BS);
    if (!((flags >> I) & 1)) continue;
    const int i = I * L::BS + (it / L::BS) % L::BS, j = I * L::BS + it % L::BS;
    float kk = 0.0f, qk = 0.0f;
    if (j <= i) {
      for (int c = 0; c < L::D; ++c) {
        const float kj = K[j * L::LD + c] * port::exp2(G[i * L::LD + c] - G[j * L::LD + c]);
        kk += K[i * L::LD + c] * kj;
        qk += Q[i * L::LD + c] * kj;
      }
    }
    sm[L::kAqk + i * L::LDA + j] = qk;
    sm[L::kAkk + i * L::LDA + j] = j < i ? kk : 0.0f;
  }
}

// scale_for_A's step on four channels (offset o in the [C, LD] arrays) of a row of sub-block I: k ->
// k e^{γ - γ_r} and q -> q e^{γ - γ_r} (row operands, rounded to TF32), γ -> k e^{γ_c - γ} (column
// operand; times M when compute_A loads it, but the last sub-block's). γ is read from its array, k
// and q are given.
template <class L>
FLASH_KDA_DEVICE void scale_quad_for_A(float* sm, int I, int c, int o, float4 k, float4 q) {
  const float4 gm = ld4(sm + L::kGm + I * L::D + c), gc = ld4(sm + L::kGc + I * L::D + c);
  const float4 g = ld4(sm + L::kKe + o);
  const float4 fb = fast_exp2(g - gm);
  st4(sm + L::kKe + o, k * fast_exp2(gc - g));
  st4(sm + L::kK + o, round_tf32(k * fb));
  st4(sm + L::kQ + o, round_tf32(q * fb));
}

// scale_for_A, four channels of a row per step, with q and k from shared memory: the fused body's
// form. (The preparation's form below takes them from the loader's registers. Until v37 it used
// this one with two rows per step, reading a sub-block's γ_r and γ_c once for both rows:
// docs/performance.md v33.)
template <class L>
FLASH_KDA_DEVICE void scale_for_A(float* sm, int tid) {
  for_each_quad<L::C, L::D, L::kThreads>(tid, [&](int i, int c) {
    const int o = i * L::LD + c;
    scale_quad_for_A<L>(sm, i / L::BS, c, o, ld4(sm + L::kK + o), ld4(sm + L::kQ + o));
  });
}

// scale_for_A for L::kKeepQK: k and q from the loader's registers (keep), each thread on its loader
// rows (LoaderRows: 8 channels of a row). The loader's 16-byte pattern keeps these accesses
// conflict-free as its stores were.
template <class L>
FLASH_KDA_DEVICE void scale_for_A(float* sm, int tid, const QkRows<L>& keep) {
  const LoaderRows<L> rows(tid);
#pragma unroll
  for (int r = 0; r < LoaderRows<L>::kPass; ++r) {
    const int i = rows.row(r);
    const float(&k)[8] = keep.k[r];
    const float(&q)[8] = keep.q[r];
#pragma unroll
    for (int h = 0; h < 8; h += 4) {
      const int c = rows.c + h;
      scale_quad_for_A<L>(sm, i / L::BS, c, i * L::LD + c, make_float4(k[h], k[h + 1], k[h + 2], k[h + 3]),
                          make_float4(q[h], q[h + 1], q[h + 2], q[h + 3]));
    }
  }
}

// The k-loop of one compute_A unit: for A_kk (m = 0) and A_qk (m = 1), acc[m][kb / 8 % 2] += the
// row operand's fragments (Rk, Rq) times the column operand's (Ke), times M's factors if kByM. The
// column fragment, and its product with M, is loaded and formed once for both matrices. Two
// accumulators a matrix (even and odd k-blocks), summed by the caller: the mma chain of a unit,
// which is the phase's latency, is half as long. (Two k-blocks per step, so that which accumulator
// a k-block goes to never depends on the unroll factor.)
template <int D, bool kByM>
FLASH_KDA_DEVICE void a_unit_products(float (&acc)[2][2][4], unsigned Rk, unsigned Rq, unsigned Ke,
                                      unsigned M) {
  static_assert(D % 16 == 0, "k-blocks in pairs");
#pragma unroll 2
  for (int kb2 = 0; kb2 < D; kb2 += 16) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int kb = kb2 + 8 * h2;
      uint32_t a[4], b[2];
      ldmatrix_x2(b, Ke + 4 * kb);
      if constexpr (kByM) {
        uint32_t m[2];
        ldmatrix_x2(m, M + 4 * kb);
        b[0] = tf32(__uint_as_float(b[0]) * __uint_as_float(m[0]));
        b[1] = tf32(__uint_as_float(b[1]) * __uint_as_float(m[1]));
      } else {
        b[0] = tf32(__uint_as_float(b[0]));
        b[1] = tf32(__uint_as_float(b[1]));
      }
      ldmatrix_x4(a, Rk + 4 * kb);
      mma(acc[0][h2], a, b);
      ldmatrix_x4(a, Rq + 4 * kb);
      mma(acc[1][h2], a, b);
    }
  }
}

// A_kk (strictly causal) and A_qk (causal) tiles on the tensor cores. Work unit = (pair (I, J),
// column half h): the 16 x 8 tiles of A_kk and A_qk at (I, J, h), which share their column operand
// (K e^{γ_c - γ} times M), so each unit loads it once: 12 units of one tile each loaded it twice,
// about a fifth of the phase's shared-memory wavefronts (320 of 1,524 a block, docs/performance.md
// v35). (One unit per pair, both halves, kept 6 of the preparation's 16 warps busy and the other 10
// waiting at the next barrier: 12 % of its stall samples, v6; 2 NPAIR units keep as many busy, but
// two blocks now share an SM.) Tiles above the diagonal sub-blocks are never read (the products
// below stop at the causal edge), so they are not written.
// kAqkTf32: A_qk is stored rounded to TF32, for the fused body's products; the two-kernel form
// scales it to fp16 for its record, where a TF32 rounding first would only round twice.
// Returns the largest magnitude of the A_qk values the thread stored (0 for a thread of no unit):
// the preparation's fp16 scale of A_qk, without a pass over the stored tiles. (Units run on warps
// [0, 2 NPAIR), one each where the block has that many warps.)
template <class L, bool kAqkTf32 = true>
FLASH_KDA_DEVICE float compute_A(float* sm, int warp, Lane l, int flags) {
  constexpr int D = L::D;
  float aqk_max = 0.0f;
  for (int unit = warp; unit < 2 * L::NPAIR; unit += L::kWarps) {
    const int pr = unit / 2, h = unit % 2;
    int I = 0;
    while (pair_index(I + 1, 0) <= pr) ++I;
    const int J = pr - pair_index(I, 0);
    if (I == J && ((flags >> I) & 1)) continue;  // done by compute_diag_fallback
    const int i0 = I * L::BS, j0 = J * L::BS + 8 * h, lane = 4 * l.g + l.t;
    const unsigned Rk = frag_a_row(sm + L::kK + i0 * L::LD, L::LD, lane);
    const unsigned Rq = frag_a_row(sm + L::kQ + i0 * L::LD, L::LD, lane);
    const unsigned Ke = frag_b_row(sm + L::kKe + j0 * L::LD, L::LD, lane);
    // M's factors for B's two registers (channels kb + t, kb + t + 4) by the same ldmatrix, every
    // row address of a matrix on the one vector (row stride 0): one instruction for two loads
    const unsigned M = frag_b_row(sm + L::kM + pr * D, 0, lane);
    float acc[2][2][4];
    zero(acc[0][0]);
    zero(acc[0][1]);
    zero(acc[1][0]);
    zero(acc[1][1]);
    // (the last sub-block's column operand holds its M already: no M loads in its diagonal unit)
    if (L::kFoldLastM && pr == L::NPAIR - 1) {
      a_unit_products<D, false>(acc, Rk, Rq, Ke, M);
    } else {
      a_unit_products<D, true>(acc, Rk, Rq, Ke, M);
    }
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const bool qk = m == 1;
      float* out = sm + (qk ? L::kAqk : L::kAkk);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + l.g + (e >= 2 ? 8 : 0), j = j0 + 2 * l.t + (e & 1);
        const float a = acc[m][0][e] + acc[m][1][e];
        const float v = (qk ? j <= i : j < i) ? (qk && !kAqkTf32 ? a : round_tf32(a)) : 0.0f;
        out[i * L::LDA + j] = v;
        if (qk) aqk_max = fmaxf(aqk_max, fabsf(v));
      }
    }
  }
  return aqk_max;
}

// k -> k e^γ, q -> q e^γ (from the e^{γ - γ_r} forms) and Ke -> k e^{γ_last - γ}, all rounded to TF32
// (the fused body's product operands). (e^{γ_r} may flush to 0 where e^γ of an earlier token would
// not: only for factors below 2^-126 · 2^kMaxSpan.) The two-kernel form's preparation has its own
// forms of these (StateSideTiles, and apply_T's factors, in kda_split_prep.cuh).
template <class L>
FLASH_KDA_DEVICE void scale_for_state(float* sm, int tid) {
  constexpr int D = L::D;
  for_each_quad<L::C, D, L::kThreads>(tid, [&](int i, int c) {
    const int I = i / L::BS, o = i * L::LD + c;
    const float4 fb = ld4(sm + L::kEr + I * D + c);  // e^{γ_r(I)}
    const float4 q = round_tf32(ld4(sm + L::kQ + o) * fb);
    const float4 ke = round_tf32(ld4(sm + L::kKe + o) * ld4(sm + L::kEl + I * D + c));
    st4(sm + L::kK + o, round_tf32(ld4(sm + L::kK + o) * fb));
    st4(sm + L::kQ + o, q);
    st4(sm + L::kKe + o, ke);
  });
}

// ---------------------------------------------------------------------------------------------
// V-side of a chunk
// ---------------------------------------------------------------------------------------------
// The output tile of a warp: rows [16 wm, 16 wm + 16), columns [col0, col0 + 8 OT).
template <class L>
struct OutTile {
  int wm, col0;
  float o[L::OT][4];
};

template <class L>
FLASH_KDA_DEVICE OutTile<L> out_tile(int warp) {
  OutTile<L> t;
  t.wm = warp % L::WM;
  t.col0 = (warp / L::WM) * (L::VS / L::WN);
  return t;
}

// Vx <- V - (K e^γ) S0ᵀ and tile.o <- (Q e^γ) S0ᵀ.
template <class L>
FLASH_KDA_DEVICE void project_state(float* sm, Lane l, OutTile<L>& tile) {
  float x[L::OT][4];
#pragma unroll
  for (int n = 0; n < L::OT; ++n) {
    zero(x[n]);
    zero(tile.o[n]);
  }
  const float* K = sm + L::kK + tile.wm * 16 * L::LD;
  const float* Q = sm + L::kQ + tile.wm * 16 * L::LD;
  const float* S = sm + L::kS + tile.col0 * L::LD;
#pragma unroll 2
  for (int kb = 0; kb < L::D; kb += 8) {
    uint32_t ak[4], aq[4];
    load_a(ak, K + kb, L::LD, l);
    load_a(aq, Q + kb, L::LD, l);
#pragma unroll
    for (int n = 0; n < L::OT; ++n) {
      uint32_t b[2];
      load_b(b, S + n * 8 * L::LD + kb, L::LD, l);
      mma(x[n], ak, b);
      mma(tile.o[n], aq, b);
    }
  }
  float* Vx = sm + L::kVx;
#pragma unroll
  for (int n = 0; n < L::OT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = tile.wm * 16 + l.g + (e >= 2 ? 8 : 0), v = tile.col0 + n * 8 + 2 * l.t + (e & 1);
      Vx[i * L::LDV + v] -= x[n][e];
    }
}

// Vx <- U = (I + diag(b) A_kk)^{-1} diag(b) Vx. Sub-block by sub-block: the tensor cores remove the
// finished sub-blocks' contribution, then one thread per column substitutes inside the sub-block.
template <class L>
FLASH_KDA_DEVICE void solve_U(float* sm, int tid, int warp, Lane l) {
  float* Vx = sm + L::kVx;
  const float* A = sm + L::kAkk;
  const float* beta = sm + L::kBeta;
  for (int I = 0; I < L::NB; ++I) {
    const int base = I * L::BS;
    if (I > 0) {
      for (int nt = warp; nt < L::VS / 8; nt += L::kWarps) {
        float acc[4];
        zero(acc);
        for (int kb = 0; kb < base; kb += 8) {
          uint32_t a[4], b[2];
          load_a(a, A + base * L::LDA + kb, L::LDA, l);
          load_b_t(b, Vx + kb * L::LDV + nt * 8, L::LDV, l);
          mma(acc, a, b);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = base + l.g + (e >= 2 ? 8 : 0), v = nt * 8 + 2 * l.t + (e & 1);
          Vx[i * L::LDV + v] -= acc[e];
        }
      }
      port::block_sync();
    }
    if (tid < L::VS) portable::substitute_column<L::BS>(Vx, L::LDV, tid, A, L::LDA, beta, base);
    port::block_sync();
  }
}

// out <- tile.o + A_qk U over the causal columns, for the real tokens of the chunk.
template <class L>
FLASH_KDA_DEVICE void write_output(const KdaParams& p, const portable::Task& task, int64_t t0,
                                   int len, const float* sm, Lane l, OutTile<L>& tile) {
  const float* A = sm + L::kAqk + tile.wm * 16 * L::LDA;
  const float* U = sm + L::kVx + tile.col0;
  for (int kb = 0; kb < (tile.wm + 1) * 16; kb += 8) {
    uint32_t a[4];
    load_a(a, A + kb, L::LDA, l);
#pragma unroll
    for (int n = 0; n < L::OT; ++n) {
      uint32_t b[2];
      load_b_t(b, U + kb * L::LDV + n * 8, L::LDV, l);
      mma(tile.o[n], a, b);
    }
  }
  port::input_t* out = static_cast<port::input_t*>(p.out);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = tile.wm * 16 + l.g + 8 * half;
    if (i >= len) continue;
    const int64_t base = token_offset(p.out_strides, task.r, t0 + i, task.h) + task.v0 + tile.col0;
#pragma unroll
    for (int n = 0; n < L::OT; ++n) {
      const int v = n * 8 + 2 * l.t;
      out[base + v] = port::from_float<port::input_t>(tile.o[n][2 * half]);
      out[base + v + 1] = port::from_float<port::input_t>(tile.o[n][2 * half + 1]);
    }
  }
}

// S <- S diag(e^{γ_last}) + Uᵀ (K e^{γ_last - γ}). Warps tile [VS, D] as 2 x UN; the accumulators
// start from the fp32 state, so only the increments meet TF32 rounding.
template <class L>
FLASH_KDA_DEVICE void update_state(float* sm, int warp, Lane l) {
  const int m0 = (warp % 2) * (L::VS / 2), n0 = (warp / 2) * (L::D / L::UN);
  float* S = sm + L::kS;
  const float* U = sm + L::kVx;
  const float* Kl = sm + L::kKe;
  const float* eg = sm + L::kEg;
  float acc[L::SMT][L::SNT][4];
#pragma unroll
  for (int mt = 0; mt < L::SMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < L::SNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = m0 + mt * 16 + l.g + (e >= 2 ? 8 : 0), c = n0 + nt * 8 + 2 * l.t + (e & 1);
        acc[mt][nt][e] = S[v * L::LD + c] * eg[c];
      }
#pragma unroll 2
  for (int kb = 0; kb < L::C; kb += 8) {
    uint32_t b[L::SNT][2];
#pragma unroll
    for (int nt = 0; nt < L::SNT; ++nt) load_b_t(b[nt], Kl + kb * L::LD + n0 + nt * 8, L::LD, l);
#pragma unroll
    for (int mt = 0; mt < L::SMT; ++mt) {
      uint32_t a[4];
      load_a_t(a, U + kb * L::LDV + m0 + mt * 16, L::LDV, l);
#pragma unroll
      for (int nt = 0; nt < L::SNT; ++nt) mma(acc[mt][nt], a, b[nt]);
    }
  }
#pragma unroll
  for (int mt = 0; mt < L::SMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < L::SNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = m0 + mt * 16 + l.g + (e >= 2 ? 8 : 0), c = n0 + nt * 8 + 2 * l.t + (e & 1);
        S[v * L::LD + c] = acc[mt][nt][e];
      }
}

// ---------------------------------------------------------------------------------------------
// The whole block: every chunk of its sequence, then the final state.
// ---------------------------------------------------------------------------------------------
// k_side_A's hook in compute_A's phase: nothing (the fused body's).
struct NoWorkBesideA {
  FLASH_KDA_DEVICE void operator()(int /*flags*/, float /*aqk_max*/) const {}
};

// The K-side phases of a chunk up to A (loads, norms, gate, decays, A_kk, A_qk), shared by
// run_block and the two-kernel form's preparation (kda_split_prep.cuh); ends with every thread
// past a barrier. Call it with every thread past a barrier since the arrays' last use.
// beside(flags, aqk_max) runs in every thread after its compute_A units, before the barrier that
// ends their phase (aqk_max: compute_A's return): work for the warps that have no unit. It may read
// every array but the A_kk and A_qk tiles that units write (a flagged sub-block's diagonal tiles,
// compute_diag_fallback's, are done), Er's second row and Eg (split_scan_absolute's).
template <class L, bool kAqkTf32 = true, class Beside = NoWorkBesideA>
FLASH_KDA_DEVICE void k_side_A(const KdaParams& p, const portable::Task& t, int64_t t0, int len, VecOk vec,
                               float* sm, int tid, int warp, Lane l, Beside&& beside = Beside{}) {
  int* flags_sm = reinterpret_cast<int*>(sm + L::kFlags);
  if (tid == 0) *flags_sm = 0;
  QkRows<L> keep;  // (L::kKeepQK: q and k, held across the scan; otherwise unused)
  if (vec.all() && vec.off32) {  // uniform across the block
    load_chunk<L, true, int>(p, t, t0, len, vec, sm, tid, keep);
  } else if (vec.all()) {
    load_chunk<L, true>(p, t, t0, len, vec, sm, tid, keep);
  } else {
    load_chunk<L, false>(p, t, t0, len, vec, sm, tid, keep);
  }
  port::block_sync();
  cumsum_and_boundaries<L>(sm, tid);
  port::block_sync();
  const int flags = *flags_sm;  // uniform across the block
  if (flags != 0) {
    if constexpr (L::kKeepQK) {
      store_qk_rows<L>(sm, tid, keep);
      port::block_sync();
    }
    compute_diag_fallback<L>(sm, tid, flags);  // reads raw k, q, γ: before scale_for_A
    port::block_sync();
  }
  if constexpr (L::kKeepQK) {
    scale_for_A<L>(sm, tid, keep);
  } else {
    scale_for_A<L>(sm, tid);
  }
  port::block_sync();
  const float aqk_max = compute_A<L, kAqkTf32>(sm, warp, l, flags);
  if constexpr (L::kCumsumSplit) split_scan_absolute<L>(sm, tid);
  beside(flags, aqk_max);
  port::block_sync();
}

template <class L>
FLASH_KDA_DEVICE void run_block(const KdaParams& p, float* sm, int block, int tid) {
  const portable::Task t = portable::block_task<L>(p, block);
  const int warp = tid / 32;
  const Lane l{(tid % 32) / 4, tid % 4};
  portable::load_state<L>(p, t, sm, tid);
  const VecOk vec = vec_ok<L>(p);

  for (int64_t t0 = 0; t0 < t.r.len; t0 += L::C) {
    const int len = static_cast<int>(t.r.len - t0 < L::C ? t.r.len - t0 : L::C);
    port::block_sync();  // previous chunk done with every array; S visible
    k_side_A<L>(p, t, t0, len, vec, sm, tid, warp, l);
    scale_for_state<L>(sm, tid);
    port::block_sync();
    OutTile<L> tile = out_tile<L>(warp);
    project_state<L>(sm, l, tile);
    port::block_sync();
    solve_U<L>(sm, tid, warp, l);  // ends with a barrier
    write_output<L>(p, t, t0, len, sm, l, tile);
    update_state<L>(sm, warp, l);
  }
  port::block_sync();
  portable::store_state<L>(p, t, sm, tid);
}

}  // namespace tc
}  // namespace flash_kda
