// kda_cuda.cu: the CUDA translation unit of one specialisation (head dim, input dtype).
//
// Implements flash_kda::launch_kda (declared in kda_params.h) with one of three kernel bodies:
//   two-kernel   kda_chunk_split.cuh: a preparation (TF32 mma.sync) writing fp16 records, then the
//                recurrence (fp16 wgmma on sm_90a, mma.m16n8k16 elsewhere); the default on sm_80+;
//   tensor-core  kda_chunk_tc.cuh: the fused body, mma.sync TF32 products, NVIDIA sm_80 and newer
//                (the `fast` build; FLASH_KDA_CUDA_SPLIT=0, or when the workspace cannot be had);
//   portable     kda_chunk_portable.cuh: fp32 FMAs only, any CUDA device and MUSA (mcc compiles
//                this file through ../musa/kda_musa.mu).
// FLASH_KDA_KERNEL_PORTABLE (the `portable` JIT variant, and every MUSA build) compiles the portable
// body only. Every runtime option of KdaParams (gates, l2norm, state dtype, fp32 g or beta, varlen)
// is a uniform branch inside a body, so a specialisation compiles one kernel per block layout.
#include <stdlib.h>

#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "../kda_params.h"
#include "../port.cuh"
#include "kda_chunk_portable.cuh"

#if !defined(FLASH_KDA_KERNEL_PORTABLE) && !defined(__MUSACC__) && !defined(FLASH_KDA_BACKEND_MUSA)
#define FLASH_KDA_HAS_TC 1
#include "kda_chunk_split.cuh"
#include "kda_chunk_tc.cuh"
#include "overlap.cuh"
#else
#define FLASH_KDA_HAS_TC 0
#endif

#ifndef FLASH_KDA_HEAD_DIM
#error "FLASH_KDA_HEAD_DIM comes from the JIT spec"
#endif

namespace flash_kda {
namespace {

constexpr int kHeadDim = FLASH_KDA_HEAD_DIM;
static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head dim must be 64, 128 or 256");

template <class L>
__global__ void __launch_bounds__(L::kThreads, L::kMinBlocks) kda_portable_kernel(const KdaParams p) {
  extern __shared__ float4 smem_f4[];  // float4: the body reads rows as 16-byte vectors
  portable::run_block<L>(p, reinterpret_cast<float*>(smem_f4), static_cast<int>(blockIdx.x),
                         static_cast<int>(threadIdx.x));
}

#if FLASH_KDA_HAS_TC
template <class L>
__global__ void __launch_bounds__(L::kThreads, L::kMinBlocks) kda_tc_kernel(const KdaParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync TF32 needs sm_80; launch_kda never picks this kernel on older devices
#else
  extern __shared__ float4 smem_f4[];
  tc::run_block<L>(p, reinterpret_cast<float*>(smem_f4), static_cast<int>(blockIdx.x),
                   static_cast<int>(threadIdx.x));
#endif
}

// The two-kernel form (kda_chunk_split.cuh): preparation over (slot, head), then the recurrence.
template <class L>
__global__ void __launch_bounds__(L::kThreads, L::kMinBlocks) kda_prep_kernel(const KdaParams p, const tc::PrepGrid g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ float4 smem_f4[];
  // A recurrence launched behind this kernel with programmatic serialization may start once every
  // block of this one has called griddep_launch_dependents or exited (it waits for this kernel's
  // writes itself: griddep_wait). At the end by default: released at the start, its blocks took
  // multiprocessors two at a time beside the preparation's last wave (docs/performance.md v16).
  // At the start where the host made that impossible (PrepGrid::release_at_start). A second call
  // of the instruction changes nothing.
  if (g.release_at_start) tc::griddep_launch_dependents();
  tc::prep_block<L>(p, g, static_cast<float*>(p.workspace), reinterpret_cast<float*>(smem_f4), blockIdx.x,
                    static_cast<int>(threadIdx.x));
  tc::griddep_launch_dependents();
#endif
}

// FLASH_KDA_RECURRENCE_MAXNREG=<n> (a compile definition, e.g. through
// FLASH_KDA_EXTRA_CUDA_CFLAGS="-DFLASH_KDA_RECURRENCE_MAXNREG=224", which is part of the cache key):
// cap the recurrence's registers per thread at n instead of its launch bounds' 255, for sweeps of
// the register budget (docs/performance.md v23). The two qualifiers cannot be combined.
#if defined(FLASH_KDA_RECURRENCE_MAXNREG)
#define FLASH_KDA_RECURRENCE_BOUNDS(L) __maxnreg__(FLASH_KDA_RECURRENCE_MAXNREG)
#else
#define FLASH_KDA_RECURRENCE_BOUNDS(L) __launch_bounds__(L::kThreads, L::kMinBlocks)
#endif

template <class L, bool kLockstep>
__global__ void FLASH_KDA_RECURRENCE_BOUNDS(L) kda_recurrence_kernel(const KdaParams p,
                                                                                   const tc::Piece piece) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ float4 smem_f4[];
  tc::recurrence_block<L, kLockstep>(p, piece, static_cast<const float*>(p.workspace),
                                     reinterpret_cast<float*>(smem_f4), static_cast<int>(blockIdx.x),
                                     static_cast<int>(threadIdx.x));
#endif
}
#endif

// query() for `device`, run once per device and remembered in the caller's bit masks (known: asked;
// yes: it said true); devices beyond 64 are asked every time. For per-kernel attribute calls, which
// cost a few microseconds where launches are per call.
template <class Query>
bool once_per_device(int device, unsigned long long& known, unsigned long long& yes, Query query) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const unsigned long long bit = device < 64 ? 1ull << device : 0ull;
  if (bit != 0 && (known & bit)) return (yes & bit) != 0;
  const bool answer = query();
  known |= bit;
  if (answer) yes |= bit;
  return answer;
}

