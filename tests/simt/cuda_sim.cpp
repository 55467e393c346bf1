// cuda_sim.cpp: flash_kda::launch_kda for the CUDA bodies, run on the CPU by simt.h. Compiled
// together with the real binding.cpp (FLASH_KDA_BACKEND_CPU, a sim op name), so the tests call it
// exactly as they call a real kernel: torch.ops.flash_kda_kernels.<op> on CPU tensors. What to
// run is read from the environment at each call, among the layouts kda_cuda.cu can launch:
//   FLASH_KDA_SIM_FORM          split (default: the two-kernel form), fused (tc::run_block) or
//                               portable (portable::run_block, also the MUSA body)
//   FLASH_KDA_SIM_VS            split: the recurrence's V slice (D = 64: 64, 32; D = 128: 128,
//                               64, 32; D = 256: 64, 32); fused: the block's V slice (D = 64: 64,
//                               32; D = 128: 128, 32; D = 256: 64, 32). Default: the first.
//   FLASH_KDA_SIM_PREP_THREADS  split: 512 (default) or 256 (D = 64 has only 256)
//   FLASH_KDA_SIM_PORTABLE      portable: wide (default), narrow or compact
//   FLASH_KDA_SIM_PIECES        split, dense: cut the call into this many stretches of chunks
//                               (kda_cuda.cu's FLASH_KDA_CUDA_PIECES; default 1). The pieces run
//                               one after the other here (preparation i, recurrence i, ...): this
//                               checks the stretches' ranges and the carried state, not concurrency.
// The split form's scratch (records and carry) is filled with NaN before the first kernel, so a
// record or carry state read before it is written shows in the output.
#include "simt.h"

#include <algorithm>
#include <limits>

#include "cuda/kda_chunk_portable.cuh"
#include "cuda/kda_chunk_split.cuh"
#include "cuda/kda_chunk_tc.cuh"

namespace flash_kda {
namespace {

constexpr int D = FLASH_KDA_HEAD_DIM, C = 32;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}
std::string env_str(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}
[[noreturn]] void no_layout(const std::string& what) {
  throw std::runtime_error("cuda_sim: no " + what + " layout at head dim " + std::to_string(D));
}

template <class L>
int64_t slice_blocks(const KdaParams& p) {
  return static_cast<int64_t>(p.num_seqs) * p.hv * L::NVS;
}

// ---- split: preparation over every (slot, head), then the recurrence ----
// Pieces as kda_cuda.cu's split_pieces: dense only, at most one per chunk.
int64_t pieces_of(const KdaParams& p) {
  const int64_t asked = env_int("FLASH_KDA_SIM_PIECES", 1);
  if (asked < 2 || p.cu_seqlens != nullptr) return 1;
  const int64_t chunks = tc::chunks_of(p.seq_len, C);
  return asked < chunks ? asked : (chunks > 1 ? chunks : 1);
}

template <class L>
void prep(const KdaParams& p, int64_t c_begin, int64_t c_end) {
  float* scratch = static_cast<float*>(p.workspace);
  const tc::PrepGrid g = tc::make_prep_grid<L>(p, c_begin, c_end);
  const int64_t chunks = tc::chunks_of(p.seq_len, C);
  const int64_t per_head = p.cu_seqlens == nullptr ? p.num_seqs * ((c_end < chunks ? c_end : chunks) - c_begin)
                                                   : tc::num_slots(p, C);
  simt::run_grid(per_head * p.hv, L::kThreads, L::kSmemBytes, [&](int64_t blk, float* sm, int t) {
    tc::prep_block<L>(p, g, scratch, sm, static_cast<uint32_t>(blk), t);
  });
}

template <int VS>
void recurrence(const KdaParams& p, const tc::Piece& piece) {
  using L = tc::RecurrenceLayout<D, VS, C, D == 256 ? 1 : 2>;  // stages as kda_cuda.cu's Split<D>
  const float* scratch = static_cast<const float*>(p.workspace);
  simt::run_grid(slice_blocks<L>(p), L::kThreads, L::kSmemBytes, [&](int64_t blk, float* sm, int t) {
    tc::recurrence_block<L>(p, piece, scratch, sm, static_cast<int>(blk), t);
  });
}

void split_piece(const KdaParams& p, int64_t c_begin, int64_t c_end, const tc::Piece& piece) {
  constexpr bool kWide = C * D / 8 >= 512;  // as kda_cuda.cu's PrepWide
  if (kWide && env_int("FLASH_KDA_SIM_PREP_THREADS", 512) == 512) {
    prep<tc::PrepLayout<D, C, kWide ? 512 : 256>>(p, c_begin, c_end);
  } else {
    prep<tc::PrepLayout<D, C, 256>>(p, c_begin, c_end);
  }
  const int vs = env_int("FLASH_KDA_SIM_VS", D == 128 ? 128 : 64);
  if (vs == 32) {
    recurrence<32>(p, piece);
  } else if (vs == 64) {
    recurrence<64>(p, piece);
  } else if constexpr (D == 128) {
    recurrence<128>(p, piece);
  } else {
    no_layout("recurrence");
  }
}

int64_t split_bytes(const KdaParams& p) {
  return tc::split_scratch_bytes<D, C>(p) + (pieces_of(p) > 1 ? tc::carry_bytes<D>(p) : 0);
}

void split(const KdaParams& p) {
  if (p.workspace == nullptr) throw std::runtime_error("cuda_sim: no scratch");
  float* scratch = static_cast<float*>(p.workspace);
  std::fill(scratch, scratch + split_bytes(p) / 4, std::numeric_limits<float>::quiet_NaN());
  const int64_t pieces = pieces_of(p);
  if (pieces == 1) {
    split_piece(p, 0, tc::kAllChunks, tc::Piece{0, tc::kAllChunks, nullptr});
    return;
  }
  const int64_t chunks = tc::chunks_of(p.seq_len, C);
  float* carry = scratch + tc::split_scratch_bytes<D, C>(p) / 4;
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t c_begin = tc::stretch_begin(chunks, pieces, i), c_end = tc::stretch_begin(chunks, pieces, i + 1);
    split_piece(p, c_begin, c_end, tc::Piece{c_begin, i + 1 == pieces ? tc::kAllChunks : c_end, carry});
  }
}

