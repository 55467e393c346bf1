// binding.cpp: registers this specialisation's kernel as a torch operator and turns tensors into
// KdaParams (kda_fwd, which python_entry.cpp also calls, past torch's dispatcher). Compiled by the
// host C++ compiler for every backend; it never sees device code.
//
// The TORCH_CHECKs below check every argument (the front end's fast path relies on them and runs
// flash_kda/_validate.py's checks, which name the problem, only when they refuse), so that no call
// of the raw op or of the direct entry can make a kernel read or write outside its tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "binding.h"
#include "kda_params.h"

#if defined(FLASH_KDA_BACKEND_CUDA)
#include <ATen/Context.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/version.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FLASH_KDA_DISPATCH_KEY CUDA
#elif defined(FLASH_KDA_BACKEND_MUSA)
#include "torch_musa/csrc/core/MUSAGuard.h"
#include "torch_musa/csrc/core/MUSAStream.h"
#define FLASH_KDA_DISPATCH_KEY PrivateUse1
#elif defined(FLASH_KDA_BACKEND_CPU)
#define FLASH_KDA_DISPATCH_KEY CPU
#else
#error "define one of FLASH_KDA_BACKEND_{CPU,CUDA,MUSA}"
#endif

#if !defined(FLASH_KDA_OP_NAME) || !defined(FLASH_KDA_HEAD_DIM)
#error "FLASH_KDA_OP_NAME and FLASH_KDA_HEAD_DIM come from the JIT spec"
#endif

#if defined(FLASH_KDA_DTYPE_BF16)
static constexpr c10::ScalarType kInputDtype = c10::ScalarType::BFloat16;
#elif defined(FLASH_KDA_DTYPE_FP16)
static constexpr c10::ScalarType kInputDtype = c10::ScalarType::Half;
#elif defined(FLASH_KDA_DTYPE_FP32)
static constexpr c10::ScalarType kInputDtype = c10::ScalarType::Float;
#else
#error "define one of FLASH_KDA_DTYPE_{BF16,FP16,FP32}"
#endif

#define FLASH_KDA_STR2(x) #x
#define FLASH_KDA_STR(x) FLASH_KDA_STR2(x)

