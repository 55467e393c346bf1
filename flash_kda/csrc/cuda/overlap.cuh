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
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

#include "../port.cuh"

namespace flash_kda {
namespace overlap {

// The side stream of one device and the two events of a fork-join. Made on first use, kept for the
// life of the process (one stream and two events per device).
struct SideStream {
  cudaStream_t stream;
  cudaEvent_t ready;  // recorded on the caller's stream after a preparation piece
  cudaEvent_t done;   // recorded on the side stream after the last recurrence piece
};

// Held while a call enqueues its pieces: the events are shared by every call on the device, and a
// wait binds to the event's most recent record at the time of the wait call, so two host threads
// must not interleave their record/wait pairs. Enqueueing takes microseconds.
inline std::mutex& enqueue_mutex() {
  static std::mutex mu;
  return mu;
}

// The side stream of `device` (the current device). Call with enqueue_mutex() held.
inline const SideStream& side_stream(int device) {
  static std::unordered_map<int, SideStream> made;
  auto it = made.find(device);
  if (it != made.end()) return it->second;
  SideStream s{};
  int least = 0, greatest = 0;
  port::check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
  port::check(cudaStreamCreateWithPriority(&s.stream, cudaStreamNonBlocking, greatest),
              "cudaStreamCreateWithPriority");
  port::check(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  port::check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return made.emplace(device, s).first->second;
}

// `waiter` waits for the work enqueued so far on `from` (through `event`).
inline void order_after(cudaStream_t waiter, cudaStream_t from, cudaEvent_t event) {
  port::check(cudaEventRecord(event, from), "cudaEventRecord");
  port::check(cudaStreamWaitEvent(waiter, event, 0), "cudaStreamWaitEvent");
}

}  // namespace overlap
}  // namespace flash_kda
