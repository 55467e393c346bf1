// simt.h: runs the CUDA tensor-core bodies (kda_chunk_tc.cuh, kda_chunk_split.cuh) on the CPU.
//
// What it is for: checking the kernels' logic — indexing, fragment layouts, record offsets,
// barriers, the order of phases — on a machine without a GPU (CI, or a session with no device).
// What it is not: a model of the hardware's timing, memory ordering or floating-point details
// beyond what is written below. Threads switch only at barriers and warp operations; the order in
// which they are resumed can be changed (FLASH_KDA_SIM_ORDER), and a result that changes with it
// reveals a race: two threads of a block (or lanes of a warp) that touch the same shared memory
// between two barriers, one of them writing. Memory ordering and global-memory races between
// blocks stay for compute-sanitizer on a GPU.
//
// How: every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it
// waits at a barrier — __syncthreads or the implicit warp barrier of a shuffle or
// an mma — and the scheduler resumes the others in turn. Warp operations exchange values through a
// per-warp buffer between two warp barriers. Shared memory is a host buffer per block; cp.async is
// a copy at issue.
//
// This header stands in for port.cuh and ptx.cuh (it defines their include guards) and for the
// CUDA built-ins the bodies use; port.cuh's device helpers (port_device.cuh) are the real ones.
// Include it before any kernel header.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define FLASH_KDA_PORT_CUH_ 1
#define FLASH_KDA_PTX_CUH_ 1
#define FLASH_KDA_DEVICE inline
#define FLASH_KDA_DEVICE_NOINLINE

// ---------------------------------------------------------------------------------------------
// CUDA vector and 16-bit types, and the built-in functions the bodies call
// ---------------------------------------------------------------------------------------------
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }

inline uint32_t __float_as_uint(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; memcpy(&x, &u, 4); return x; }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

struct __half { uint16_t x; };
struct __half2 { __half x, y; };  // x: the low 16 bits
struct __nv_bfloat16 { uint16_t x; };
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even, subnormals and inf as fp16
  __half r; memcpy(&r.x, &h, 2); return r;
}
inline float __half2float(__half h) { _Float16 f; memcpy(&f, &h.x, 2); return static_cast<float>(f); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<uint32_t>(b.x) << 16); }

