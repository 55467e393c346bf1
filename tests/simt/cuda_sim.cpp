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
//   FLASH_KDA_SIM_STAGES        split: the recurrence's operand buffers, 2 (default) or, at D = 256,
//                               1 (kda_cuda.cu's Split<256> has both)
//   FLASH_KDA_SIM_MMA           split: auto (default: wgmma where the recurrence layout allows it,
//                               as on sm_90a) or mma16 (as on every other arch)
//   FLASH_KDA_SIM_PORTABLE      portable: wide (default), narrow or compact
//   FLASH_KDA_SIM_PIECES        split: cut the call into this many stretches of chunks (dense) or
//                               record slots (varlen)
//                               (as FLASH_KDA_CUDA_PIECES=k forces on a GPU, where unset means
//                               kda_cuda.cu's split_plan rule; here unset means 1). The kernels run
//                               one after the other here: this checks the stretches' ranges and the
//                               carried state, not concurrency.
//   FLASH_KDA_SIM_TRACE         split: 1 prints the schedule (one line per kernel) to stderr
//   FLASH_KDA_SIM_PIECE_ORDER   split with pieces: enqueued (default) or preps-first (see split())
//   FLASH_KDA_SIM_OFFSETS       split: auto (default: the preparation's loads form 32-bit offsets
//                               where tc::offsets_fit_int32 allows, as on a GPU) or int64 (the
//                               64-bit form, which a GPU takes only for tensors past 2^31 elements)
// The split form's scratch (records and carry) is filled with NaN before the first kernel, so a
// record or carry state read before it is written shows in the output.
#include "simt.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <vector>

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
// FLASH_KDA_SIM_PIECES as kda_cuda.cu's FLASH_KDA_CUDA_PIECES (tc::split_pieces: at most one per
// chunk or slot), read at each call.
int64_t pieces_of(const KdaParams& p) { return tc::split_pieces(p, C, env_int("FLASH_KDA_SIM_PIECES", 1)); }

template <class L>
void prep(const KdaParams& p, int64_t c_begin, int64_t c_end) {
  float* scratch = static_cast<float*>(p.workspace);
  tc::PrepGrid g = tc::make_prep_grid<L>(p, c_begin, c_end);
  const std::string offsets = env_str("FLASH_KDA_SIM_OFFSETS", "auto");
  if (offsets == "int64") {
    g.vec.off32 = false;
  } else if (offsets != "auto") {
    throw std::runtime_error("cuda_sim: FLASH_KDA_SIM_OFFSETS must be auto or int64");
  }
  simt::run_grid(tc::prep_blocks(p, C, c_begin, c_end), L::kThreads, L::kSmemBytes, [&](int64_t blk, float* sm, int t) {
    tc::prep_block<L>(p, g, scratch, sm, static_cast<uint32_t>(blk), t);
  });
}

template <int VS, tc::RecurrenceMma kMma, int kStages>
void recurrence_with(const KdaParams& p, const tc::Piece& piece) {
  using L = tc::RecurrenceLayout<D, VS, C, kStages, kMma>;
  const float* scratch = static_cast<const float*>(p.workspace);
  simt::run_grid(slice_blocks<L>(p), L::kThreads, L::kSmemBytes, [&](int64_t blk, float* sm, int t) {
    // kLockstep where the GPU may take it: the emulator's cluster barrier does nothing (blocks run
    // one after another), but the kernel's path with it runs.
    tc::recurrence_block<L, (L::NVS > 1 && L::NVS <= 8)>(p, piece, scratch, sm, static_cast<int>(blk), t);
  });
}

// The operand buffers of kda_cuda.cu's Split<D>: two, or at D = 256 one or two
// (FLASH_KDA_SIM_STAGES, default 2).
template <int VS, tc::RecurrenceMma kMma>
void recurrence_staged(const KdaParams& p, const tc::Piece& piece) {
  const int stages = env_int("FLASH_KDA_SIM_STAGES", 2);
  if (stages == 2) {
    recurrence_with<VS, kMma, 2>(p, piece);
  } else if (stages == 1 && D == 256) {
    recurrence_with<VS, kMma, D == 256 ? 1 : 2>(p, piece);
  } else {
    throw std::runtime_error("cuda_sim: FLASH_KDA_SIM_STAGES must be 2, or 1 at head dim 256");
  }
}