namespace {

using flash_kda::KdaParams;
using flash_kda::StateStrides;
using flash_kda::TokenStrides;

// View a [B, T, H, D] (or [B, T, H] for beta) tensor as token-major strides.
TokenStrides token_strides(const at::Tensor& t, const char* name, int64_t heads, int64_t dim) {
  const bool has_dim = dim > 0;
  TORCH_CHECK(t.dim() == (has_dim ? 4 : 3), name, ": expected ", (has_dim ? 4 : 3), " dims, got ",
              t.sizes());
  TORCH_CHECK(t.size(2) == heads, name, ": expected ", heads, " heads, got ", t.size(2));
  if (has_dim) {
    TORCH_CHECK(t.size(3) == dim && (t.stride(3) == 1 || t.numel() == 0), name,
                ": last dim must be ", dim, " and contiguous");
  }
  return TokenStrides{t.stride(0), t.stride(1), t.stride(2)};
}

StateStrides state_strides(const at::Tensor& s, const char* name, int64_t n, int64_t h, int64_t d) {
  TORCH_CHECK(s.dim() == 4 && s.size(0) == n && s.size(1) == h && s.size(2) == d && s.size(3) == d,
              name, ": expected [", n, ", ", h, ", ", d, ", ", d, "], got ", s.sizes());
  TORCH_CHECK(s.stride(3) == 1 || s.numel() == 0, name, ": last dim must be contiguous");
  return StateStrides{s.stride(0), s.stride(1), s.stride(2)};
}

// The prefix of every argument error this op raises. flash_kda.fwd and chunk_kda call the op first
// without their own checks (they cost more host time than the kernels' launch); on an error with
// this prefix they run their Python checks, which name the problem precisely
// (flash_kda/_validate.py). So these checks must reject at least everything that those do.
constexpr const char* kInvalid = "flash_kda: invalid arguments: ";

// [first, last] byte address a tensor's elements touch (strides already checked non-negative).
struct Span {
  uintptr_t first = 0, last = 0;
  bool empty = true;
};
Span span_of(const at::Tensor& t) {
  Span s;
  if (t.numel() == 0) return s;
  int64_t extent = 0;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  s.first = reinterpret_cast<uintptr_t>(t.data_ptr());
  s.last = s.first + static_cast<uintptr_t>((extent + 1) * t.element_size()) - 1;
  s.empty = false;
  return s;
}
bool meet(const Span& a, const Span& b) {
  return !a.empty && !b.empty && a.first <= b.last && b.first <= a.last;
}
// Two elements at one address (an expanded view): not a valid destination.
bool internal_overlap(const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims with size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 1;
  for (const auto& [stride, size] : dims) {
    if (stride < reach) return true;
    reach = stride * size;
  }
  return false;
}

// Devices, strides and memory: every tensor on q's device with non-negative strides; no
// destination (out, final_state) with overlapping elements or sharing memory with an input or
// with the other destination (an in-place state update comes as final_state alone, no
// initial_state); a workspace sharing memory with no argument.
void check_memory(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                  const at::Tensor& beta, const std::optional<at::Tensor>& A_log,
                  const std::optional<at::Tensor>& dt_bias,
                  const std::optional<at::Tensor>& initial_state,
                  const std::optional<at::Tensor>& final_state, const at::Tensor& out,
                  const std::optional<at::Tensor>& cu_seqlens,
                  const std::optional<at::Tensor>& workspace) {
  std::vector<const at::Tensor*> inputs{&q, &k, &v, &g, &beta};
  for (const auto* opt : {&A_log, &dt_bias, &cu_seqlens, &initial_state}) {
    if (opt->has_value()) inputs.push_back(&opt->value());
  }
  std::vector<const at::Tensor*> all = inputs;
  all.push_back(&out);
  if (final_state.has_value()) all.push_back(&final_state.value());
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device() == q.device(), "every tensor must be on q's device");
    for (int64_t d = 0; d < t->dim(); ++d) TORCH_CHECK(t->stride(d) >= 0, "negative strides");
  }
  TORCH_CHECK(beta.dim() != 3 || beta.size(2) <= 1 || beta.stride(2) == 1,
              "beta: the last dim must be contiguous");
  // The inputs' spans (initial_state last: final_state may be it)
  std::vector<Span> in_spans;
  for (const at::Tensor* t : inputs) in_spans.push_back(span_of(*t));
  const size_t n_plain = in_spans.size() - (initial_state.has_value() ? 1 : 0);
  const Span out_span = span_of(out);
  TORCH_CHECK(!internal_overlap(out), "out has overlapping elements");
  for (const Span& s : in_spans) TORCH_CHECK(!meet(out_span, s), "out overlaps an input");
  Span state_span;
  if (final_state.has_value()) {
    state_span = span_of(*final_state);
    TORCH_CHECK(!internal_overlap(*final_state), "final_state has overlapping elements");
    for (size_t i = 0; i < n_plain; ++i) {
      TORCH_CHECK(!meet(state_span, in_spans[i]), "final_state overlaps an input");
    }
    // (in place: the op gets final_state alone; otherwise the two must not meet)
    if (initial_state.has_value()) TORCH_CHECK(!meet(state_span, in_spans.back()), "the states overlap");
    TORCH_CHECK(!meet(state_span, out_span), "out overlaps final_state");
  }
  if (workspace.has_value() && workspace->defined()) {
    TORCH_CHECK(workspace->device() == q.device(), "workspace must be on q's device");
    const Span w = span_of(*workspace);
    for (const Span& s : in_spans) TORCH_CHECK(!meet(w, s), "workspace overlaps an input");
    TORCH_CHECK(!meet(w, out_span) && !meet(w, state_span), "workspace overlaps a destination");
  }
}