// Sets a kernel's dynamic shared-memory limit once per device (done_mask: both masks at once).
template <class Kernel>
void ensure_max_dynamic_smem(Kernel kernel, int bytes, int device, unsigned long long& done_mask) {
  once_per_device(device, done_mask, done_mask, [&] {
    port::set_max_dynamic_smem(kernel, bytes);
    return true;
  });
}

#if FLASH_KDA_HAS_TC
// A switch that is on unless set to something atoi reads as 0 (unset or empty: on). The callers
// below read theirs once per process.
bool env_flag_on(const char* name) {
  const char* s = getenv(name);
  return s == nullptr || *s == '\0' || atoi(s) != 0;
}

// FLASH_KDA_CUDA_PDL=0 (read once per process): launch the one-piece recurrence as an ordinary
// kernel instead of one that may overlap the preparation's tail (LaunchExtras::pdl). For A/B runs.
bool pdl_enabled() {
  static const bool on = env_flag_on("FLASH_KDA_CUDA_PDL");
  return on;
}

// FLASH_KDA_CUDA_EARLY_RELEASE=0 (read once per process): keep the preparation's release of the
// recurrence at the end of its blocks even where RecurrenceVariant::releases_early would move it to
// their start. For A/B runs.
bool early_release_enabled() {
  static const bool on = env_flag_on("FLASH_KDA_CUDA_EARLY_RELEASE");
  return on;
}

// FLASH_KDA_CUDA_CLUSTER (read once per process): 0, never launch the recurrence's V slices as a
// cluster kept in step (recurrence_block's kLockstep); any other number, always (where a head has
// more than one slice); unset or empty, where the grid has more blocks than the device has
// multiprocessors (RecurrenceVariant::launch). For A/B runs.
int cluster_setting() {
  static const int v = [] {
    const char* s = getenv("FLASH_KDA_CUDA_CLUSTER");
    return s == nullptr || *s == '\0' ? -1 : (atoi(s) != 0 ? 1 : 0);
  }();
  return v;
}

// Whether `kernel`'s code, as it runs on `device`, holds the griddepcontrol instructions: ptx.cuh
// compiles them only for sm_90 and newer, and a module built for an older architecture (say
// TORCH_CUDA_ARCH_LIST=8.0+PTX) runs on an H100 from PTX without them. Launched with the
// programmatic attribute, such a recurrence would not wait for the preparation's writes. From the
// PTX version the code was compiled from; read once per kernel and device (once_per_device).
// Programmatic launches inside CUDA graph capture need CUDA 12.3 or newer.
template <class Kernel>
bool kernel_has_griddep(Kernel kernel, int device, unsigned long long& known, unsigned long long& yes) {
#if CUDART_VERSION >= 12030
  return once_per_device(device, known, yes, [&] {
    cudaFuncAttributes attr{};
    const bool has = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90;
    (void)cudaGetLastError();  // a failed query only turns the overlap off
    return has;
  });
#else
  (void)kernel, (void)device, (void)known, (void)yes;
  return false;
#endif
}
#endif

// What a launch may add to a plain one (pdl and cluster: CUDA sm_90+ only, launch_layout ignores
// them elsewhere; smem_bytes: everywhere).
// pdl: programmatic stream serialization, so that the kernel may start before the kernel launched
// just before it on `stream` completes, as soon as every block of that one has called
// griddep_launch_dependents; it must call griddep_wait before it reads what that kernel writes. Only
// for a kernel whose predecessor on the stream is known to be that kernel. cluster: blocks per
// thread-block cluster (consecutive block indices, run at once on one GPC); 1 for none. It must
// divide the grid. smem_bytes: RecurrenceVariant::one_per_sm_bytes.
struct LaunchExtras {
  bool pdl = false;
  unsigned cluster = 1;
  int smem_bytes = 0;  // dynamic shared memory per block if above the layout's (0: the layout's)
};