namespace simt {

// ---------------------------------------------------------------------------------------------
// Fibers, barriers, warps
// ---------------------------------------------------------------------------------------------
struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Warp {
  Barrier bar;
  uint32_t slot[32][16];  // what each lane deposits for a warp operation
};

struct Block {
  int threads = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  ucontext_t scheduler;
  int current = 0;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  Barrier all;
  std::vector<Warp> warps;
  std::vector<Barrier> warpgroups;  // wgmma's implicit barriers, one per 4 warps
  struct WgmmaOp {
    uint32_t a[4];
    uint64_t desc;
    float* d;  // the issuing thread's accumulators, written when the op completes
    int n;
    bool accumulate;  // false: D = A B (wgmma's scale-d = 0), D's old values ignored
  };
  std::vector<std::vector<WgmmaOp>> wgmma_pending;  // per thread, oldest first
  std::vector<std::vector<int>> wgmma_groups;       // per thread: committed group sizes, oldest first
  // cp.async bookkeeping, for wgmma's reads of shared memory (which go through the async proxy):
  // per thread, the 16-byte slots of its open group, of its committed groups, and of its completed
  // copies not yet followed by fence_proxy_async; per block, each such slot's state.
  struct Copies {
    std::vector<uint32_t> open;
    std::vector<std::vector<uint32_t>> committed;  // oldest first
    std::vector<uint32_t> unfenced;
  };
  std::vector<Copies> copies;
  enum : char { kInFlight = 1, kUnfenced = 2 };
  std::map<uint32_t, char> slot_state;
  // mbarriers (by shared address) and bulk copies: a phase completes once `pending` arrivals and the
  // announced bytes (tx) have all come; phase counts the completed ones. A bulk copy's 16-byte slots
  // remember the barrier and the phase that was open at issue; a thread may let wgmma read them only
  // once its own wait on that barrier has seen that phase complete (seen: per thread, per barrier).
  struct Mbar {
    int expected = 0, pending = 0;
    int64_t tx = 0;
    uint64_t phase = 0;
  };
  std::map<uint32_t, Mbar> mbars;
  std::map<uint32_t, std::pair<uint32_t, uint64_t>> bulk_slots;
  std::vector<std::map<uint32_t, uint64_t>> mbar_seen;
  std::function<void(int)> body;  // body(tid)
  uint64_t progress = 0;          // barriers opened + threads finished (deadlock detection)
  std::string error;              // the first exception a thread threw (the block stops there)
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline int tid() { return block()->current; }
inline int lane() { return tid() % 32; }
inline Warp& warp() { return block()->warps[tid() / 32]; }

inline void yield() {
  Block* b = block();
  swapcontext(&b->ctx[b->current], &b->scheduler);
}

inline void wait(Barrier& bar) {
  const uint64_t mine = bar.generation;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
    ++block()->progress;
    return;
  }
  while (bar.generation == mine) yield();
}

// (An exception must not unwind out of a fiber's stack: it is kept, and run_block throws it once
// the thread has switched back; the block's other threads are abandoned.)
inline void fiber_entry() {
  Block* b = block();
  const int t = b->current;
  try {
    b->body(t);
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  b->done[t] = 1;
  ++b->progress;
}

// The order in which the scheduler resumes the fibers on each pass, from FLASH_KDA_SIM_ORDER:
// forward (default), reverse, or shuffle (a new pseudo-random order on every pass, seeded by
// FLASH_KDA_SIM_SEED). Results that depend on it come from a race: threads that read what
// others write between the same two barriers (tests compare the orders bit for bit).
enum class Order { kForward, kReverse, kShuffle };
struct Schedule {
  Order order = Order::kForward;
  uint64_t state = 1;
};
inline Schedule& schedule() {
  static Schedule s;
  return s;
}
inline void read_schedule() {
  const char* o = std::getenv("FLASH_KDA_SIM_ORDER");
  const std::string v = o != nullptr ? o : "";
  Schedule& s = schedule();
  s.order = v == "reverse" ? Order::kReverse : v == "shuffle" ? Order::kShuffle : Order::kForward;
  if (v != "" && v != "forward" && v != "reverse" && v != "shuffle") {
    throw std::runtime_error("simt: FLASH_KDA_SIM_ORDER must be forward, reverse or shuffle");
  }
  const char* seed = std::getenv("FLASH_KDA_SIM_SEED");
  s.state = (seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0) * 2 + 1;
}
inline void next_order(std::vector<int>& order) {
  Schedule& s = schedule();
  const int n = static_cast<int>(order.size());
  if (s.order == Order::kForward) {
    for (int t = 0; t < n; ++t) order[t] = t;
  } else if (s.order == Order::kReverse) {
    for (int t = 0; t < n; ++t) order[t] = n - 1 - t;
  } else {
    for (int t = n - 1; t > 0; --t) {  // Fisher-Yates with a 64-bit LCG
      s.state = s.state * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[t], order[static_cast<int>((s.state >> 33) % static_cast<uint64_t>(t + 1))]);
    }
  }
}

// Runs body(tid) for tid in [0, threads) as one block with smem_bytes of shared memory, which
// starts filled with `fill`.
inline void run_block(int threads, int smem_bytes, float fill, const std::function<void(int)>& body) {
  if (threads % 32 != 0) throw std::runtime_error("simt: threads must be a multiple of 32");
  constexpr size_t kStack = 256 * 1024;
  Block b;
  b.threads = threads;
  b.ctx.resize(threads);
  b.done.assign(threads, 0);
  std::vector<float4> smem((smem_bytes + 15) / 16 + 1);
  for (float4& v : smem) v = make_float4(fill, fill, fill, fill);
  b.smem = reinterpret_cast<char*>(smem.data());
  b.smem_bytes = static_cast<size_t>(smem_bytes);
  b.all.expected = threads;
  b.warps.resize(threads / 32);
  for (Warp& w : b.warps) w.bar.expected = 32;
  b.warpgroups.resize((threads + 127) / 128);
  for (Barrier& g : b.warpgroups) g.expected = 128;
  b.wgmma_pending.resize(threads);
  b.wgmma_groups.resize(threads);
  b.copies.resize(threads);
  b.mbar_seen.resize(threads);
  b.body = body;
  Block* saved = block();
  block() = &b;
  for (int t = 0; t < threads; ++t) {
    b.stacks.emplace_back(new char[kStack]);
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = b.stacks.back().get();
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = &b.scheduler;
    makecontext(&b.ctx[t], fiber_entry, 0);
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  for (int live = threads; live > 0;) {
    const uint64_t before = b.progress;
    live = 0;
    next_order(order);
    for (int t : order) {
      if (b.done[t]) continue;
      b.current = t;
      swapcontext(&b.scheduler, &b.ctx[t]);
      if (!b.error.empty()) {
        block() = saved;
        throw std::runtime_error(b.error);
      }
      live += !b.done[t];
    }
    // A whole pass in which no barrier opened and no thread finished, with threads left, is a
    // deadlock (a barrier that some threads never reach): report it rather than spin.
    if (live > 0 && b.progress == before) {
      block() = saved;
      throw std::runtime_error("simt: deadlock at a barrier");
    }
  }
  block() = saved;
}

// Runs `blocks` blocks one after another (a grid; blocks never overlap here). Shared memory starts
// as NaN in even blocks and as 1e30 in odd ones: a value read before it was written shows up as a
// NaN in the results (even where it is multiplied by 0), or as a huge one (even where only its
// magnitude matters, as in a maximum, which ignores NaN).
inline void run_grid(int64_t blocks, int threads, int smem_bytes,
                     const std::function<void(int64_t, float*, int)>& body) {
  read_schedule();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    run_block(threads, smem_bytes, blk % 2 == 0 ? NAN : 1e30f,
              [&](int t) { body(blk, reinterpret_cast<float*>(block()->smem), t); });
  }
}

// Lane `src`'s deposit of word w, after every lane of the warp deposited its own.
inline void deposit(int w, uint32_t v) { warp().slot[lane()][w] = v; }
inline uint32_t word(int src, int w) { return warp().slot[src][w]; }

}  // namespace simt

