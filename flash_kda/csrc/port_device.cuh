// port_device.cuh: the device-side helpers of port.cuh — conversions to and from the input
// dtype, loads and stores of buffers that hold fp32 or the input dtype, math, the block barrier.
//
// Included by port.cuh after it defines the 16-bit types (port::fp16_t, bf16_t) and
// FLASH_KDA_DEVICE; tests/simt/simt.h includes it the same way over its CPU stand-ins for those
// types and for the built-ins used here (__half2float, __syncthreads, ...).
#ifndef FLASH_KDA_PORT_DEVICE_CUH_
#define FLASH_KDA_PORT_DEVICE_CUH_

#include <stdint.h>

namespace flash_kda {
namespace port {

// The input element type of this specialisation (q, k, v, out; g, beta and the states may be fp32).
#if defined(FLASH_KDA_DTYPE_BF16)
using input_t = bf16_t;
#elif defined(FLASH_KDA_DTYPE_FP16)
using input_t = fp16_t;
#else
#error "port_device.cuh: define FLASH_KDA_DTYPE_BF16 or FLASH_KDA_DTYPE_FP16"
#endif

// ---------------------------------------------------------------------------------------------
// Conversions (device)
// ---------------------------------------------------------------------------------------------
FLASH_KDA_DEVICE float to_float(float x) { return x; }
FLASH_KDA_DEVICE float to_float(fp16_t x) { return __half2float(x); }
FLASH_KDA_DEVICE float to_float(bf16_t x) { return __bfloat162float(x); }

// Two input elements packed in a 32-bit word (lo: the one at the lower address), as floats. A bf16
// is the top half of an fp32, so lo is a shift and hi a mask: 2 instructions a word, where the
// compiler's own conversion moves the high half down first (a byte permute) and then shifts it
// back up (3 a word; 16 of the preparation's ~395 load-phase instructions a thread at D = 128).
FLASH_KDA_DEVICE void to_float2(uint32_t w, float& lo, float& hi) {
#if defined(FLASH_KDA_DTYPE_BF16)
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
#else
  input_t h[2];
  memcpy(h, &w, sizeof(h));  // (the two halves as the input type, without type punning)
  lo = to_float(h[0]);
  hi = to_float(h[1]);
#endif
}

template <class T>
FLASH_KDA_DEVICE T from_float(float x);
template <>
FLASH_KDA_DEVICE float from_float<float>(float x) { return x; }
template <>
FLASH_KDA_DEVICE fp16_t from_float<fp16_t>(float x) { return __float2half_rn(x); }
template <>
FLASH_KDA_DEVICE bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }

// Element `i` of a buffer that holds either fp32 or the input dtype (g, beta, states).
FLASH_KDA_DEVICE float load_as_float(const void* base, int64_t i, bool is_fp32) {
  return is_fp32 ? static_cast<const float*>(base)[i]
                 : to_float(static_cast<const input_t*>(base)[i]);
}
FLASH_KDA_DEVICE void store_from_float(void* base, int64_t i, bool is_fp32, float x) {
  if (is_fp32) {
    static_cast<float*>(base)[i] = x;
  } else {
    static_cast<input_t*>(base)[i] = from_float<input_t>(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Math and synchronisation (device)
// ---------------------------------------------------------------------------------------------
// 2^x. Bodies keep cumulative log-decays in log2 units so that every decay factor is one exp2.
FLASH_KDA_DEVICE float exp2(float x) { return exp2f(x); }
FLASH_KDA_DEVICE float exp(float x) { return expf(x); }
FLASH_KDA_DEVICE float sqrt(float x) { return sqrtf(x); }

// Barrier for all threads of the block; also orders their shared-memory accesses.
FLASH_KDA_DEVICE void block_sync() { __syncthreads(); }

}  // namespace port
}  // namespace flash_kda

#endif  // FLASH_KDA_PORT_DEVICE_CUH_