// Launches kKernel (of layout L) with `blocks` blocks (one per sequence x head x V slice) and the
// kernel's arguments (p, and what else it takes).
// The kernel is a template argument so that each kernel has its own record of the devices whose
// shared-memory limit it has raised: two kernels of one layout and one signature (the recurrence
// with and without lockstep) once shared an instantiation, so the second one launched never had its
// limit raised and failed with "invalid argument" (session 19).
template <class L, auto kKernel, class... Args>
void launch_layout(const char* name, int64_t blocks, const port::DeviceInfo& dev, port::stream_t stream,
                   LaunchExtras extras, const Args&... args) {
  if (blocks > 0x7fffffff) throw std::runtime_error("flash_kda: too many sequences x heads for one grid");
  static unsigned long long smem_set = 0, padded_set = 0;  // per kernel (kKernel), one bit per device
  constexpr auto kernel = kKernel;
  ensure_max_dynamic_smem(kernel, L::kSmemBytes, dev.device, smem_set);
  // (A padded size is the same for every launch on a device: RecurrenceVariant::one_per_sm_bytes.)
  const int smem = extras.smem_bytes > L::kSmemBytes ? extras.smem_bytes : L::kSmemBytes;
  if (smem > L::kSmemBytes) ensure_max_dynamic_smem(kernel, smem, dev.device, padded_set);
#if FLASH_KDA_HAS_TC
  if (dev.major >= 9 && (extras.pdl || extras.cluster > 1 || smem > L::kSmemBytes)) {
    if (blocks % extras.cluster != 0) throw std::logic_error("flash_kda: cluster width does not divide the grid");
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(blocks));
    config.blockDim = dim3(L::kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[2];
    unsigned n = 0;
    if (extras.pdl) {
      attribute[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attribute[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (extras.cluster > 1) {
      attribute[n].id = cudaLaunchAttributeClusterDimension;
      attribute[n++].val.clusterDim = {extras.cluster, 1, 1};
    }
    config.attrs = attribute;
    config.numAttrs = n;
    cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
    if (err != cudaSuccess && extras.cluster > 1) {
      // A cluster the device cannot place (a MIG slice or an MPS share with too few free SMs per
      // GPC, say): launch the grid without it. A kernel's cluster barrier then spans its own block
      // only (ptx.cuh), which stays correct; only the blocks' keeping in step is lost.
      (void)cudaGetLastError();
      config.numAttrs = n - 1;  // the cluster attribute is the last one
      err = cudaLaunchKernelEx(&config, kernel, args...);
    }
    port::check(err, name);
    return;
  }
#endif
  port::launch(name, kernel, static_cast<unsigned>(blocks), L::kThreads, smem, stream, args...);
}

// One block layout (V-slice width VS, chunk C): its shared-memory need, grid size, cost and launch.
template <int VS, int C>
struct PortableVariant {
  using L = portable::Layout<kHeadDim, VS, C>;

  static int64_t blocks(const KdaParams& p) { return static_cast<int64_t>(p.num_seqs) * p.hv * L::NVS; }
  static bool fits(const port::DeviceInfo& dev) { return L::kSmemBytes <= dev.max_smem_per_block; }

  // Estimated run time in units of one block's K-side work per chunk (loads, A matrices, decay
  // scaling), counted once per slice; the V-side (state products) of a full-width slice counts about
  // 3 such units. Blocks run in waves of (multiprocessors x resident blocks). Operation counts, not
  // timings: tune with measurements.
  static double cost(const KdaParams& p, const port::DeviceInfo& dev) {
    int per_sm = dev.smem_per_multiprocessor / (L::kSmemBytes + 1024);  // 1 KB reserved per block
    per_sm = per_sm < 1 ? 1 : (per_sm > L::kMinBlocks ? L::kMinBlocks : per_sm);
    const int64_t resident = static_cast<int64_t>(per_sm) * dev.multiprocessors;
    const int64_t waves = (blocks(p) + resident - 1) / resident;
    return static_cast<double>(waves) * (1.0 + 3.0 * L::VS / kHeadDim);
  }

  static void launch(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream) {
    launch_layout<L, kda_portable_kernel<L>>("kda_portable_kernel launch", blocks(p), dev, stream, {}, p);
  }
};

// Block layouts compiled for this head dim, with their shared memory per block (see Layout):
//   Wide    the widest V slice that fits a Hopper block (D = 256 stops at 128 rows: a full
//           256 x 256 fp32 state does not fit), least total work;
//   Narrow  half as wide: twice the blocks, for few sequences x heads;
//   Compact a shorter chunk and narrow slice, under ~99 KB, for devices with little shared memory
//           per block (sm_86/89/120 GeForce parts; other vendors). Used only when neither fits.
//              Wide              Narrow            Compact
//   D = 64     VS 64,  C 32 69K  VS 32, C 32  57K  VS 32, C 16  30K
//   D = 128    VS 128, C 32 160K VS 64, C 32 119K  VS 64, C 16  74K
//   D = 256    VS 128, C 16 208K VS 64, C 16 139K  VS 32, C 8   69K
template <int D>
struct Variants;
template <>
struct Variants<64> {
  using Wide = PortableVariant<64, 32>;
  using Narrow = PortableVariant<32, 32>;
  using Compact = PortableVariant<32, 16>;
};
template <>
struct Variants<128> {
  using Wide = PortableVariant<128, 32>;
  using Narrow = PortableVariant<64, 32>;
  using Compact = PortableVariant<64, 16>;
};
template <>
struct Variants<256> {
  using Wide = PortableVariant<128, 16>;
  using Narrow = PortableVariant<64, 16>;
  using Compact = PortableVariant<32, 8>;
};

// The wide slice does less total work (the K-side of each chunk is computed once per slice); the
// narrow one buys parallelism when there are few sequences x heads: pick the cheaper by cost().
void launch_portable(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream) {
  using V = Variants<kHeadDim>;
  const bool wide_ok = V::Wide::fits(dev), narrow_ok = V::Narrow::fits(dev);
  if (wide_ok && (!narrow_ok || V::Wide::cost(p, dev) <= V::Narrow::cost(p, dev))) {
    V::Wide::launch(p, dev, stream);
  } else if (narrow_ok) {
    V::Narrow::launch(p, dev, stream);
  } else if (V::Compact::fits(dev)) {
    V::Compact::launch(p, dev, stream);
  } else {
    throw std::runtime_error(
        "flash_kda: the portable kernel for head dim " + std::to_string(kHeadDim) + " needs " +
        std::to_string(V::Compact::L::kSmemBytes) +
        " bytes of shared memory per block; this device allows " +
        std::to_string(dev.max_smem_per_block));
  }
}


#if FLASH_KDA_HAS_TC
// Tuning knobs for benchmarks, read once per process: FLASH_KDA_CUDA_VSLICE=<width> and
// FLASH_KDA_CUDA_THREADS=<threads> restrict the tensor-core layouts considered (0 or unset: any;
// a restriction that leaves none is ignored).
int env_int(const char* name) {
  const char* s = getenv(name);
  return s != nullptr ? atoi(s) : 0;
}
int vslice_override() {
  static const int v = env_int("FLASH_KDA_CUDA_VSLICE");
  return v;
}
int threads_override() {
  static const int v = env_int("FLASH_KDA_CUDA_THREADS");
  return v;
}
// The two-kernel form (kda_chunk_split.cuh) is the default on sm_80+; FLASH_KDA_CUDA_SPLIT=0 (any
// value atoi reads as 0) selects the fused body, which needs no workspace. Unset or empty: default.
bool split_enabled() {
  static const bool on = env_flag_on("FLASH_KDA_CUDA_SPLIT");
  return on;
}

// What the tensor-core layout variants share: grid size (one block per sequence x head x V slice),
// fit, the benchmark knobs, and the load of the busiest multiprocessor. kCoResident: the most
// blocks of the layout one multiprocessor runs at once besides the shared-memory limit (registers).
template <class L_, int VS, int T, int kCoResident>
struct VariantBase {
  using L = L_;
  static int64_t blocks(const KdaParams& p) { return static_cast<int64_t>(p.num_seqs) * p.hv * L::NVS; }
  static bool fits(const port::DeviceInfo& dev) { return L::kSmemBytes <= dev.max_smem_per_block; }
  static bool allowed(const port::DeviceInfo& dev) {
    return fits(dev) && (vslice_override() == 0 || vslice_override() == VS) &&
           (threads_override() == 0 || threads_override() == T);
  }
  // Waves of co-resident blocks on the busiest multiprocessor, and whether blocks share one.
  struct Load {
    int64_t waves;
    bool shared;
  };
  static Load busiest(const KdaParams& p, const port::DeviceInfo& dev) {
    int cap = dev.smem_per_multiprocessor / (L::kSmemBytes + 1024);  // 1 KB reserved per block
    cap = cap < 1 ? 1 : (cap > kCoResident ? kCoResident : cap);
    const int64_t per_sm = (blocks(p) + dev.multiprocessors - 1) / dev.multiprocessors;
    return Load{(per_sm + cap - 1) / cap, per_sm >= 2 && cap >= 2};
  }
};

// One fused tensor-core block layout (V-slice width VS, chunk 32, T threads).
template <int VS, int T>
struct TcVariant : VariantBase<tc::Layout<kHeadDim, VS, 32, T>, VS, T,
                                tc::Layout<kHeadDim, VS, 32, T>::kMinBlocks> {
  using Base = VariantBase<tc::Layout<kHeadDim, VS, 32, T>, VS, T,
                           tc::Layout<kHeadDim, VS, 32, T>::kMinBlocks>;
  using L = typename Base::L;

  // Estimated time of the busiest multiprocessor, in units of one block's K-side work for a
  // chunk (loads, norms, decays, A matrices: paid again by every V slice). Fitted to H100 runs
  // (docs/performance.md): the K-side dominates, a full-width V side adds ~40 %; two co-resident
  // blocks take ~1.7x as long as one; 512 threads do a block's K-side in ~0.83x the time of 256.
  // A model to rank layouts, not a prediction of milliseconds.
  static double cost(const KdaParams& p, const port::DeviceInfo& dev) {
    const auto load = Base::busiest(p, dev);
    const double k_side = T >= 512 ? 0.83 : 1.0;
    return static_cast<double>(load.waves) * (load.shared ? 1.7 : 1.0) * (k_side + 0.4 * VS / kHeadDim);
  }

  static void launch(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream) {
    launch_layout<L, kda_tc_kernel<L>>("kda_tc_kernel launch", Base::blocks(p), dev, stream, {}, p);
  }
};

// One recurrence layout of the two-kernel form (V-slice width VS = 16 rows per warp, chunk 32,
// one or two operand buffers). Its threads hold ~170-255 registers (ptxas), so 65536 registers
// allow one 256-thread block per multiprocessor, two of 128 threads, four of 64.
template <int VS, int kStages>
struct RecurrenceVariant
    : VariantBase<tc::RecurrenceLayout<kHeadDim, VS, 32, kStages>, VS,
                  tc::RecurrenceLayout<kHeadDim, VS, 32, kStages>::kThreads,
                  256 / tc::RecurrenceLayout<kHeadDim, VS, 32, kStages>::kThreads> {
  using L = tc::RecurrenceLayout<kHeadDim, VS, 32, kStages>;
  using Base = VariantBase<L, VS, L::kThreads, 256 / L::kThreads>;

  // Estimated time of the busiest multiprocessor in units of a full-width wgmma slice's chunk.
  // Fitted to H200 runs at D = 128 (docs/performance.md v9-v10; T=32768 H=32, one block per
  // multiprocessor): a chunk took 2.1, 1.26 us at VS = 128, 64 by wgmma (its B reads are shared by
  // a warpgroup, so the slice's share of the products shrinks with VS: 0.2 + 0.8 VS / D) and 1.35 us
  // at VS = 32 by m16n8k16 (every warp reads all of B: 1.46x the TF32 form's 0.25 + 0.75 VS / D,
  // fitted to H100 runs in v6). Two or three co-resident blocks took ~1.7x one (T=8192 H=96), costed
  // 1.6x as in v4: enough for the ranking (VS 64 fastest on every measured shape, by 4 % at H=96).
  // wgmma runs where the build targets sm_90a, which the JIT does for a compute-capability-9.0
  // device (an explicit FLASH_KDA_CUDA_ARCH without the 'a' gets mma16 costed as wgmma: a
  // ranking error, not a correctness one). A model to rank layouts, not a prediction of time.
  // One operand buffer (D = 256 only): a chunk's copies are not overlapped with the one before, 1.35x
  // the chunk of two buffers where each block has a multiprocessor (D = 256, H100: recurrence 0.40 ->
  // 0.29 ms at T=4096 H=32, 128 blocks; 0.37 -> 0.31 at T=4096 H=8). With two buffers at D = 256 a
  // multiprocessor held one VS 64 block (119 KB with fp32 U0; 111 KB since) or two VS 32 ones, and with more blocks
  // than multiprocessors they lost 1-6 % to one buffer (256 to 1,024 blocks at VS 64;
  // docs/performance.md v24): not considered there.
  static double cost(const KdaParams& p, const port::DeviceInfo& dev) {
    if (kHeadDim == 256 && kStages > 1 && Base::blocks(p) > dev.multiprocessors) {
      return std::numeric_limits<double>::infinity();
    }
    const auto load = Base::busiest(p, dev);
    const bool wgmma = L::kWgmmaShape && dev.major == 9;
    const double chunk = (wgmma ? 0.2 + 0.8 * VS / kHeadDim : 1.46 * (0.25 + 0.75 * VS / kHeadDim)) *
                         (kStages == 1 ? 1.35 : 1.0);
    return static_cast<double>(load.waves) * (load.shared ? 1.6 : 1.0) * chunk;
  }

  // A call in one piece launches its recurrence right behind its preparation on the same stream
  // (tc::enqueue_pieces), so on sm_90+ it may overlap that preparation's tail (LaunchExtras::pdl): its
  // blocks load their initial state while the last preparation blocks finish. Not for pieces (their
  // recurrences follow each other and events on a side stream), nor where the preparation launched
  // no block (then the kernel before this one is the caller's).
  static void launch(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream,
                     const tc::Piece& piece) {
    // The V slices of a head as one cluster (consecutive blocks: every sequence x head has L::NVS of
    // them), kept in step by its blocks (recurrence_block's kLockstep), so that the slices' reads of
    // the head's shared arrays come from L2 once one has read them. It pays where blocks share
    // multiprocessors and the kernel streams its records at DRAM speed: 11-14 % at T=8192 H=96 (192
    // blocks on an H100's 132). With a multiprocessor per block the kernel waits on latency, and the
    // barrier cost 3-7 % at T=32768 H=32 (64 blocks) and T=8192 H=64 (128; docs/performance.md v18).
    constexpr bool kCanCluster = L::NVS > 1 && L::NVS <= 8;  // 8: the portable cluster limit
    const int setting = cluster_setting();
    if constexpr (kCanCluster) {
      if (dev.major >= 9 && (setting == 1 || (setting == -1 && Base::blocks(p) > dev.multiprocessors))) {
        launch_as<true>(p, dev, stream, piece);
        return;
      }
    }
    launch_as<false>(p, dev, stream, piece);
  }

  // Dynamic shared memory that leaves room for one block per multiprocessor (the layout's need or
  // more: half a multiprocessor's memory, and each block's 1 KB reserve on top); 0 if a block may
  // not ask for that much. At D = 128 one 512-thread preparation block (87 KB, 32,768 registers)
  // still fits beside a VS 64 or VS 32 block, so those start beside the last preparation blocks;
  // a VS 128 block (256 threads x 230 registers) does not, and waits for a multiprocessor of its own.
  static int one_per_sm_bytes(const port::DeviceInfo& dev) {
    const int half = dev.smem_per_multiprocessor / 2;
    return half <= L::kSmemBytes ? L::kSmemBytes : (half <= dev.max_smem_per_block ? half : 0);
  }
  // Whether a one-piece recurrence of this layout runs with the early release (launch_split asks
  // the same of the layout it will launch, for the preparation's side): one wave, one block per
  // multiprocessor, so that no multiprocessor gets two of its blocks beside the preparation's last
  // ones while others get none.
  // Head dim 128 only: the one measured (docs/performance.md v23); D = 64 and 256 keep the release
  // at the end.
  static bool releases_early(const KdaParams& p, const port::DeviceInfo& dev) {
    return kHeadDim == 128 && early_release_enabled() && dev.major >= 9 &&
           Base::blocks(p) <= dev.multiprocessors && one_per_sm_bytes(dev) > 0;
  }

  template <bool kLockstep>
  static void launch_as(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream,
                        const tc::Piece& piece) {
    static unsigned long long griddep_known = 0, griddep_yes = 0;  // per instantiation, per device
    const bool behind_prep = piece.carry == nullptr && tc::prep_blocks(p, L::C, 0, tc::kAllChunks) > 0;
    LaunchExtras extras;
    extras.pdl = behind_prep && dev.major >= 9 && pdl_enabled() &&
                 kernel_has_griddep(kda_recurrence_kernel<L, kLockstep>, dev.device, griddep_known, griddep_yes);
    extras.cluster = kLockstep ? L::NVS : 1;
    if (extras.pdl && releases_early(p, dev)) extras.smem_bytes = one_per_sm_bytes(dev);
    launch_layout<L, kda_recurrence_kernel<L, kLockstep>>("kda_recurrence_kernel launch", Base::blocks(p), dev,
                                                          stream, extras, p, piece);
  }
};

// The tensor-core layouts of one head dim; launches the cheapest that fits (ties go to the one
// listed first) with the kernel's arguments after p; false if none fits.
template <class... Vs>
struct TcChoice {
  static bool any_fits(const port::DeviceInfo& dev) { return (Vs::fits(dev) || ...); }
  // The index of the cheapest layout that fits (ties go to the one listed first), -1 if none.
  static int choose(const KdaParams& p, const port::DeviceInfo& dev) {
    const bool any_allowed = (Vs::allowed(dev) || ...);
    int best = -1, index = 0;
    double best_cost = 0.0;
    auto consider = [&](bool usable, double cost) {
      if (usable && (best < 0 || cost < best_cost)) {
        best = index;
        best_cost = cost;
      }
      ++index;
    };
    (consider(any_allowed ? Vs::allowed(dev) : Vs::fits(dev), Vs::cost(p, dev)), ...);
    return best;
  }
  template <class... Extra>
  static bool launch(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream,
                     const Extra&... extra) {
    const int best = choose(p, dev);
    if (best < 0) return false;
    int index = 0;
    ((index++ == best ? (Vs::launch(p, dev, stream, extra...), 0) : 0), ...);
    return true;
  }
  // Whether the layout launch() would pick releases early (RecurrenceVariant::releases_early).
  static bool chosen_releases_early(const KdaParams& p, const port::DeviceInfo& dev) {
    const int best = choose(p, dev);
    int index = 0;
    return ((index++ == best && Vs::releases_early(p, dev)) || ...);
  }
  // Launches the layout of V-slice width vs; false if none of that width fits.
  template <class... Extra>
  static bool launch_vs(int vs, const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream,
                        const Extra&... extra) {
    bool done = false;
    ((!done && Vs::L::VS == vs && Vs::fits(dev) ? (Vs::launch(p, dev, stream, extra...), done = true) : false), ...);
    return done;
  }
};

// Tensor-core layouts per head dim (shared memory per block):
//   D = 64:  VS 64 (64 KB), 32 (51 KB)
//   D = 128: VS 128 with 512 threads (148 KB), 32 (87 KB). (VS 128 with 256 threads measured
//            ~12 % slower than with 512 everywhere; VS 64 lost to one of these on every bench shape.)
//   D = 256: VS 64 (194 KB), 32 (157 KB)   (a 128-row fp32 slice would not fit; 512 threads
//            would need more registers than a multiprocessor has at this head dim)
template <int D>
struct TcVariants;
template <>
struct TcVariants<64> : TcChoice<TcVariant<64, 256>, TcVariant<32, 256>> {};
template <>
struct TcVariants<128>
    : TcChoice<TcVariant<128, 512>, TcVariant<32, 256>> {};
template <>
struct TcVariants<256> : TcChoice<TcVariant<64, 256>, TcVariant<32, 256>> {};

// The two-kernel form per head dim: the preparation layouts (whole V width; 256 or 512 threads)
// and the recurrence layouts (V slice, operand buffers: shared memory per block):
//   D = 64:  preparation 51 KB; recurrence VS 64 or 32, two buffers (37 KB, 33 KB)
//   D = 128: preparation 87 KB; recurrence VS 128, 64 or 32, two buffers (69 KB, 61 KB, 57 KB)
//   D = 256: preparation 157 KB; recurrence VS 64 or 32, one buffer (55 KB, 53 KB) or two (111 KB,
//            107 KB; only where the blocks fit one per multiprocessor, RecurrenceVariant::cost)
template <int D>
struct Split;
template <>
struct Split<64> : TcChoice<RecurrenceVariant<64, 2>, RecurrenceVariant<32, 2>> {};
template <>
struct Split<128> : TcChoice<RecurrenceVariant<128, 2>, RecurrenceVariant<64, 2>,
                             RecurrenceVariant<32, 2>> {};
template <>
struct Split<256> : TcChoice<RecurrenceVariant<64, 1>, RecurrenceVariant<32, 1>, RecurrenceVariant<64, 2>,
                             RecurrenceVariant<32, 2>> {};

// FLASH_KDA_CUDA_PREP_THREADS=256|512 picks the preparation layout (default 512: 7-9 % faster on
// every bench shape at D = 128, docs/performance.md).
int prep_threads() {
  static const int v = env_int("FLASH_KDA_CUDA_PREP_THREADS") == 256 ? 256 : 512;
  return v;
}
constexpr int kSplitChunk = 32;
using PrepNarrow = tc::PrepLayout<kHeadDim, kSplitChunk, 256>;
// (D = 64 has too few 8-channel loads per chunk for 512 threads: it stays at 256.)
using PrepWide = tc::PrepLayout<kHeadDim, kSplitChunk, kSplitChunk * kHeadDim / 8 >= 512 ? 512 : 256>;

bool split_usable(const port::DeviceInfo& dev) {
  return split_enabled() && dev.major >= 8 && PrepWide::kSmemBytes <= dev.max_smem_per_block &&
         PrepNarrow::kSmemBytes <= dev.max_smem_per_block && Split<kHeadDim>::any_fits(dev);
}

// How a call of the two-kernel form is cut into stretches of chunks, so that the recurrence of one
// runs beside the preparation of the next (overlap.cuh; docs/next-overlap.md), and which recurrence
// V slice it then uses (0: the usual choice). FLASH_KDA_CUDA_PIECES=<k> (read once per process): 1
// never cuts, k >= 2 cuts every call in k (tc::split_pieces: dense calls along their chunks, varlen
// calls along their record slots; at most one piece per chunk or slot). Unset or empty: the rule
// below, for calls at D = 128 with at least 256 chunks (8192 tokens) per sequence — for a varlen
// call, whose lengths the host cannot see, per sequence on average (T_total / N). Measured on varlen
// calls at H=32 (docs/performance.md v15, the rule's VS 64 and 8 pieces forced): one sequence of
// 32768 tokens -19 %, [16384, 3000, 9000, 4384] -8 % (the rule leaves it whole: 256 blocks at VS 64),
// 4 x 8192 +1 % (also left whole); the issue's varlen shapes at H=96 (more blocks) lost 1-7 % cut
// and stay whole:
//  - on compute capability 9.0 (the wgmma recurrence, fp16 records): VS 64 whenever its blocks number
//    at most 1.5x the multiprocessors. Fitted to H200 whole-call times (docs/performance.md v13,
//    H = 16 to 96): pieces at VS 64 were the fastest setting on every shape of at least 256 chunks,
//    -2 % (H=64) to -21 % (T=32768 H=32) against one piece; a VS 64 block (70 KB, 32,768 registers)
//    fits beside a 512-thread preparation block. H=96 (192 blocks) is the largest measured;
//  - elsewhere (mma16 recurrence; fitted to H100 times of main's TF32 recurrence, v12): only if a
//    recurrence of V slice 32 or 64 needs at most half the multiprocessors, then the cheaper of those
//    by the usual cost (pieces paid 12-23 % at H=16 and 32, nothing with 128 blocks at H=64);
//  - 4 pieces below 1024 chunks, 8 from there (the best k measured at 256-512 and 1024-2048 chunks).
struct SplitPlan {
  int64_t pieces;
  int vs;
};
SplitPlan split_plan(const KdaParams& p, const port::DeviceInfo& dev) {
  static const int asked = [] {  // 0: unset or empty (the rule); atoi's 0 or less: 1 (never cut)
    const char* s = getenv("FLASH_KDA_CUDA_PIECES");
    if (s == nullptr || *s == '\0') return 0;
    const int k = atoi(s);
    return k < 1 ? 1 : k;
  }();
  if (asked >= 1) return SplitPlan{tc::split_pieces(p, kSplitChunk, asked), 0};
  if constexpr (kHeadDim != 128) {
    return SplitPlan{1, 0};
  } else {
    // (dense: the sequences' length; varlen: p.seq_len is T_total, so their mean length)
    const int64_t per_seq = p.cu_seqlens == nullptr ? p.seq_len : p.seq_len / (p.num_seqs > 0 ? p.num_seqs : 1);
    const int64_t chunks = tc::chunks_of(per_seq, kSplitChunk);
    if (chunks < 256 || vslice_override() != 0) return SplitPlan{1, 0};
    using R64 = RecurrenceVariant<64, 2>;
    using R32 = RecurrenceVariant<32, 2>;
    const int64_t k = tc::split_pieces(p, kSplitChunk, chunks >= 1024 ? 8 : 4);
    if (dev.major == 9 && R64::fits(dev) && R64::blocks(p) <= 3 * static_cast<int64_t>(dev.multiprocessors) / 2) {
      return SplitPlan{k, 64};
    }
    const int64_t half = dev.multiprocessors / 2;
    const bool ok64 = R64::fits(dev) && R64::blocks(p) <= half, ok32 = R32::fits(dev) && R32::blocks(p) <= half;
    if (!ok64 && !ok32) return SplitPlan{1, 0};
    const int vs = ok64 && (!ok32 || R64::cost(p, dev) <= R32::cost(p, dev)) ? 64 : 32;
    return SplitPlan{k, vs};
  }
}

// release_at_start: PrepGrid::release_at_start.
template <class L>
void launch_prep(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream, int64_t c_begin,
                 int64_t c_end, bool release_at_start) {
  const int64_t blocks = tc::prep_blocks(p, kSplitChunk, c_begin, c_end);
  if (blocks <= 0) return;
  tc::PrepGrid g = tc::make_prep_grid<L>(p, c_begin, c_end);
  g.release_at_start = release_at_start ? 1 : 0;
  launch_layout<L, kda_prep_kernel<L>>("kda_prep_kernel launch", blocks, dev, stream, {}, p, g);
}

void launch_prep_piece(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream, int64_t c_begin,
                       int64_t c_end, bool release_at_start = false) {
  if (prep_threads() == 512) {
    launch_prep<PrepWide>(p, dev, stream, c_begin, c_end, release_at_start);
  } else {
    launch_prep<PrepNarrow>(p, dev, stream, c_begin, c_end, release_at_start);
  }
}

// Preparation then recurrence (tc::enqueue_pieces: the schedule the emulator runs too), in one piece
// on the caller's stream, or cut into stretches whose recurrences run on a side stream (overlap.cuh).
// False if no recurrence layout fits (then the caller runs the fused body).
bool launch_split(const KdaParams& p, const port::DeviceInfo& dev, port::stream_t stream) {
  using tc::Piece;
  const auto prep = [&](int64_t c_begin, int64_t c_end) { launch_prep_piece(p, dev, stream, c_begin, c_end); };
  bool launched = true;
  const auto in_one_piece = [&] {
    // The early release (PrepGrid::release_at_start) where the recurrence will be launched for it:
    // the preparation asks the layout choice the recurrence's launch makes. (Without a programmatic
    // launch behind it, the early call does nothing.)
    const bool early = pdl_enabled() && Split<kHeadDim>::chosen_releases_early(p, dev);
    const auto prep_one = [&](int64_t c_begin, int64_t c_end) {
      launch_prep_piece(p, dev, stream, c_begin, c_end, early);
    };
    tc::enqueue_pieces<kHeadDim, kSplitChunk>(p, 1, prep_one, [&](const Piece& piece) {
      launched = Split<kHeadDim>::launch(p, dev, stream, piece);
    });
    return launched;
  };
  const SplitPlan plan = split_plan(p, dev);
  const int64_t pieces = plan.pieces;
  if (pieces == 1) return in_one_piece();
  std::lock_guard<std::mutex> lock(overlap::enqueue_mutex());
  const overlap::SideStream* side = overlap::side_stream(dev.device, stream);
  if (side == nullptr) return in_one_piece();  // (the workspace was sized for pieces: a carry unused)
  bool forked = false;
  try {
    tc::enqueue_pieces<kHeadDim, kSplitChunk>(
        p, pieces,
        [&](int64_t c_begin, int64_t c_end) {
          prep(c_begin, c_end);
          overlap::order_after(side->stream, stream, side->ready);
          forked = true;
        },
        [&](const Piece& piece) {
          const bool ok = plan.vs != 0 ? Split<kHeadDim>::launch_vs(plan.vs, p, dev, side->stream, piece)
                                       : Split<kHeadDim>::launch(p, dev, side->stream, piece);
          launched = ok && launched;
        });
    overlap::order_after(stream, side->stream, side->done);
  } catch (...) {
    // Join anyway, so that the caller's stream is never left ahead of work that reads its memory.
    if (forked) {
      (void)cudaEventRecord(side->done, side->stream);
      (void)cudaStreamWaitEvent(stream, side->done, 0);
    }
    throw;
  }
  return launched;
}
#endif  // FLASH_KDA_HAS_TC

}  // namespace

int64_t workspace_bytes(const KdaParams& p) {
#if FLASH_KDA_HAS_TC
  const port::DeviceInfo dev = port::device_info();
  if (p.num_seqs <= 0 || p.hv <= 0 || !split_usable(dev)) return 0;
  return tc::split_workspace_bytes<kHeadDim, kSplitChunk>(p, split_plan(p, dev).pieces);
#else
  (void)p;
  return 0;
#endif
}

void launch_kda(const KdaParams& p, void* stream) {
  if (p.head_dim != kHeadDim) {
    throw std::runtime_error("flash_kda: kernel compiled for head dim " + std::to_string(kHeadDim) +
                             ", called with " + std::to_string(p.head_dim));
  }
  if (p.hqk <= 0 || p.hv % p.hqk != 0) {
    throw std::runtime_error("flash_kda: value heads must be a positive multiple of query/key heads");
  }
  if (p.num_seqs <= 0 || p.hv <= 0) return;  // nothing to read or write
  const port::DeviceInfo dev = port::device_info();
  const auto s = static_cast<port::stream_t>(stream);
#if FLASH_KDA_HAS_TC
  if (p.workspace != nullptr && split_usable(dev) && launch_split(p, dev, s)) return;
  if (dev.major >= 8 && TcVariants<kHeadDim>::launch(p, dev, s)) return;
#endif
  launch_portable(p, dev, s);
}

}  // namespace flash_kda
