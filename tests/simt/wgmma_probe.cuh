// wgmma_probe.cuh: one wgmma_f16<N> (ptx.cuh) on known operands, for tests/test_wgmma.py.
//
// The same device code runs on the GPU (nvcc, sm_90a) and in the SIMT emulator (simt.h), and both
// are compared with a plain matrix product: this is what says the emulator's model of wgmma — the
// register fragments of A and D, the descriptor's address arithmetic — is the hardware's, for the
// forms the recurrence uses. The shared-memory layout of B is written here from the PTX ISA's
// description (K-major core matrices, no swizzle), independently of kda_split_recurrence.cuh.
//
// Operands as raw fp16 bits: A [64, 16] and Bt [N, 16] (B transposed: row n holds B's column n)
// row-major; D [64, N] fp32 row-major, accumulated into.
#pragma once

namespace flash_kda {
namespace probe {

template <int N>
FLASH_KDA_DEVICE void wgmma_probe(const uint16_t* A, const uint16_t* Bt, float* D, uint16_t* smem, int tid) {
  // B: element (n, k) at byte (n / 8) * SBO + (k / 8) * LBO + (n % 8) * 16 + (k % 8) * 2, with
  // LBO = 128 (the two 8-wide k blocks side by side) and SBO = 256 (8 rows of 16 k each).
  for (int i = tid; i < N * 16; i += 128) {
    const int n = i / 16, k = i % 16;
    smem[(n / 8) * 128 + (k / 8) * 64 + (n % 8) * 8 + k % 8] = Bt[i];
  }
  tc::fence_proxy_async();
  __syncthreads();
  const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  const int r0 = 16 * w + g, r1 = r0 + 8;
  auto pair = [&](int r, int k) {
    return static_cast<uint32_t>(A[r * 16 + k]) | (static_cast<uint32_t>(A[r * 16 + k + 1]) << 16);
  };
  const uint32_t a[4] = {pair(r0, 2 * t), pair(r1, 2 * t), pair(r0, 2 * t + 8), pair(r1, 2 * t + 8)};
  float d[N / 8][4];
  for (int j = 0; j < N / 8; ++j)
    for (int e = 0; e < 4; ++e) d[j][e] = D[(e >= 2 ? r1 : r0) * N + 8 * j + 2 * t + (e & 1)];
  tc::wgmma_fence();
  tc::wgmma_f16<N>(d, a, tc::wgmma_desc(smem, 128, 256));
  tc::wgmma_commit();
  tc::wgmma_wait<0>();
  tc::wgmma_fence_operand(d);
  for (int j = 0; j < N / 8; ++j)
    for (int e = 0; e < 4; ++e) D[(e >= 2 ? r1 : r0) * N + 8 * j + 2 * t + (e & 1)] = d[j][e];
}

}  // namespace probe
}  // namespace flash_kda
