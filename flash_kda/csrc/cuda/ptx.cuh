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

// fp32 -> TF32 (the fp32 bits with the low 13 cleared), rounded to nearest. sm_90 converts in
// hardware with ties to even (cvt.rn.tf32.f32, PTX 7.8: one F2FP instruction); before it only ties
// away exists (cvt.rna.tf32.f32, which ptxas emulates in three: a compare, an add, a mask). The two
// differ only on exact ties; tools/tf32_rounding_probe.cu checks both against their definitions.
FLASH_KDA_DEVICE float round_tf32(float x) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#else
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#endif
  return __uint_as_float(r);
}

// 2^x on the special-function unit (max relative error ~2^-22; results below 2^-126 flush to 0,
// harmless for decay factors). The portable body keeps exp2f for MUSA's sake.
FLASH_KDA_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The largest of v over the warp's 32 lanes, in every lane; every lane must call it. sm_80 and later
// have an instruction for it (redux.sync.max.u32: one REDUX where a butterfly takes five shuffles and
// five maxima); before, the butterfly.
FLASH_KDA_DEVICE uint32_t warp_max_u32(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    const uint32_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
#endif
}

// 16- and 8-byte stores to global memory. Plain vector stores of values assembled from scalars
// (a uint4 of packed halves, a float2 of accumulators) came out of the compiler as four or two
// 4-byte stores, already in the PTX: each lane's 4 bytes then sit in their own 32-byte sector, so a
// warp's store instruction moved up to 4x the sectors it needs (Nsight Compute on the preparation,
// docs/performance.md v17; 2c14c6c had fixed it once, and the fp16 record brought it back). Inline
// PTX cannot be split. The address must be a global one, aligned to the store's size.
FLASH_KDA_DEVICE void st16_global(void* p, uint4 x) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w)
               : "memory");
}
FLASH_KDA_DEVICE void st8_global(float* p, float2 x) {
  asm volatile("st.global.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x.x), "f"(x.y) : "memory");
}

// Plain 8-byte accesses of two floats at an address the caller has checked to be 8-byte aligned
// (the recurrence's fp32 states, fp32_state_pairs). Plain C++ (ld/st.v2.f32 in the PTX), so the
// compiler may still order them; the emulator's versions check the alignment (tests/simt/simt.h).
FLASH_KDA_DEVICE float2 ld8_aligned(const float* p) { return *reinterpret_cast<const float2*>(p); }
FLASH_KDA_DEVICE void st8_aligned(float* p, float2 x) { *reinterpret_cast<float2*>(p) = x; }

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
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
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

// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic-serialization
// attribute (kda_cuda.cu, launch_layout) may start while the kernel before it on the stream still
// runs: griddep_wait() then blocks until that kernel has completed and its writes are visible.
// griddep_launch_dependents() lets such a dependent kernel start once every block of this one has
// called it (or exited). Both do nothing without the attribute, and compile to nothing before sm_90.
FLASH_KDA_DEVICE void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
FLASH_KDA_DEVICE void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The cluster's split barrier (sm_90+): every thread of every block of the cluster arrives, then
// waits for all the others' arrivals. The recurrence uses it only to keep the blocks of one head's
// V slices in step (kda_split_recurrence.cuh, recurrence_block), so the arrival is relaxed: it orders no
// memory. A grid launched without cluster dimensions runs as clusters of one block, where the pair
// is a block-wide barrier. Nothing before sm_90.
FLASH_KDA_DEVICE void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
FLASH_KDA_DEVICE void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}
// Waits until at most N of this thread's groups are pending.
template <int N>
FLASH_KDA_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- wgmma (sm_90a only: FLASH_KDA_HAS_WGMMA) --------------------------------------------------
// A warpgroup (4 consecutive warps, 128 threads) multiplies a 64 x 16 fp16 A, from registers, by a
// 16 x N fp16 B in shared memory, into 64 x N fp32 accumulators, asynchronously. Warp w of the group
// holds rows 16w..16w+15 of A and D in exactly the m16n8k16 fragments of mma16 (d[j] is n-tile j),
// so a warp's mma16 accumulators and A fragments serve as they are.
//
// B is K-major in "core matrices" without swizzle: element (n, k) at byte
//     (n / 8) * SBO + (k / 8) * LBO + (n % 8) * 16 + (k % 8) * 2
// from the descriptor's start address: 8 x 8 blocks of 128 contiguous bytes. Our arrays put the
// two k-halves of a 16-wide k-block next to each other (LBO = 128) and the 8-row groups one after
// another (SBO = 16 * the row length in elements): see core_offset in kda_split_fp16.cuh.
//
// Protocol (PTX ISA, wgmma): wgmma_fence() before the first wgmma that reads registers written by
// other instructions; wgmma_commit() closes a group; wgmma_wait<N>() returns when at most N groups
// are pending; only then may the accumulators be read (wgmma_fence_operand keeps the compiler from
// moving those reads above the wait) or the A registers and B's shared memory be changed. Shared
// memory written by ordinary stores or cp.async must be made visible to the async proxy with
// fence_proxy_async() before a barrier that precedes the wgmma.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_KDA_HAS_WGMMA 1
#else
#define FLASH_KDA_HAS_WGMMA 0
#endif
// Whether this compilation pass can issue wgmma (device code may branch on it; host code and
// types must not, the host pass sees 0).
constexpr bool kArchHasWgmma = FLASH_KDA_HAS_WGMMA;