// ---- fused tensor-core body ----
template <int VS, int T>
void fused_with(const KdaParams& p) {
  using L = tc::Layout<D, VS, C, T>;
  simt::run_grid(slice_blocks<L>(p), L::kThreads, L::kSmemBytes, [&](int64_t blk, float* sm, int t) {
    tc::run_block<L>(p, sm, static_cast<int>(blk), t);
  });
}

void fused(const KdaParams& p) {  // kda_cuda.cu's TcVariants<D>
  const int vs = env_int("FLASH_KDA_SIM_VS", D == 128 ? 128 : 64);
  if (vs == 32) {
    fused_with<32, 256>(p);
  } else if constexpr (D == 128) {
    if (vs != 128) no_layout("fused");
    fused_with<128, 512>(p);
  } else {
    if (vs != 64) no_layout("fused");
    fused_with<64, 256>(p);
  }
}

// ---- portable body ----
template <int VS, int CH>
void portable_with(const KdaParams& p) {
  using L = portable::Layout<D, VS, CH>;
  simt::run_grid(slice_blocks<L>(p), L::kThreads, L::kSmemBytes, [&](int64_t blk, float* sm, int t) {
    portable::run_block<L>(p, sm, static_cast<int>(blk), t);
  });
}

void portable_body(const KdaParams& p) {  // kda_cuda.cu's Variants<D>: wide, narrow, compact
  const std::string which = env_str("FLASH_KDA_SIM_PORTABLE", "wide");
  constexpr int kWide = D == 256 ? 128 : D, kNarrow = kWide / 2;
  constexpr int kChunk = D == 256 ? 16 : 32;
  if (which == "wide") {
    portable_with<kWide, kChunk>(p);
  } else if (which == "narrow") {
    portable_with<kNarrow, kChunk>(p);
  } else if (which == "compact") {
    portable_with<D == 256 ? 32 : kNarrow, kChunk / 2>(p);
  } else {
    no_layout("portable '" + which + "'");
  }
}

}  // namespace

int64_t workspace_bytes(const KdaParams& p) {
  if (p.num_seqs <= 0 || p.hv <= 0 || env_str("FLASH_KDA_SIM_FORM", "split") != "split") return 0;
  return split_bytes(p);
}

void launch_kda(const KdaParams& p, void*) {
  if (p.head_dim != D) throw std::runtime_error("cuda_sim: compiled for another head dim");
  if (p.num_seqs <= 0 || p.hv <= 0) return;
  const std::string form = env_str("FLASH_KDA_SIM_FORM", "split");
  if (form == "split") {
    split(p);
  } else if (form == "fused") {
    fused(p);
  } else if (form == "portable") {
    portable_body(p);
  } else {
    throw std::runtime_error("cuda_sim: FLASH_KDA_SIM_FORM must be split, fused or portable");
  }
}

}  // namespace flash_kda