// Every check on the arguments, then the problem as plain data. Throws c10::Error (kda_fwd turns
// it into a ValueError with kInvalid in front) before anything is allocated, launched or written.
KdaParams checked_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& g, const at::Tensor& beta,
                         const std::optional<at::Tensor>& A_log,
                         const std::optional<at::Tensor>& dt_bias,
                         const std::optional<at::Tensor>& initial_state,
                         const std::optional<at::Tensor>& final_state, const at::Tensor& out,
                         const std::optional<at::Tensor>& cu_seqlens, double scale,
                         double lower_bound, bool use_qk_l2norm, bool state_in_place,
                         const std::optional<at::Tensor>& workspace) {
  constexpr int64_t D = FLASH_KDA_HEAD_DIM;
  TORCH_CHECK(q.scalar_type() == kInputDtype && k.scalar_type() == kInputDtype &&
                  v.scalar_type() == kInputDtype && out.scalar_type() == kInputDtype,
              "q, k, v, out must be ", kInputDtype, " for this specialisation");
  const int64_t B = q.size(0), T = q.size(1), hqk = q.size(2), hv = v.size(2);
  TORCH_CHECK(hqk > 0 && hv % hqk == 0, "value heads must be a multiple of query/key heads");
  // KdaParams holds head and sequence counts as int (the kernels' block indices): a count past
  // 2^31 - 1 would wrap (a negative sequence count runs nothing and reports success).
  constexpr int64_t kIntMax = 2147483647;
  const int64_t seqs = cu_seqlens.has_value() ? cu_seqlens->numel() - 1 : B;
  TORCH_CHECK(hv <= kIntMax && seqs <= kIntMax, "head and sequence counts must be below 2^31");

  KdaParams p{};
  p.seq_len = T;
  p.hqk = static_cast<int>(hqk);
  p.hv = static_cast<int>(hv);
  p.head_dim = static_cast<int>(D);

  auto same_tokens = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.size(0) == B && t.size(1) == T, name, ": batch/token dims differ from q");
  };
  p.q = q.data_ptr();   p.q_strides = token_strides(q, "q", hqk, D);
  p.k = k.data_ptr();   p.k_strides = token_strides(k, "k", hqk, D);     same_tokens(k, "k");
  p.v = v.data_ptr();   p.v_strides = token_strides(v, "v", hv, D);      same_tokens(v, "v");
  p.g = g.data_ptr();   p.g_strides = token_strides(g, "g", hv, D);      same_tokens(g, "g");
  p.beta = beta.data_ptr(); p.beta_strides = token_strides(beta, "beta", hv, 0);
  same_tokens(beta, "beta");
  p.out = out.data_ptr(); p.out_strides = token_strides(out, "out", hv, D); same_tokens(out, "out");
  TORCH_CHECK(g.scalar_type() == kInputDtype || g.scalar_type() == c10::ScalarType::Float,
              "g must be the input dtype or float32");
  TORCH_CHECK(beta.scalar_type() == kInputDtype || beta.scalar_type() == c10::ScalarType::Float,
              "beta must be the input dtype or float32");
  p.g_fp32 = g.scalar_type() == c10::ScalarType::Float;
  p.beta_fp32 = beta.scalar_type() == c10::ScalarType::Float;

  TORCH_CHECK(A_log.has_value() == dt_bias.has_value(), "A_log and dt_bias come together");
  if (A_log.has_value()) {
    TORCH_CHECK(A_log->scalar_type() == c10::ScalarType::Float && A_log->dim() == 1 &&
                    A_log->size(0) == hv && (hv == 1 || A_log->stride(0) == 1),
                "A_log must be float32 [hv] contiguous");
    TORCH_CHECK(dt_bias->scalar_type() == c10::ScalarType::Float && dt_bias->dim() == 2 &&
                    dt_bias->size(0) == hv && dt_bias->size(1) == D && dt_bias->stride(1) == 1,
                "dt_bias must be float32 [hv, K] with a contiguous last dim");
    p.A_log = A_log->data_ptr<float>();
    p.dt_bias = dt_bias->data_ptr<float>();
    p.dt_bias_head_stride = dt_bias->stride(0);
  }
  p.lower_bound = static_cast<float>(lower_bound);

  if (cu_seqlens.has_value()) {
    TORCH_CHECK(B == 1, "varlen needs batch size 1");
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 1 && cu_seqlens->is_contiguous(),
                "cu_seqlens must be a contiguous 1-D tensor");
    TORCH_CHECK(cu_seqlens->scalar_type() == c10::ScalarType::Int ||
                    cu_seqlens->scalar_type() == c10::ScalarType::Long,
                "cu_seqlens must be int32 or int64");
    TORCH_CHECK(cu_seqlens->device() == q.device(), "cu_seqlens must be on q's device");
    p.cu_seqlens = cu_seqlens->data_ptr();
    p.cu_seqlens_int64 = cu_seqlens->scalar_type() == c10::ScalarType::Long;
  }
  p.num_seqs = static_cast<int>(seqs);  // (checked above to fit; cu_seqlens is 1-D by now)

  const std::optional<at::Tensor>& h0 = state_in_place ? final_state : initial_state;
  TORCH_CHECK(!state_in_place || final_state.has_value(), "state_in_place needs final_state");
  c10::ScalarType state_dtype = c10::ScalarType::Undefined;
  for (const auto* s : {&h0, &final_state}) {
    if (!s->has_value()) continue;
    TORCH_CHECK((*s)->scalar_type() == c10::ScalarType::Float || (*s)->scalar_type() == kInputDtype,
                "states must be float32 or the input dtype");
    TORCH_CHECK(state_dtype == c10::ScalarType::Undefined || state_dtype == (*s)->scalar_type(),
                "initial_state and final_state dtypes differ");
    state_dtype = (*s)->scalar_type();
  }
  p.state_fp32 = state_dtype == c10::ScalarType::Float;
  if (h0.has_value()) {
    p.initial_state = h0->data_ptr();
    p.h0_strides = state_strides(*h0, "initial_state", p.num_seqs, hv, D);
  }
  if (final_state.has_value()) {
    p.final_state = final_state->data_ptr();
    p.ht_strides = state_strides(*final_state, "final_state", p.num_seqs, hv, D);
  }
  p.scale = static_cast<float>(scale);
  p.use_qk_l2norm = use_qk_l2norm;

  check_memory(q, k, v, g, beta, A_log, dt_bias,
               state_in_place ? std::optional<at::Tensor>() : initial_state,
               final_state, out, cu_seqlens, workspace);
  // (as the kernels take them: fp32)
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)) && std::isfinite(static_cast<float>(lower_bound)),
              "scale and lower_bound must be finite in fp32");
  return p;
}

}  // namespace