// The shared-memory descriptor: start address, LBO, SBO (each in 16-byte units, 14 bits), no swizzle.
FLASH_KDA_DEVICE uint64_t wgmma_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((addr >> 4) & 0x3fffu) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32);
}

// The descriptor of the operand `bytes` further on in shared memory (a multiple of 16; the start
// address field cannot carry: shared addresses stay below 2^18). One descriptor per array and
// constant steps from it cost an add per product instead of forming each address anew.
FLASH_KDA_DEVICE uint64_t wgmma_desc_at(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

FLASH_KDA_DEVICE void wgmma_fence() {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
FLASH_KDA_DEVICE void wgmma_commit() {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int N>
FLASH_KDA_DEVICE void wgmma_wait() {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}
// Pins registers at this point of the instruction stream: called on accumulators and A fragments
// before wgmma_fence (so that the instructions producing them are not moved below the fence, where
// ptxas would insert a fence and a wait of its own) and on accumulators after wgmma_wait.
template <int NT>
FLASH_KDA_DEVICE void wgmma_fence_operand(float (&d)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
template <int NT>
FLASH_KDA_DEVICE void wgmma_fence_operand(uint32_t (&a)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}
// Makes this thread's ordinary shared-memory writes (st.shared, cp.async) visible to wgmma's reads.
FLASH_KDA_DEVICE void fence_proxy_async() {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// ---- Bulk copies and their barriers (sm_90; used only where FLASH_KDA_HAS_WGMMA) -------------------
// cp.async.bulk moves a contiguous run of global memory (16-byte aligned, a multiple of 16 bytes)
// into shared memory as one instruction of one thread, through the async proxy, and reports the bytes
// it wrote to an mbarrier (an 8-byte object in shared memory). An mbarrier phase completes once its
// expected arrivals have arrived and the bytes announced by mbar_arrive_expect_tx have all landed;
// threads wait for a phase by its parity (phase k has parity k % 2). Data that a wait has seen land
// is visible to the waiting thread and to its wgmma without fence_proxy_async (both read it as it
// was written). The recurrence's stages use one barrier each (kda_split_recurrence.cuh, recurrence_block).
FLASH_KDA_DEVICE void mbar_init(unsigned bar, unsigned arrivals) {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
#endif
}
// Makes mbar_init's stores visible to the async proxy (the copies' completions); a barrier after it
// makes them visible to the block's other threads.
FLASH_KDA_DEVICE void fence_mbar_init() {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// One arrival on `bar`, announcing `bytes` more to land in the current phase.
FLASH_KDA_DEVICE void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// dst: a shared-space byte address of this block (valid as a shared::cluster address of itself).
FLASH_KDA_DEVICE void bulk_copy_g2s(unsigned dst, const float* src, unsigned bytes, unsigned bar) {
#if FLASH_KDA_HAS_WGMMA
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}
// Returns once the phase of `bar` with this parity has completed.
FLASH_KDA_DEVICE void mbar_wait(unsigned bar, unsigned parity) {
#if FLASH_KDA_HAS_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "again:\n"  // (a label inside braces is local to them: every inlined copy has its own)
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra again;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
#endif
}

// D (64 x N) += A (64 x 16, registers) B (16 x N, shared memory at desc); N = 32, 64 or 128.
// kAccumulate = false: D = A B, D's old values neither read nor needed (wgmma's scale-d = 0), so
// a product's first k-block needs no zeroed accumulators (48 register moves a chunk in the
// recurrence, docs/performance.md v26).
// The N / 2 accumulators are the asm's first operands (%0 ..), then A (4 registers) and desc:
// FLASH_KDA_WGMMA_ARGS lists them, 16 accumulators (four n-tiles) per FLASH_KDA_WGMMA_D16.
template <int N, bool kAccumulate = true>
FLASH_KDA_DEVICE void wgmma_f16(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc);
#define FLASH_KDA_WGMMA_D4(c, j) c(d[j][0]), c(d[j][1]), c(d[j][2]), c(d[j][3])
#define FLASH_KDA_WGMMA_D16(c, j) \
  FLASH_KDA_WGMMA_D4(c, j), FLASH_KDA_WGMMA_D4(c, j + 1), FLASH_KDA_WGMMA_D4(c, j + 2), FLASH_KDA_WGMMA_D4(c, j + 3)
#define FLASH_KDA_WGMMA_IN : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
#if FLASH_KDA_HAS_WGMMA
#define FLASH_KDA_WGMMA(shape, scale_d, regs, tail, ...) \
  asm volatile("wgmma.mma_async.sync.aligned." shape ".f32.f16.f16 " regs ", " tail ", " scale_d ", 1, 1, 0;" \
               : __VA_ARGS__ FLASH_KDA_WGMMA_IN)
#else
#define FLASH_KDA_WGMMA(shape, scale_d, regs, tail, ...) __trap()
#endif
#define FLASH_KDA_WGMMA_R16 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define FLASH_KDA_WGMMA_R32 \
  FLASH_KDA_WGMMA_R16 ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define FLASH_KDA_WGMMA_R64                                                                         \
  FLASH_KDA_WGMMA_R32 ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47"          \
                      ",%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define FLASH_KDA_ACC(x) "+f"(x)
#define FLASH_KDA_NEW(x) "=f"(x)
// (per N, the accumulators as +f with scale-d 1, or as =f with scale-d 0)
#define FLASH_KDA_WGMMA_N32(c, sd) \
  FLASH_KDA_WGMMA("m64n32k16", sd, "{" FLASH_KDA_WGMMA_R16 "}", "{%16,%17,%18,%19}, %20", FLASH_KDA_WGMMA_D16(c, 0))
#define FLASH_KDA_WGMMA_N64(c, sd)                                                                 \
  FLASH_KDA_WGMMA("m64n64k16", sd, "{" FLASH_KDA_WGMMA_R32 "}", "{%32,%33,%34,%35}, %36", FLASH_KDA_WGMMA_D16(c, 0), \
                  FLASH_KDA_WGMMA_D16(c, 4))
#define FLASH_KDA_WGMMA_N128(c, sd)                                                                 \
  FLASH_KDA_WGMMA("m64n128k16", sd, "{" FLASH_KDA_WGMMA_R64 "}", "{%64,%65,%66,%67}, %68",          \
                  FLASH_KDA_WGMMA_D16(c, 0), FLASH_KDA_WGMMA_D16(c, 4), FLASH_KDA_WGMMA_D16(c, 8), \
                  FLASH_KDA_WGMMA_D16(c, 12))
template <int N, bool kAccumulate>
FLASH_KDA_DEVICE void wgmma_f16(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(N == 32 || N == 64 || N == 128, "m64nNk16 with N = 32, 64 or 128");
  if constexpr (N == 32 && kAccumulate) {
    FLASH_KDA_WGMMA_N32(FLASH_KDA_ACC, "1");
  } else if constexpr (N == 32) {
    FLASH_KDA_WGMMA_N32(FLASH_KDA_NEW, "0");
  } else if constexpr (N == 64 && kAccumulate) {
    FLASH_KDA_WGMMA_N64(FLASH_KDA_ACC, "1");
  } else if constexpr (N == 64) {
    FLASH_KDA_WGMMA_N64(FLASH_KDA_NEW, "0");
  } else if constexpr (kAccumulate) {
    FLASH_KDA_WGMMA_N128(FLASH_KDA_ACC, "1");
  } else {
    FLASH_KDA_WGMMA_N128(FLASH_KDA_NEW, "0");
  }
}
#undef FLASH_KDA_WGMMA_N32
#undef FLASH_KDA_WGMMA_N64
#undef FLASH_KDA_WGMMA_N128
#undef FLASH_KDA_ACC
#undef FLASH_KDA_NEW
#undef FLASH_KDA_WGMMA
#undef FLASH_KDA_WGMMA_IN
#undef FLASH_KDA_WGMMA_D16
#undef FLASH_KDA_WGMMA_D4
#undef FLASH_KDA_WGMMA_R16
#undef FLASH_KDA_WGMMA_R32
#undef FLASH_KDA_WGMMA_R64

}  // namespace tc
}  // namespace flash_kda

#endif  // FLASH_KDA_PTX_CUH_