// The products as the GPU's sm_90a pass runs them (wgmma where the layout allows) or, with
// FLASH_KDA_SIM_MMA=mma16, as every other pass does.
template <int VS>
void recurrence(const KdaParams& p, const tc::Piece& piece) {
  const std::string mma = env_str("FLASH_KDA_SIM_MMA", "auto");
  if (mma == "mma16") {
    recurrence_staged<VS, tc::RecurrenceMma::kMma16>(p, piece);
  } else if (mma == "auto") {
    recurrence_staged<VS, tc::RecurrenceMma::kAuto>(p, piece);
  } else {
    throw std::runtime_error("cuda_sim: FLASH_KDA_SIM_MMA must be auto or mma16");
  }
}

void split(const KdaParams& p) {
  if (p.workspace == nullptr) throw std::runtime_error("cuda_sim: no scratch");
  const int64_t pieces = pieces_of(p);
  float* scratch = static_cast<float*>(p.workspace);
  std::fill(scratch, scratch + tc::split_workspace_bytes<D, C>(p, pieces) / 4, std::numeric_limits<float>::quiet_NaN());
  constexpr bool kWide = C * D / 8 >= 512;  // as kda_cuda.cu's PrepWide
  const bool wide = kWide && env_int("FLASH_KDA_SIM_PREP_THREADS", 512) == 512;
  const int vs = env_int("FLASH_KDA_SIM_VS", D == 128 ? 128 : 64);
  if (vs != 32 && vs != 64 && !(D == 128 && vs == 128)) no_layout("recurrence");
  // The launcher's schedule, with the kernels run one after the other (no second stream here).
  // FLASH_KDA_SIM_TRACE=1 prints it to stderr, one line per kernel, for the tests to check.
  // On a GPU, recurrence i waits for preparation i (and for recurrence i - 1), but preparation i + 1
  // does not wait for recurrence i: they may run in either order. FLASH_KDA_SIM_PIECE_ORDER picks
  // the two extremes: `enqueued` (default; recurrence i right after preparation i) or `preps-first`
  // (every preparation, then every recurrence), so that a preparation overwriting what an earlier
  // stretch's recurrence still reads would show.
  const bool trace = env_int("FLASH_KDA_SIM_TRACE", 0) != 0;
  const std::string order = env_str("FLASH_KDA_SIM_PIECE_ORDER", "enqueued");
  if (order != "enqueued" && order != "preps-first") {
    throw std::runtime_error("cuda_sim: FLASH_KDA_SIM_PIECE_ORDER must be enqueued or preps-first");
  }
  const auto run_recurrence = [&](const tc::Piece& piece) {
    if (trace) {
      std::fprintf(stderr, "sim: recurrence [%lld, %s) carry %s\n", static_cast<long long>(piece.c_begin),
                   piece.c_end == tc::kAllChunks ? "end" : std::to_string(piece.c_end).c_str(),
                   piece.carry == nullptr ? "none" : "yes");
    }
    if (vs == 32) {
      recurrence<32>(p, piece);
    } else if (vs == 64) {
      recurrence<64>(p, piece);
    } else if constexpr (D == 128) {
      recurrence<128>(p, piece);
    }
  };
  std::vector<tc::Piece> deferred;
  tc::enqueue_pieces<D, C>(
      p, pieces,
      [&](int64_t c_begin, int64_t c_end) {
        if (trace) std::fprintf(stderr, "sim: prep [%lld, %lld)\n", static_cast<long long>(c_begin), static_cast<long long>(c_end));
        if (wide) {
          prep<tc::PrepLayout<D, C, kWide ? 512 : 256>>(p, c_begin, c_end);
        } else {
          prep<tc::PrepLayout<D, C, 256>>(p, c_begin, c_end);
        }
      },
      [&](const tc::Piece& piece) {
        if (order == "preps-first") {
          deferred.push_back(piece);
        } else {
          run_recurrence(piece);
        }
      });
  for (const tc::Piece& piece : deferred) run_recurrence(piece);
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
  return tc::split_workspace_bytes<D, C>(p, pieces_of(p));
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