namespace flash_kda {

void kda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
             const at::Tensor& beta, const std::optional<at::Tensor>& A_log,
             const std::optional<at::Tensor>& dt_bias,
             const std::optional<at::Tensor>& initial_state,
             const std::optional<at::Tensor>& final_state, const at::Tensor& out,
             const std::optional<at::Tensor>& cu_seqlens, double scale, double lower_bound,
             bool use_qk_l2norm, bool state_in_place,
             const std::optional<at::Tensor>& workspace) {
  KdaParams p;
  try {
    p = checked_params(q, k, v, g, beta, A_log, dt_bias, initial_state, final_state, out, cu_seqlens,
                       scale, lower_bound, use_qk_l2norm, state_in_place, workspace);
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, kInvalid, e.what_without_backtrace());
  }
  if (p.num_seqs == 0) return;  // no sequences: nothing to read or write

#if defined(FLASH_KDA_BACKEND_CUDA)
  const c10::cuda::CUDAGuard guard(q.device());
  void* stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
#elif defined(FLASH_KDA_BACKEND_MUSA)
  const c10::musa::MUSAGuard guard(q.device());
  void* stream = c10::musa::getCurrentMUSAStream(q.device().index()).stream();
#else
  void* stream = nullptr;
#endif
  // Scratch for the kernels that want it: the caller's workspace when it is usable (on q's device,
  // contiguous, 16-byte aligned, big enough), else a block from torch's caching allocator
  // (stream-ordered: the block is not handed to other work on this stream before the kernels are
  // done with it). An unusable workspace is not an error. If the allocation fails the launcher uses
  // a kernel form that needs none, so a large call still runs.
  // On CUDA the block comes from the allocator itself, not as a tensor: the same block, tagged with
  // the current stream and given back when `block` goes out of scope as a tensor's storage would
  // be, without at::empty's dispatch and tensor object (~1 us of a call's host time on the H100's
  // host, docs/performance.md v23). Other backends allocate a tensor.
  c10::DataPtr block;
  at::Tensor scratch;
  const int64_t scratch_bytes = flash_kda::workspace_bytes(p);
  if (scratch_bytes > 0) {
    if (workspace.has_value() && workspace->defined() && workspace->device() == q.device() &&
        workspace->is_contiguous() &&
        static_cast<int64_t>(workspace->nbytes()) >= scratch_bytes &&
        reinterpret_cast<std::uintptr_t>(workspace->data_ptr()) % 16 == 0) {
      p.workspace = workspace->data_ptr();
    } else {
      try {
#if defined(FLASH_KDA_BACKEND_CUDA)
        // (at::empty initialises torch's CUDA side first; the allocator asserts that it was. A
        // caller's tensors need not have done it: libtorch's from_blob, say. Once per process.)
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
        at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
#else
        at::globalContext().lazyInitCUDA();
#endif
        block = c10::cuda::CUDACachingAllocator::get()->allocate(static_cast<size_t>(scratch_bytes));
        p.workspace = block.get();
#else
        scratch = at::empty({scratch_bytes}, q.options().dtype(at::kByte));
        p.workspace = scratch.data_ptr();
#endif
      } catch (const c10::OutOfMemoryError&) {
        p.workspace = nullptr;
      }
    }
  }
  flash_kda::launch_kda(p, stream);
}

}  // namespace flash_kda

TORCH_LIBRARY_FRAGMENT(flash_kda_kernels, m) {
  m.def(FLASH_KDA_STR(FLASH_KDA_OP_NAME)
        "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor? A_log, Tensor? dt_bias, "
        "Tensor? initial_state, Tensor(a!)? final_state, Tensor(b!) out, Tensor? cu_seqlens, "
        "float scale, float lower_bound, bool use_qk_l2norm, bool state_in_place, "
        "Tensor(c!)? workspace=None) -> ()");
}

TORCH_LIBRARY_IMPL(flash_kda_kernels, FLASH_KDA_DISPATCH_KEY, m) {
  m.impl(FLASH_KDA_STR(FLASH_KDA_OP_NAME), &flash_kda::kda_fwd);
}
