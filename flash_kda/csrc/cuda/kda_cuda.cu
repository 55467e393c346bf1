// kda_cuda.cu: the CUDA translation unit of one specialisation (head dim, input dtype).
//
// Implements flash_kda::launch_kda (declared in kda_params.h) with the portable chunked body
// (kda_chunk_portable.cuh). Every runtime option of KdaParams (gates, l2norm, state dtype, fp32 g or
// beta, varlen) is a uniform branch inside the body, so a specialisation compiles one kernel per
// block layout (three, see Variants).
//
// FLASH_KDA_KERNEL_PORTABLE asks for the portable body even where an arch-specific fast path exists.
// No fast path exists yet, so the portable body is what every build runs; an sm_80+ tensor-core path
// would be selected in launch_kda below when the macro is absent.
#include <stdexcept>
#include <string>

#include "../kda_params.h"
#include "../port.cuh"
#include "kda_chunk_portable.cuh"

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

  static void launch(const KdaParams& p, port::stream_t stream) {
    const int64_t n = blocks(p);
    if (n > 0x7fffffff) throw std::runtime_error("flash_kda: too many sequences x heads for one grid");
    auto kernel = kda_portable_kernel<L>;
    port::set_max_dynamic_smem(kernel, L::kSmemBytes);
    port::launch("kda_portable_kernel launch", kernel, static_cast<unsigned>(n), L::kThreads,
                 L::kSmemBytes, stream, p);
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
void launch_portable(const KdaParams& p, port::stream_t stream) {
  using V = Variants<kHeadDim>;
  const port::DeviceInfo dev = port::device_info();
  const bool wide_ok = V::Wide::fits(dev), narrow_ok = V::Narrow::fits(dev);
  if (wide_ok && (!narrow_ok || V::Wide::cost(p, dev) <= V::Narrow::cost(p, dev))) {
    V::Wide::launch(p, stream);
  } else if (narrow_ok) {
    V::Narrow::launch(p, stream);
  } else if (V::Compact::fits(dev)) {
    V::Compact::launch(p, stream);
  } else {
    throw std::runtime_error(
        "flash_kda: the portable kernel for head dim " + std::to_string(kHeadDim) + " needs " +
        std::to_string(V::Compact::L::kSmemBytes) +
        " bytes of shared memory per block; this device allows " +
        std::to_string(dev.max_smem_per_block));
  }
}

}  // namespace

void launch_kda(const KdaParams& p, void* stream) {
  if (p.head_dim != kHeadDim) {
    throw std::runtime_error("flash_kda: kernel compiled for head dim " + std::to_string(kHeadDim) +
                             ", called with " + std::to_string(p.head_dim));
  }
  if (p.hqk <= 0 || p.hv % p.hqk != 0) {
    throw std::runtime_error("flash_kda: value heads must be a positive multiple of query/key heads");
  }
  if (p.num_seqs <= 0 || p.hv <= 0) return;  // nothing to read or write
  launch_portable(p, static_cast<port::stream_t>(stream));
}

}  // namespace flash_kda
