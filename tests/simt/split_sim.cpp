// split_sim.cpp: flash_kda::launch_kda for the CUDA two-kernel form (kda_chunk_split.cuh), run on
// the CPU by simt.h. Compiled together with the real binding.cpp (FLASH_KDA_BACKEND_CPU, a sim op
// name), so the tests call it exactly as they call a real kernel: torch.ops.flash_kda_kernels.<op>
// on CPU tensors. The layout to run is read from the environment at each call:
//   FLASH_KDA_SIM_PREP_THREADS  256 or 512 (default 512; D = 64 has only 256, as on the GPU)
//   FLASH_KDA_SIM_VS            the recurrence's V-slice width, one of kda_cuda.cu's Split<D>
//                               layouts: D = 64: 64, 32; D = 128: 128 (default), 64, 32;
//                               D = 256: 64 (default), 32
#include "simt.h"

#include "cuda/kda_chunk_split.cuh"

namespace flash_kda {
namespace {

constexpr int D = FLASH_KDA_HEAD_DIM, C = 32;
// Stage counts as kda_cuda.cu's Split<D> picks them.
constexpr int kStages = D == 256 ? 1 : 2;

int env_or(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

template <class L>
void prep(const KdaParams& p) {
  float* scratch = static_cast<float*>(p.workspace);
  simt::run_grid(tc::num_slots(p, C) * p.hv, L::kThreads, L::kSmemBytes,
                 [&](int64_t blk, float* sm, int t) { tc::prep_block<L>(p, scratch, sm, blk, t); });
}

template <int VS>
void recurrence(const KdaParams& p) {
  using L = tc::RecurrenceLayout<D, VS, C, kStages>;
  const float* scratch = static_cast<const float*>(p.workspace);
  simt::run_grid(static_cast<int64_t>(p.num_seqs) * p.hv * L::NVS, L::kThreads, L::kSmemBytes,
                 [&](int64_t blk, float* sm, int t) {
                   tc::recurrence_block<L>(p, scratch, sm, static_cast<int>(blk), t);
                 });
}

}  // namespace

int64_t workspace_bytes(const KdaParams& p) {
  if (p.num_seqs <= 0 || p.hv <= 0) return 0;
  return tc::split_scratch_bytes<D, C>(p);
}

void launch_kda(const KdaParams& p, void*) {
  if (p.head_dim != D) throw std::runtime_error("split_sim: compiled for another head dim");
  if (p.num_seqs <= 0 || p.hv <= 0) return;
  if (p.workspace == nullptr) throw std::runtime_error("split_sim: no scratch");
  constexpr bool kWide = C * D / 8 >= 512;  // as kda_cuda.cu's PrepWide
  if (kWide && env_or("FLASH_KDA_SIM_PREP_THREADS", 512) == 512) {
    prep<tc::PrepLayout<D, C, kWide ? 512 : 256>>(p);
  } else {
    prep<tc::PrepLayout<D, C, 256>>(p);
  }
  const int vs = env_or("FLASH_KDA_SIM_VS", D == 128 ? 128 : 64);
  if (vs == 32) {
    recurrence<32>(p);
  } else if (vs == 64) {
    recurrence<64>(p);
  } else if constexpr (D == 128) {
    recurrence<128>(p);
  } else {
    throw std::runtime_error("split_sim: no such recurrence layout at this head dim");
  }
}

}  // namespace flash_kda