inline void __syncthreads() { simt::wait(simt::block()->all); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::wait(simt::warp().bar); }
// Every lane deposits v, then reads lane src's (the warp's lanes all take part, as on the GPU).
template <class T>
inline T simt_shuffle(T v, int src) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- and 64-bit shuffles");
  constexpr int kWords = sizeof(T) / 4;
  uint32_t u[kWords];
  memcpy(u, &v, sizeof(T));
  for (int w = 0; w < kWords; ++w) simt::deposit(w, u[w]);
  __syncwarp();
  for (int w = 0; w < kWords; ++w) u[w] = simt::word(src, w);
  __syncwarp();
  memcpy(&v, u, sizeof(T));
  return v;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int offset) { return simt_shuffle(v, simt::lane() ^ offset); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) { return simt_shuffle(v, src & 31); }
inline unsigned __ballot_sync(unsigned, int pred) {
  simt::deposit(0, pred != 0);
  __syncwarp();
  unsigned mask = 0;
  for (int i = 0; i < 32; ++i) mask |= (simt::word(i, 0) != 0 ? 1u : 0u) << i;
  __syncwarp();
  return mask;
}
inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }
inline int atomicOr(int* p, int v) {  // fibers never interleave inside a call
  const int old = *p;
  *p = old | v;
  return old;
}
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const char*>(p) - simt::block()->smem);
}

// ---------------------------------------------------------------------------------------------
// port.cuh, device part
// ---------------------------------------------------------------------------------------------
namespace flash_kda {
namespace port {
using bf16_t = __nv_bfloat16;
using fp16_t = __half;
constexpr int kWarpSize = 32;

}  // namespace port
}  // namespace flash_kda

#include "port_device.cuh"  // the real device helpers, over the stand-ins above

