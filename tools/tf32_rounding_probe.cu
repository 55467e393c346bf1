// Do the GPU's fp32 -> TF32 conversions give exactly what ptx.cuh's round_tf32 assumes? Every one of
// the 2^32 fp32 bit patterns is converted with cvt.rna.tf32.f32 (ties away from zero; what builds
// for sm_80-sm_89 use) and cvt.rn.tf32.f32 (ties to even; sm_90 and newer, one F2FP instruction
// where ptxas emulates rna in three), and each result is compared with its definition written as
// integer arithmetic: the fp32 bits rounded at bit 13, the low 13 bits cleared (the emulator's
// round_tf32, tests/simt/simt.h, is the rn line). A NaN must stay a NaN (any payload).
//
//     nvcc -arch=sm_90 -o /tmp/tf32_rounding_probe tools/tf32_rounding_probe.cu && /tmp/tf32_rounding_probe
//
// Prints, per conversion, the patterns that differ from the definition (and the first few); exit
// status 1 if any differ. Run on an H100 in session 22 (docs/performance.md v22).
#include <cstdint>
#include <cstdio>

struct Tally {
  unsigned long long wrong[2];   // rna, rn
  unsigned long long zero_low[2];  // results whose low 13 bits are all zero (every non-NaN should)
  unsigned first[2][4];          // up to four differing inputs each
  unsigned got[2][4];
};

__device__ __forceinline__ bool is_nan_bits(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

__device__ __forceinline__ uint32_t cvt_rna(uint32_t u) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(u)));
  return r;
}
__device__ __forceinline__ uint32_t cvt_rn(uint32_t u) {
  uint32_t r;
  asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(u)));
  return r;
}

__device__ void record(Tally* t, int k, uint32_t in, uint32_t out) {
  const unsigned long long n = atomicAdd(&t->wrong[k], 1ull);
  if (n < 4) {
    t->first[k][n] = in;
    t->got[k][n] = out;
  }
}

__global__ void probe(Tally* t) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  unsigned long long zero_low[2] = {0, 0};
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
    const uint32_t u = static_cast<uint32_t>(i);
    const uint32_t got[2] = {cvt_rna(u), cvt_rn(u)};
    const uint32_t want[2] = {(u + 0x1000u) & 0xffffe000u, (u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u};
    for (int k = 0; k < 2; ++k) {
      zero_low[k] += (got[k] & 0x1fffu) == 0;
      const bool ok = is_nan_bits(u) ? is_nan_bits(got[k]) : got[k] == want[k];
      if (!ok) record(t, k, u, got[k]);
    }
  }
  for (int k = 0; k < 2; ++k) atomicAdd(&t->zero_low[k], zero_low[k]);
}

int main() {
  Tally* d = nullptr;
  if (cudaMalloc(&d, sizeof(Tally)) != cudaSuccess || cudaMemset(d, 0, sizeof(Tally)) != cudaSuccess) {
    std::printf("no device memory\n");
    return 2;
  }
  probe<<<132 * 16, 256>>>(d);
  Tally h{};
  const cudaError_t err = cudaMemcpy(&h, d, sizeof(Tally), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(err));
    return 2;
  }
  const char* names[2] = {"cvt.rna.tf32.f32 (ties away)", "cvt.rn.tf32.f32 (ties to even)"};
  const unsigned long long nan_count = 2ull * ((1ull << 23) - 1);  // both signs
  for (int k = 0; k < 2; ++k) {
    std::printf("%-32s differs from its definition on %llu of 2^32 patterns; low 13 bits zero on %llu "
                "(non-NaN patterns: %llu)\n",
                names[k], h.wrong[k], h.zero_low[k], (1ull << 32) - nan_count);
    for (unsigned long long n = 0; n < h.wrong[k] && n < 4; ++n) {
      std::printf("    in 0x%08x -> 0x%08x\n", h.first[k][n], h.got[k][n]);
    }
  }
  return h.wrong[0] + h.wrong[1] == 0 ? 0 : 1;
}
