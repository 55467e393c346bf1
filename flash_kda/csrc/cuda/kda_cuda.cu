// kda_cuda.cu: the CUDA translation unit of one specialisation (head dim, input dtype).
//
// Implements flash_kda::launch_kda (declared in kda_params.h) with the portable chunked body
// (kda_chunk_portable.cuh). Every runtime option of KdaParams (gates, l2norm, state dtype, fp32 g or
// beta, varlen) is a uniform branch inside the body, so each specialisation compiles one kernel.
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

template <int D>
__global__ void __launch_bounds__(portable::Layout<D>::kThreads)
    kda_portable_kernel(const KdaParams p) {
  extern __shared__ float4 smem_f4[];  // float4: 16-byte alignment for whatever the body wants
  portable::run_block<D>(p, reinterpret_cast<float*>(smem_f4), static_cast<int>(blockIdx.x),
                         static_cast<int>(threadIdx.x));
}

void launch_portable(const KdaParams& p, port::stream_t stream) {
  using L = portable::Layout<kHeadDim>;
  const port::DeviceInfo dev = port::device_info();
  if (L::kSmemBytes > dev.max_smem_per_block) {
    throw std::runtime_error("flash_kda: the portable kernel for head dim " +
                             std::to_string(kHeadDim) + " needs " + std::to_string(L::kSmemBytes) +
                             " bytes of shared memory per block; this device allows " +
                             std::to_string(dev.max_smem_per_block));
  }
  const int64_t blocks = static_cast<int64_t>(p.num_seqs) * p.hv * L::NVS;
  if (blocks > 0x7fffffff) throw std::runtime_error("flash_kda: too many sequences x heads");
  auto kernel = kda_portable_kernel<kHeadDim>;
  port::set_max_dynamic_smem(kernel, L::kSmemBytes);
  port::launch("kda_portable_kernel launch", kernel, static_cast<unsigned>(blocks), L::kThreads,
               L::kSmemBytes, stream, p);
}

}  // namespace

void launch_kda(const KdaParams& p, void* stream) {
  if (p.head_dim != kHeadDim) {
    throw std::runtime_error("flash_kda: kernel compiled for head dim " + std::to_string(kHeadDim) +
                             ", called with " + std::to_string(p.head_dim));
  }
  if (p.num_seqs <= 0 || p.hv <= 0) return;
  launch_portable(p, static_cast<port::stream_t>(stream));
}

}  // namespace flash_kda
