// kda_params.h: the one description of a KDA forward problem that every backend's kernel reads.
//
// Plain data only (no torch, no CUDA headers) so that the host binding (binding.cpp, compiled by the
// host C++ compiler), the CPU kernel, and the CUDA/MUSA device code can all include it.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__MUSACC__)
#define FLASH_KDA_HD __host__ __device__ __forceinline__
#else
#define FLASH_KDA_HD inline
#endif

namespace flash_kda {

// Element strides of a token-major tensor [batch, token, head, (dim)]; the last dim is contiguous.
// The element offset of (batch b, token t, head h) is b * batch + t * token + h * head.
struct TokenStrides {
  int64_t batch;
  int64_t token;
  int64_t head;
};

// Element strides of a state tensor [seq, head, V, K]; K is contiguous.
struct StateStrides {
  int64_t seq;
  int64_t head;
  int64_t row;
};

struct KdaParams {
  // ---- sizes ----
  int num_seqs;          // N: batch size (dense) or len(cu_seqlens) - 1 (varlen)
  int64_t seq_len;       // dense: T; varlen: total tokens S (used to clamp cu_seqlens)
  int hqk;               // query/key heads
  int hv;                // value heads; hv % hqk == 0
  int head_dim;          // K == V

  // ---- token-major inputs and the output ----
  const void* q;  TokenStrides q_strides;   // [.., T, hqk, K]   input dtype
  const void* k;  TokenStrides k_strides;   // [.., T, hqk, K]   input dtype
  const void* v;  TokenStrides v_strides;   // [.., T, hv, V]    input dtype
  const void* g;  TokenStrides g_strides;   // [.., T, hv, K]    input dtype, or fp32 if g_fp32
  const void* beta; TokenStrides beta_strides;  // [.., T, hv]   input dtype, or fp32 if beta_fp32
  void* out;      TokenStrides out_strides; // [.., T, hv, V]    input dtype
  bool g_fp32;
  bool beta_fp32;

  // ---- gate parameters (both null: g is already the log-decay) ----
  const float* A_log;        // [hv]
  const float* dt_bias;      // [hv, K]
  int64_t dt_bias_head_stride;
  float lower_bound;

  // ---- states (value-major [N, hv, V, K]); initial_state may equal final_state (in place) ----
  const void* initial_state; StateStrides h0_strides;  // may be null
  void* final_state;         StateStrides ht_strides;  // may be null
  bool state_fp32;           // states are fp32; otherwise the input dtype

  // ---- varlen ----
  const void* cu_seqlens;    // null: dense
  bool cu_seqlens_int64;

  float scale;
  bool use_qk_l2norm;

  // ---- scratch (device memory of workspace_bytes(*this) bytes, 16-byte aligned; null: none) ----
  // The CUDA tensor-core path's two-kernel form needs it; without it the launcher uses a fused
  // kernel that needs none.
  void* workspace;
};

// Token range of sequence n and its offset (in tokens, within batch index) into the token-major tensors.
struct SeqRange {
  int64_t batch;   // batch index to use with TokenStrides::batch
  int64_t start;   // first token index to use with TokenStrides::token
  int64_t len;     // number of tokens
};

// cu_seqlens[m] of a varlen call, clamped to [0, seq_len]: sequence n spans [boundary n, boundary n + 1).
// With varlen_range below, cu_seqlens is read defensively: values are clamped to [0, seq_len] and made
// non-decreasing, so a malformed cu_seqlens can never make a kernel touch memory outside the tensors
// (the Python front end rejects such input before launching; this is the second line of defence).
FLASH_KDA_HD int64_t cu_boundary(const KdaParams& p, int m) {
  const int64_t a = p.cu_seqlens_int64 ? static_cast<const int64_t*>(p.cu_seqlens)[m]
                                       : static_cast<const int32_t*>(p.cu_seqlens)[m];
  return a < 0 ? 0 : (a > p.seq_len ? p.seq_len : a);
}

// Sequence n's tokens from its two clamped boundaries (the end raised to the start if below it).
FLASH_KDA_HD SeqRange varlen_range(int64_t a, int64_t b) {
  SeqRange r;
  r.batch = 0;
  r.start = a;
  r.len = b < a ? 0 : b - a;
  return r;
}

// Sequence n's tokens, dense or varlen.
FLASH_KDA_HD SeqRange seq_range(const KdaParams& p, int n) {
  if (p.cu_seqlens == nullptr) {
    SeqRange r;
    r.batch = n;
    r.start = 0;
    r.len = p.seq_len;
    return r;
  }
  return varlen_range(cu_boundary(p, n), cu_boundary(p, n + 1));
}

FLASH_KDA_HD int64_t token_offset(const TokenStrides& s, const SeqRange& r, int64_t t, int h) {
  return r.batch * s.batch + (r.start + t) * s.token + static_cast<int64_t>(h) * s.head;
}

FLASH_KDA_HD int64_t state_offset(const StateStrides& s, int n, int h, int row) {
  return static_cast<int64_t>(n) * s.seq + static_cast<int64_t>(h) * s.head +
         static_cast<int64_t>(row) * s.row;
}

// Runs the forward pass described by p on the backend this module was compiled for.
// `stream` is the backend's stream handle (cudaStream_t / musaStream_t), null on CPU.
// Compiled once per specialisation: FLASH_KDA_HEAD_DIM and the FLASH_KDA_DTYPE_* macro fix the
// head dim and the input dtype; the binding checks that the tensors match before calling.
void launch_kda(const KdaParams& p, void* stream);

// Bytes of workspace launch_kda would use for p on the current device (0: it needs none). The
// binding allocates that much (or takes the caller's workspace) and sets p.workspace.
int64_t workspace_bytes(const KdaParams& p);

}  // namespace flash_kda