namespace flash_kda {

// ---------------------------------------------------------------------------------------------
// ptx.cuh
// ---------------------------------------------------------------------------------------------
namespace tc {

// As the sm_90a build rounds (ptx.cuh: cvt.rn.tf32.f32, ties to even; builds for older
// architectures use cvt.rna, ties away, which differs only on exact ties).
inline float round_tf32(float x) {
  if (isnan(x)) return x;
  const uint32_t u = __float_as_uint(x);
  return __uint_as_float((u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u);
}
inline float fast_exp2(float x) {  // ex2.approx.ftz: results below 2^-126 flush to 0
  const float y = exp2f(x);
  return fabsf(y) < 1.17549435e-38f ? 0.0f : y;
}
// warp_max_u32 (redux.sync.max.u32): every lane deposits v, every lane gets the largest
inline uint32_t warp_max_u32(uint32_t v) {
  simt::deposit(0, v);
  __syncwarp();
  uint32_t m = 0;
  for (int i = 0; i < 32; ++i) m = simt::word(i, 0) > m ? simt::word(i, 0) : m;
  __syncwarp();
  return m;
}
// Vector accesses fault on a misaligned address on the hardware; here they throw.
inline void require_aligned(const void* p, uintptr_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) throw std::runtime_error(std::string("simt: misaligned ") + what);
}
inline void st16_global(void* p, uint4 x) { require_aligned(p, 16, "st16_global"); memcpy(p, &x, 16); }
inline void st8_global(float* p, float2 x) { require_aligned(p, 8, "st8_global"); memcpy(p, &x, 8); }
inline float2 ld8_aligned(const float* p) {
  require_aligned(p, 8, "ld8_aligned");
  float2 x;
  memcpy(&x, p, 8);
  return x;
}
inline void st8_aligned(float* p, float2 x) { require_aligned(p, 8, "st8_aligned"); memcpy(p, &x, 8); }

// The warp's D += A B for an m16n8kK tile, after every lane deposited its A registers as words
// 0..3 and its B registers as words 4..5: a_at(word of lane, k) and b_at(...) give the operand
// values. Each lane computes its four accumulators c0..c3 (rows g, g, g+8, g+8; columns 2t, 2t+1).
template <int K, class A, class B>
inline void warp_mma(float (&d)[4], A&& a_at, B&& b_at) {
  __syncwarp();
  const int g = simt::lane() / 4, t = simt::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < K; ++k) acc = fmaf(a_at(row, k), b_at(k, col), acc);
    d[e] = acc;
  }
  __syncwarp();
}

// D += A B, m16n8k8 TF32: the operands' low 13 mantissa bits are ignored, as the hardware does.
// A (row, k): lane (row % 8, k % 4), register (row >= 8) + 2 (k >= 4); B (k, col): lane
// (col, k % 4), register k >= 4.
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  for (int i = 0; i < 4; ++i) simt::deposit(i, a[i] & 0xffffe000u);
  for (int i = 0; i < 2; ++i) simt::deposit(4 + i, b[i] & 0xffffe000u);
  warp_mma<8>(
      d, [](int row, int k) { return __uint_as_float(simt::word((row % 8) * 4 + k % 4, (row >= 8) + 2 * (k >= 4))); },
      [](int k, int col) { return __uint_as_float(simt::word(col * 4 + k % 4, 4 + (k >= 4))); });
}

// D += A B, m16n8k16 with fp16 operands, two per register (the lower k in the low half).
// A (row, k): lane (row % 8, (k % 8) / 2), register (row >= 8) + 2 (k >= 8); B (k, col): lane
// (col, (k % 8) / 2), register k >= 8.
inline float half_of(uint32_t reg, int hi) {
  __half h;
  h.x = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
  return __half2float(h);
}
inline void mma16(float (&d)[4], const uint32_t (&a)[4], uint2 b) {
  for (int i = 0; i < 4; ++i) simt::deposit(i, a[i]);
  simt::deposit(4, b.x);
  simt::deposit(5, b.y);
  warp_mma<16>(
      d,
      [](int row, int k) {
        return half_of(simt::word((row % 8) * 4 + (k % 8) / 2, (row >= 8) + 2 * (k >= 8)), k & 1);
      },
      [](int k, int col) { return half_of(simt::word(col * 4 + (k % 8) / 2, 4 + (k >= 8)), k & 1); });
}

