// Does compute-sanitizer's racecheck report a hazard where there is none, after a named barrier
// that only some warps of the block use? (docs/performance.md v13: racecheck reported 48 hazards
// in the `wgmma` branch's preparation between `red[warp] = m`, a full-block barrier and the read
// of red[lane]; that write-barrier-read is race-free by construction, and it follows a phase in
// which warps 1..15 synchronise on named barrier 1 while warp 0 works alone.)
//
//     nvcc -arch=sm_90 -o /tmp/racecheck_probe tools/racecheck_probe.cu
//     compute-sanitizer --tool racecheck /tmp/racecheck_probe subset   # the preparation's pattern
//     compute-sanitizer --tool racecheck /tmp/racecheck_probe full     # the same without barrier 1
//     ... /tmp/racecheck_probe subset slow                               # warp 0 late, as in the kernel
//
// Every variant is race-free (every shared location is written, then read after a barrier that
// all its writers and readers take part in) and prints the same block maximum. Had racecheck
// reported a hazard for `subset` only, the preparation's report would have been the tool's. It
// reported none for any variant (H200, compute-sanitizer 2025.3.1, session 14): the probe does
// not reproduce the report, so it neither convicts nor clears the kernel (docs/performance.md v14).
#include <cstdio>
#include <cstring>

constexpr int kThreads = 512, kWarps = kThreads / 32, kRest = kThreads - 32;

__device__ float warp_max(float v) {
  for (int m = 16; m >= 1; m /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

template <bool kSubsetBarrier>
__global__ void __launch_bounds__(kThreads) probe(float* out, long long spin) {
  __shared__ float own[kThreads];   // warps 1..15: written and read across warps (barrier 1)
  __shared__ float solo[32];        // warp 0's alone
  __shared__ float red[kWarps];     // the block-wide maximum, as store_w_f16 forms it
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (warp == 0) {
    // warp 0 can be made slow (as the preparation's T inversion is), so that warps 1..15 pass
    // barrier 1 before warp 0 reaches the block barrier
    for (const long long t0 = clock64(); clock64() - t0 < spin;) {
    }
    solo[lane] = static_cast<float>(lane);
    __syncwarp();
    out[kThreads + lane] = solo[31 - lane];
  } else {
    own[tid] = static_cast<float>(tid);
    if constexpr (kSubsetBarrier) {
      asm volatile("bar.sync 1, %0;" ::"n"(kRest) : "memory");  // warps 1..15 only
      out[tid] = own[kThreads + 31 - tid];                       // another warp's element
    } else {
      out[tid] = own[tid];
    }
  }
  __syncthreads();
  const float m = warp_max(static_cast<float>(tid));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  const float all = warp_max(lane < kWarps ? red[lane] : 0.0f);
  if (tid == 0) out[kThreads + 32] = all;
}

int main(int argc, char** argv) {
  const bool subset = argc > 1 && std::strcmp(argv[1], "subset") == 0;
  const long long spin = argc > 2 && std::strcmp(argv[2], "slow") == 0 ? 1000000 : 0;
  float* out = nullptr;
  cudaMalloc(&out, (kThreads + 33) * sizeof(float));
  if (subset) {
    probe<true><<<4, kThreads>>>(out, spin);
  } else {
    probe<false><<<4, kThreads>>>(out, spin);
  }
  float host[kThreads + 33];
  const cudaError_t err = cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    std::printf("error: %s\n", cudaGetErrorString(err));
    return 1;
  }
  std::printf("%s%s: block maximum %.0f (expected %d)\n", subset ? "subset" : "full", spin ? " slow" : "",
              host[kThreads + 32], kThreads - 1);
  cudaFree(out);
  return host[kThreads + 32] == kThreads - 1 ? 0 : 2;
}
