// kda_cpu_simd.h: the small SIMD toolbox of the CPU kernel: an 8-lane float vector, a vectorised
// exp, and one register-blocked matrix-multiply routine that every GEMM-like step of the chunked
// algorithm goes through.
//
// The vector type is a GCC/Clang vector extension rather than raw AVX intrinsics, so the same source
// builds for any -march (the compiler lowers it to AVX on x86-64-v3, to SSE pairs on baseline
// x86-64, to NEON on aarch64). The only intrinsic is the fused multiply-add, used where the target
// has one, because ISO C++ modes may forbid the compiler from contracting a*b+c on its own.
#pragma once

#include <stdint.h>

#if defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define FLASH_KDA_CPU_X86_FMA 1
#endif

// Built without AVX, GCC notes that passing 32-byte vectors by value has a different ABI there. Every
// function here is inline and used only inside the CPU kernel's translation unit, so no call ever
// crosses an ABI boundary and the note is noise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace flash_kda {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
// The same vector as it lies in memory: any alignment, and allowed to alias plain floats.
typedef float v8f_mem __attribute__((vector_size(32), aligned(4), __may_alias__));

constexpr int kLanes = 8;

inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_mem*>(p); }
inline void store8(float* p, v8f x) { *reinterpret_cast<v8f_mem*>(p) = x; }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// a * b + c, rounded once where the target has an FMA unit.
inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(FLASH_KDA_CPU_X86_FMA)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

inline float hsum8(v8f x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// exp(x) lane-wise, within about 1 ulp in the normal range. exp(x) = 2^n · exp(r) with
// n = round(x / ln 2) and |r| <= ln2 / 2 (ln 2 split in two parts so that r is exact), and
// exp(r) = 1 + r + r²·p(r) with p a degree-5 polynomial fitted for this file (weighted least squares
// on [-ln2/2, ln2/2], max relative error 1.2e-7). Results that would be subnormal are flushed to 0,
// results past ~2e38 become +inf, -inf gives 0 and NaN stays NaN (every comparison with NaN is false,
// so NaN flows through the arithmetic untouched).
inline v8f exp8(v8f x) {
  typedef uint32_t v8u __attribute__((vector_size(32)));
  const v8f lo = splat8(-87.33654f);  // exp(lo) = 2^-126, the smallest normal float
  const v8f hi = splat8(88.3f);       // keeps n <= 127
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Adding 1.5 * 2^23 rounds to the nearest integer, which then sits in the low mantissa bits.
  const v8f magic = splat8(12582912.0f);
  const v8f t = fma8(xc, splat8(1.44269504088896341f), magic);
  const v8f n = t - magic;
  v8f r = fma8(n, splat8(-0.693359375f), xc);
  r = fma8(n, splat8(2.12194440e-4f), r);
  v8f p = splat8(1.984284900e-04f);
  p = fma8(p, r, splat8(1.395133790e-03f));
  p = fma8(p, r, splat8(8.333411999e-03f));
  p = fma8(p, r, splat8(4.166617990e-02f));
  p = fma8(p, r, splat8(1.666666567e-01f));
  p = fma8(p, r, splat8(5.000000000e-01f));
  const v8f er = fma8(p, r * r, r + splat8(1.0f));
  // 2^n built directly in the exponent field (the casts reinterpret bits; unsigned so that NaN lanes
  // wrap harmlessly).
  const v8u e = (((v8u)t - (v8u)magic) + 127u) << 23;
  v8f y = er * (v8f)e;
  y = x < lo ? splat8(0.0f) : y;
  y = x > hi ? splat8(__builtin_inff()) : y;
  return y;
}

inline v8f sigmoid8(v8f x) { return splat8(1.0f) / (splat8(1.0f) + exp8(-x)); }

// ---------------------------------------------------------------------------------------------
// Small dense GEMM:  C[M, N] (+)= A[M, kd] · B[kd, N]
//   A is read through two strides (element (r, j) at A[r * a_rs + j * a_cs]), so a transposed A costs
//   nothing; B and C are row-major with N contiguous, N a multiple of 8.
// The register tile is MR rows x 8·NV columns of accumulators; per step of the inner dimension it
// loads NV vectors of B and broadcasts MR scalars of A, i.e. MR·NV FMAs per MR + NV loads. 6 x 16
// (12 accumulators) keeps the FMA units busy on AVX2's 16 registers.
// ---------------------------------------------------------------------------------------------
template <int MR, int NV, bool ACC>
inline void gemm_tile(int kd, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                      int64_t ldb, float* C, int64_t ldc) {
  v8f acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = ACC ? load8(C + r * ldc + c * kLanes) : splat8(0.0f);
  for (int j = 0; j < kd; ++j) {
    v8f b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = load8(B + j * ldb + c * kLanes);
    const float* a = A + j * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const v8f ar = splat8(a[r * a_rs]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = fma8(ar, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) store8(C + r * ldc + c * kLanes, acc[r][c]);
}

// All row tiles of one column panel of NV vectors. The rows are cut into tiles of near-equal height
// (at most 6), e.g. 32 = 6+6+5+5+5+5 rather than 6·5+2, since a thin tile wastes the loads of B.
template <int NV, bool ACC>
inline void gemm_panel(int M, int kd, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                       int64_t ldb, float* C, int64_t ldc) {
  constexpr int kMaxRows = 6;
  const int tiles = (M + kMaxRows - 1) / kMaxRows;
  const int base = M / tiles, taller = M % tiles;  // `taller` tiles get base + 1 rows
  int r = 0;
  for (int tile = 0; tile < tiles; ++tile) {
    const int h = base + (tile < taller ? 1 : 0);
    const float* At = A + r * a_rs;
    float* Ct = C + r * ldc;
    switch (h) {
      case 6: gemm_tile<6, NV, ACC>(kd, At, a_rs, a_cs, B, ldb, Ct, ldc); break;
      case 5: gemm_tile<5, NV, ACC>(kd, At, a_rs, a_cs, B, ldb, Ct, ldc); break;
      case 4: gemm_tile<4, NV, ACC>(kd, At, a_rs, a_cs, B, ldb, Ct, ldc); break;
      case 3: gemm_tile<3, NV, ACC>(kd, At, a_rs, a_cs, B, ldb, Ct, ldc); break;
      case 2: gemm_tile<2, NV, ACC>(kd, At, a_rs, a_cs, B, ldb, Ct, ldc); break;
      default: gemm_tile<1, NV, ACC>(kd, At, a_rs, a_cs, B, ldb, Ct, ldc); break;
    }
    r += h;
  }
}

// C (+)= A · B over the whole of C; ACC=false overwrites C instead of accumulating into it.
// Column panels are the outer loop so that one kd x 16 panel of B stays in L1 while every row tile
// streams past it.
template <bool ACC>
inline void gemm(int M, int N, int kd, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  if (M <= 0 || (ACC && kd <= 0)) return;
  int c = 0;
  for (; c + 2 * kLanes <= N; c += 2 * kLanes)
    gemm_panel<2, ACC>(M, kd, A, a_rs, a_cs, B + c, ldb, C + c, ldc);
  for (; c < N; c += kLanes) gemm_panel<1, ACC>(M, kd, A, a_rs, a_cs, B + c, ldb, C + c, ldc);
}

}  // namespace cpu
}  // namespace flash_kda