// ldmatrix .x4 / .x2 (b16): lane 8m + i deposits the shared address of row i of matrix m; lane
// (g, t) then reads word t of row g of each matrix. Errors here as on the hardware: a misaligned
// row address, a row outside the block's shared memory, lanes of one warp issuing different
// variants (.x2 beside .x4).
template <int N>
inline void ldmatrix_n(uint32_t (&r)[N], unsigned addr) {
  simt::deposit(0, addr);
  simt::deposit(1, N);
  __syncwarp();
  for (int l = 0; l < 32; ++l) {
    if (simt::word(l, 1) != N) throw std::runtime_error("simt: lanes of a warp issued different ldmatrix variants");
  }
  const int g = simt::lane() / 4, t = simt::lane() % 4;
  for (int m = 0; m < N; ++m) {
    const unsigned row = simt::word(8 * m + g, 0);
    if (row % 16 != 0) throw std::runtime_error("simt: ldmatrix row address not 16-byte aligned");
    if (row + 16 > simt::block()->smem_bytes) throw std::runtime_error("simt: ldmatrix row outside shared memory");
    memcpy(&r[m], simt::block()->smem + row + 4 * t, 4);
  }
  __syncwarp();
}
inline void ldmatrix_x4(uint32_t (&r)[4], unsigned addr) { ldmatrix_n<4>(r, addr); }
inline void ldmatrix_x2(uint32_t (&r)[2], unsigned addr) { ldmatrix_n<2>(r, addr); }
// ---- wgmma (ptx.cuh): m64nNk16, fp16 A from registers, B from shared memory by descriptor ----
// Asynchronous as on the GPU: wgmma_f16 only records the operation (the A registers as issued, the
// descriptor, where the accumulators live); the products are computed, reading B from shared memory
// and updating the accumulators, when wgmma_wait retires the operation's group. So a kernel that
// reads its accumulators before the wait, or changes B's shared memory before it, gets wrong
// results here too.
constexpr bool kArchHasWgmma = true;

inline uint64_t wgmma_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if (addr % 16 != 0 || lbo_bytes % 16 != 0 || sbo_bytes % 16 != 0) {
    throw std::runtime_error("simt: wgmma descriptor fields must be multiples of 16 bytes");
  }
  return static_cast<uint64_t>((addr >> 4) & 0x3fffu) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32);
}
inline uint64_t wgmma_desc_at(uint64_t desc, uint32_t bytes) {
  if (bytes % 16 != 0 || ((desc & 0x3fffu) + (bytes >> 4)) > 0x3fffu) {
    throw std::runtime_error("simt: wgmma_desc_at past the start address field");
  }
  return desc + (bytes >> 4);
}
inline void wgmma_fence() {}
template <int NT, class T>
inline void wgmma_fence_operand(T (&)[NT][4]) {}
// Makes this thread's completed cp.async copies visible to wgmma (see wgmma_f16's check).
inline void fence_proxy_async() {
  simt::Block* b = simt::block();
  for (uint32_t slot : b->copies[simt::tid()].unfenced) {
    auto it = b->slot_state.find(slot);
    if (it != b->slot_state.end() && it->second == simt::Block::kUnfenced) b->slot_state.erase(it);
  }
  b->copies[simt::tid()].unfenced.clear();
}

template <int N, bool kAccumulate = true>
inline void wgmma_f16(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "m64nNk16");
  if ((desc >> 49) != 0) throw std::runtime_error("simt: wgmma swizzle / base offset not modelled");
  // B's rows (16 bytes each) must not come from a cp.async that has not completed (cp_async_wait)
  // or whose writer has not run fence_proxy_async since: the GPU's wgmma could read stale bytes.
  {
    simt::Block* b = simt::block();
    const uint32_t start = static_cast<uint32_t>(desc & 0x3fffu) << 4;
    const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fffu) << 4;
    const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fffu) << 4;
    for (int n = 0; n < N; ++n)
      for (int kh = 0; kh < 2; ++kh) {
        const uint32_t slot = (start + (n / 8) * sbo + kh * lbo + (n % 8) * 16) / 16;
        auto it = b->slot_state.find(slot);
        if (it != b->slot_state.end()) {
          throw std::runtime_error(it->second == simt::Block::kInFlight
                                       ? "simt: wgmma reads shared memory whose cp.async has not completed"
                                       : "simt: wgmma reads cp.async data not fenced (fence_proxy_async)");
        }
        auto bulk = b->bulk_slots.find(slot);
        if (bulk != b->bulk_slots.end()) {
          const auto& seen = b->mbar_seen[simt::tid()];
          auto at = seen.find(bulk->second.first);
          if (at == seen.end() || at->second <= bulk->second.second) {
            throw std::runtime_error("simt: wgmma reads a bulk copy's data before waiting for its barrier phase");
          }
        }
      }
  }
  simt::Block::WgmmaOp op;
  memcpy(op.a, a, sizeof(op.a));
  op.desc = desc;
  op.d = &d[0][0];
  op.n = N;
  op.accumulate = kAccumulate;
  simt::block()->wgmma_pending[simt::tid()].push_back(op);
}
inline void wgmma_commit() {
  simt::Block* b = simt::block();
  const int t = simt::tid();
  int closed = static_cast<int>(b->wgmma_pending[t].size());
  for (int g : b->wgmma_groups[t]) closed -= g;
  b->wgmma_groups[t].push_back(closed);
}

