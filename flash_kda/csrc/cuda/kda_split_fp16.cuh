// kda_split_fp16.cuh: the two-kernel form's fp16 operands (kda_chunk_split.cuh): power-of-two
// scales, packing into m16n8k16 fragments, core-matrix order, and the maxima that pick the scales.
// Shared by the preparation, which writes the records' fp16 arrays, and the recurrence, which
// reads them and packs its state the same way.
#pragma once

#include "../port.cuh"
#include "kda_chunk_tc.cuh"

namespace flash_kda {
namespace tc {

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

// The two accumulator rows a lane holds (g and g + 8) over NT tiles, times f0 and f1 respectively.
template <int NT>
FLASH_KDA_DEVICE void scale_rows(float (&x)[NT][4], float f0, float f1) {
#pragma unroll
  for (int it = 0; it < NT; ++it) {
    x[it][0] *= f0;
    x[it][1] *= f0;
    x[it][2] *= f1;
    x[it][3] *= f1;
  }
}

}  // namespace tc
}  // namespace flash_kda
