// overlap.cuh: a second stream on which the two-kernel form's recurrence runs beside the preparation
// (kda_cuda.cu, launch_split; plan and arithmetic: docs/next-overlap.md). NVIDIA only, like the
// two-kernel form itself, so it calls the CUDA runtime directly rather than through port.cuh.
//
// A call cut into pieces forks and joins like this (each arrow a cudaStreamWaitEvent):
//     caller's stream:  prep 0 ─┬─ prep 1 ─┬─ ... prep k-1 ─┬─────────────── (waits for `done`) ─ ...
//     side stream:              └─ rec 0 ──┴─ rec 1 ... ─────┴─ rec k-1 ─ `done`
// The side stream is created non-blocking (no implicit ordering with the legacy default stream,
// which would serialise it behind the preparation when the caller runs on stream 0) and at the
// highest priority, so pending recurrence blocks are dispatched before further preparation blocks.
// Nothing on the caller's stream runs after the call's kernels before the join, so memory the
// caller's stream frees afterwards (the workspace) is not reused while the recurrence still reads
// it. Fork and join by events is the pattern CUDA graph capture records as graph edges.
//
// One side stream per (device, caller's stream). A side stream shared by every caller would be
// wrong under capture: once a capture forks into it, the side stream belongs to that capture until
// the capture ends, so another thread's call on another stream would add its work to the graph.
// With one per caller's stream, calls that share a side stream share their caller's stream too,
// and are ordered (or captured) together anyway.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "../port.cuh"

namespace flash_kda {
namespace overlap {

// A side stream and the two events of a fork-join.
struct SideStream {
  cudaStream_t stream;
  cudaEvent_t ready;  // recorded on the caller's stream after a preparation piece
  cudaEvent_t done;   // recorded on the side stream after the last recurrence piece
};

// Held while a call finds its side stream and enqueues its pieces. Host threads calling on the same
// stream share its events, and a wait binds to the event's most recent record at the time of the
// wait call, so their record/wait pairs must not interleave. Enqueueing takes microseconds.
inline std::mutex& enqueue_mutex() {
  static std::mutex mu;
  return mu;
}

// Side streams made so far; each costs a stream and two events for the life of the process. Past
// this many callers' streams a call runs in one piece instead.
constexpr size_t kMaxSideStreams = 64;

// Sets this thread's stream-capture mode to relaxed for its lifetime, then restores it. Inside a
// capture (global or thread-local mode) "potentially unsafe" runtime calls are refused, and the
// CUDA documentation does not list which calls those are; stream and event creation enqueue nothing
// and so cannot change a captured graph, and relaxed mode lets them run (torch does the same for
// its lazily created handles: c10::cuda::CUDAStreamCaptureModeGuard).
struct RelaxedCaptureMode {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  RelaxedCaptureMode() {
    port::check(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
  }
  ~RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;
};

// The side stream of `caller` on `device` (the current device), made on first use (also inside a
// capture of `caller`); null once kMaxSideStreams are made: the call then runs in one piece. Call
// with enqueue_mutex() held.
inline const SideStream* side_stream(int device, cudaStream_t caller) {
  // (cudaStreamPerThread is one handle for a different stream in each thread: keyed by thread too.)
  using Key = std::tuple<int, cudaStream_t, std::thread::id>;
  static std::map<Key, SideStream> made;
  const Key key{device, caller, caller == cudaStreamPerThread ? std::this_thread::get_id() : std::thread::id()};
  const auto it = made.find(key);
  if (it != made.end()) return &it->second;
  if (made.size() >= kMaxSideStreams) return nullptr;
  const RelaxedCaptureMode relaxed;
  SideStream s{};
  int least = 0, greatest = 0;
  port::check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
  port::check(cudaStreamCreateWithPriority(&s.stream, cudaStreamNonBlocking, greatest),
              "cudaStreamCreateWithPriority");
  port::check(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  port::check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return &made.emplace(key, s).first->second;
}

// `waiter` waits for the work enqueued so far on `from` (through `event`).
inline void order_after(cudaStream_t waiter, cudaStream_t from, cudaEvent_t event) {
  port::check(cudaEventRecord(event, from), "cudaEventRecord");
  port::check(cudaStreamWaitEvent(waiter, event, 0), "cudaStreamWaitEvent");
}

}  // namespace overlap
}  // namespace flash_kda