// Element (n, k) of B for a K-major, unswizzled descriptor (ptx.cuh): from the block's shared memory.
inline float wgmma_b(uint64_t desc, int k, int n) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fffu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fffu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fffu) << 4;
  const uint32_t at = start + (n / 8) * sbo + (k / 8) * lbo + (n % 8) * 16 + (k % 8) * 2;
  __half h;
  memcpy(&h.x, simt::block()->smem + at, 2);
  return __half2float(h);
}

// Retires every committed group but the newest N, for the whole warpgroup: each thread computes its
// own accumulators (D rows 16 w + g (+8) of warp w, columns 8 j + 2 t (+1): the mma16 layout per
// n-tile j) from the A registers every thread of the group recorded.
template <int N>
inline void wgmma_wait() {
  simt::Block* b = simt::block();
  const int t = simt::tid(), base = t / 128 * 128;
  simt::wait(b->warpgroups[t / 128]);  // every thread of the group has issued and committed
  std::vector<int>& groups = b->wgmma_groups[t];
  int retire = 0;
  for (size_t i = 0; i + N < groups.size(); ++i) retire += groups[i];
  for (int u = base; u < base + 128; ++u) {
    if (b->wgmma_groups[u] != groups) {
      throw std::runtime_error("simt: wgmma groups differ within a warpgroup");
    }
  }
  const int w = (t - base) / 32, g = simt::lane() / 4, tq = simt::lane() % 4;
  std::vector<float> result;
  for (int i = 0; i < retire; ++i) {
    const simt::Block::WgmmaOp& op = b->wgmma_pending[t][i];
    for (int u = base; u < base + 128; ++u) {
      const simt::Block::WgmmaOp& other = b->wgmma_pending[u][i];
      if (other.desc != op.desc || other.n != op.n) {
        throw std::runtime_error("simt: a wgmma differs within its warpgroup");
      }
    }
    // A (row, k) of the 64 x 16 tile: warp row / 16, lane (row % 8) * 4 + (k % 8) / 2, register
    // (row % 16 >= 8) + 2 (k >= 8), half k % 2 (mma16's A fragment per warp).
    auto a_at = [&](int row, int k) {
      const int src = base + (row / 16) * 32 + (row % 8) * 4 + (k % 8) / 2;
      return half_of(b->wgmma_pending[src][i].a[(row % 16 >= 8) + 2 * (k >= 8)], k & 1);
    };
    for (int j = 0; j < op.n / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * w + g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * tq + (e & 1);
        float acc = op.accumulate ? op.d[4 * j + e] : 0.0f;
        for (int k = 0; k < 16; ++k) acc = fmaf(a_at(row, k), wgmma_b(op.desc, k, col), acc);
        op.d[4 * j + e] = acc;
      }
  }
  simt::wait(b->warpgroups[t / 128]);  // every thread has read the others' A registers
  b->wgmma_pending[t].erase(b->wgmma_pending[t].begin(), b->wgmma_pending[t].begin() + retire);
  groups.erase(groups.begin(), groups.end() - std::min<size_t>(N, groups.size()));
}

