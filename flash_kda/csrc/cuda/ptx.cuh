// ptx.cuh: every inline-PTX instruction the tensor-core bodies use, and nothing else.
//
// kda_chunk_tc.cuh and kda_chunk_split.cuh reach the hardware only through these wrappers, so the
// bodies themselves are plain C++ over port.cuh. That is what lets tests/simt run them on the CPU:
// its harness defines this header's guard and supplies its own versions of these functions (an
// emulated warp for mma, memcpy for cp.async, ...). Keep the two in step: a new instruction goes
// here and into tests/simt/simt.h.
//
// (A classic include guard rather than #pragma once, for that substitution.)
#ifndef FLASH_KDA_PTX_CUH_
#define FLASH_KDA_PTX_CUH_

#include <stdint.h>

#include "../port.cuh"

namespace flash_kda {
namespace tc {

// fp32 -> TF32, rounded to nearest (ties away from zero).
FLASH_KDA_DEVICE float round_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

// 2^x on the special-function unit (max relative error ~2^-22; results below 2^-126 flush to 0,
// harmless for decay factors). The portable body keeps exp2f for MUSA's sake.
FLASH_KDA_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A 16-byte store to global memory. (st4 of a float4 assembled from scalars was split by the
// compiler into four 4-byte stores; this one cannot be.)
FLASH_KDA_DEVICE void st4_global(float* p, float4 x) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w)
               : "memory");
}

// D += A B, m16n8k8, TF32 operands (the top 19 bits of each register), fp32 accumulators.
// Fragments: kda_chunk_tc.cuh, before Lane.
FLASH_KDA_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix (sm_75+): N 8 x 8 matrices of 16-bit elements from shared memory, one register per
// matrix and lane. Lane 8m + i gives the shared address of row i of matrix m (16-byte aligned;
// lanes past 8N give none that is read); lane (g, t) = (lane / 4, lane % 4) receives 32-bit word
// t of row g of matrix m in r[m]. A row of 16 bytes is also four fp32 values, so one ldmatrix.x4
// is a whole TF32 A fragment and one .x2 a B fragment (kda_chunk_tc.cuh, frag_a_row / frag_b_row):
// one instruction where four or two shared loads were. (A "memory" clobber: the compiler must not
// move the read across a store or barrier it does not see as one.)
FLASH_KDA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
FLASH_KDA_DEVICE void ldmatrix_x2(uint32_t (&r)[2], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr) : "memory");
}

// m16n8k16, fp16 operands, fp32 accumulators (PTX ISA fragments; g = lane / 4, t = lane % 4):
// A (16 x 16): a0 (g, 2t..2t+1), a1 (g+8, 2t..2t+1), a2 (g, 2t+8..2t+9), a3 (g+8, 2t+8..2t+9);
// B (16 x 8, k x n): b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g); C as for m16n8k8.
FLASH_KDA_DEVICE void mma16(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}

// cp.async (sm_80): 16-byte global -> shared copies that complete in commit-group order.
// (dst: a shared-space byte address, so that a caller can add constant offsets to one base.)
FLASH_KDA_DEVICE void cp_async16(unsigned dst, const float* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
FLASH_KDA_DEVICE unsigned shared_address(const float* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
FLASH_KDA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's groups are pending.
template <int N>
FLASH_KDA_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Barrier `kId` (1..15; 0 is __syncthreads) for kThreads threads, a multiple of 32.
template <int kId, int kThreads>
FLASH_KDA_DEVICE void named_barrier() {
  asm volatile("bar.sync %0, %1;" ::"n"(kId), "n"(kThreads) : "memory");
}

}  // namespace tc
}  // namespace flash_kda

#endif  // FLASH_KDA_PTX_CUH_