// cp.async: copied at issue; the slot is tracked until this thread waits for its group and fences
// (only wgmma's reads check it: plain loads of the bodies cannot be intercepted).
inline void cp_async16(unsigned dst, const float* src) {
  simt::Block* b = simt::block();
  memcpy(b->smem + dst, src, 16);
  b->slot_state[dst / 16] = simt::Block::kInFlight;
  b->copies[simt::tid()].open.push_back(dst / 16);
}
inline unsigned shared_address(const float* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
// Programmatic dependent launch: the emulator runs one kernel after the other, so the kernel before
// has always finished: nothing to wait for, nothing to release.
inline void griddep_wait() {}
inline void griddep_launch_dependents() {}
// The cluster barrier only keeps blocks that run at once in step; the emulator runs blocks one
// after another, so there is nothing to keep in step (and waiting would deadlock).
inline void cluster_arrive_relaxed() {}
inline void cluster_wait() {}
inline void cp_async_commit() {
  simt::Block::Copies& c = simt::block()->copies[simt::tid()];
  c.committed.push_back(std::move(c.open));
  c.open.clear();
}
template <int N>
inline void cp_async_wait() {
  simt::Block* b = simt::block();
  simt::Block::Copies& c = b->copies[simt::tid()];
  while (c.committed.size() > static_cast<size_t>(N)) {
    for (uint32_t slot : c.committed.front()) {
      b->slot_state[slot] = simt::Block::kUnfenced;
      c.unfenced.push_back(slot);
    }
    c.committed.erase(c.committed.begin());
  }
}

// mbarriers and bulk copies (ptx.cuh): the copy lands at issue; its bytes count towards the phase
// open on its barrier. Misuse the GPU would not report is an error here: a barrier outside the
// block's shared memory, a copy not 16-byte aligned or past it, more bytes landed than announced.
inline void check_mbar_address(unsigned bar) {
  if (bar % 8 != 0 || bar + 8 > simt::block()->smem_bytes) {
    throw std::runtime_error("simt: mbarrier outside shared memory or unaligned");
  }
}
inline simt::Block::Mbar& mbar_at(unsigned bar) {
  simt::Block* b = simt::block();
  check_mbar_address(bar);
  auto it = b->mbars.find(bar);
  if (it == b->mbars.end()) throw std::runtime_error("simt: mbarrier used before mbar_init");
  return it->second;
}
inline void mbar_complete_if_done(simt::Block::Mbar& m) {
  if (m.tx < 0) {
    throw std::runtime_error("simt: a bulk copy landed more bytes than its barrier was told to expect");
  }
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
    ++simt::block()->progress;
  }
}
inline void mbar_init(unsigned bar, unsigned arrivals) {
  check_mbar_address(bar);
  simt::Block::Mbar m;
  m.expected = m.pending = static_cast<int>(arrivals);
  simt::block()->mbars[bar] = m;
}
inline void fence_mbar_init() {}
inline void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  simt::Block::Mbar& m = mbar_at(bar);
  m.tx += bytes;
  --m.pending;
  mbar_complete_if_done(m);
}
inline void bulk_copy_g2s(unsigned dst, const float* src, unsigned bytes, unsigned bar) {
  simt::Block* b = simt::block();
  if (dst % 16 != 0 || bytes % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 || bytes == 0) {
    throw std::runtime_error("simt: bulk copy not in whole 16-byte units");
  }
  if (dst + bytes > b->smem_bytes) throw std::runtime_error("simt: bulk copy past the block's shared memory");
  simt::Block::Mbar& m = mbar_at(bar);
  memcpy(b->smem + dst, src, bytes);
  for (unsigned slot = dst / 16; slot < (dst + bytes) / 16; ++slot) {
    b->bulk_slots[slot] = {bar, m.phase};
    b->slot_state.erase(slot);
  }
  m.tx -= bytes;
  mbar_complete_if_done(m);
}
// Waits (yielding to the other threads) until the barrier's phase of this parity has completed,
// i.e. until the open phase has the other parity; the thread has then seen every phase before it.
inline void mbar_wait(unsigned bar, unsigned parity) {
  while (mbar_at(bar).phase % 2 == parity) simt::yield();
  uint64_t& seen = simt::block()->mbar_seen[simt::tid()][bar];
  seen = std::max(seen, mbar_at(bar).phase);
}

}  // namespace tc
}  // namespace flash_kda
