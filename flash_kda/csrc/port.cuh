// port.cuh: the small portability layer between the kernel bodies and the GPU toolkit.
//
// Kernel bodies (flash_kda/csrc/cuda/*.cuh) are written against this header only, so the same body
// compiles with nvcc (FLASH_KDA_BACKEND_CUDA) and with Moore Threads' mcc (FLASH_KDA_BACKEND_MUSA).
// Nothing here uses inline PTX. Everything toolkit-specific (headers, the 16-bit float types, the
// runtime API, the warp width) lives in this file and nowhere else.
//
// A classic include guard (rather than #pragma once) lets a host-side test harness define the guard
// and supply its own stand-ins for the few names below, to run a body on the CPU.
#ifndef FLASH_KDA_PORT_CUH_
#define FLASH_KDA_PORT_CUH_

#include <stdint.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

// MUSA names below follow the CUDA -> MUSA renaming (cudaX -> musaX, __nv_bfloat16 -> __mt_bfloat16;
// conversion intrinsics keep their CUDA names); see shared/research/musa.md section 2. Not yet
// compiled with mcc: check them on the first MUSA build.
#if defined(FLASH_KDA_BACKEND_MUSA)
#include <musa_bf16.h>
#include <musa_fp16.h>
#include <musa_runtime.h>
#elif defined(FLASH_KDA_BACKEND_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#error "port.cuh: define FLASH_KDA_BACKEND_CUDA or FLASH_KDA_BACKEND_MUSA"
#endif

// Device-function qualifiers used by the bodies.
#define FLASH_KDA_DEVICE __device__ __forceinline__
#define FLASH_KDA_DEVICE_NOINLINE __device__ __noinline__

namespace flash_kda {
namespace port {

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------
#if defined(FLASH_KDA_BACKEND_MUSA)
using stream_t = musaStream_t;
using error_t = musaError_t;
using bf16_t = __mt_bfloat16;
#else
using stream_t = cudaStream_t;
using error_t = cudaError_t;
using bf16_t = __nv_bfloat16;
#endif
using fp16_t = __half;

// (input_t, the input element type of this specialisation: port_device.cuh)

// Threads per hardware warp. Bodies may use it to lay out work, never to assume 32 lanes.
// MUSA: 128 on MP21/MP22 (__MUSA_ARCH__ <= 220), 32 on MP31 and later. On the host pass of mcc
// __MUSA_ARCH__ is undefined; host code must not depend on this value there.
#if defined(FLASH_KDA_BACKEND_MUSA)
#if defined(__MUSA_ARCH__) && __MUSA_ARCH__ <= 220
constexpr int kWarpSize = 128;
#else
constexpr int kWarpSize = 32;
#endif
#else
constexpr int kWarpSize = 32;
#endif

}  // namespace port
}  // namespace flash_kda

// Conversions, loads and stores of either dtype, math, the block barrier: port_device.cuh (a file
// of its own so that tests/simt can reuse it over its stand-in types and built-ins).
#include "port_device.cuh"

namespace flash_kda {
namespace port {

// ---------------------------------------------------------------------------------------------
// Host side: errors, device queries, kernel attributes and launches
// ---------------------------------------------------------------------------------------------
#if defined(FLASH_KDA_BACKEND_MUSA)
inline const char* error_string(error_t e) { return musaGetErrorString(e); }
inline bool failed(error_t e) { return e != musaSuccess; }
inline error_t last_error() { return musaGetLastError(); }
#else
inline const char* error_string(error_t e) { return cudaGetErrorString(e); }
inline bool failed(error_t e) { return e != cudaSuccess; }
inline error_t last_error() { return cudaGetLastError(); }
#endif

// Throws std::runtime_error (torch turns it into a Python RuntimeError) if `e` is an error.
inline void check(error_t e, const char* what) {
  if (failed(e)) {
    throw std::runtime_error(std::string("flash_kda: ") + what + " failed: " + error_string(e));
  }
}

struct DeviceInfo {
  int device;              // index of the current device
  int multiprocessors;
  int max_smem_per_block;  // bytes, opt-in limit (what a block may ask for after set_max_smem)
  int smem_per_multiprocessor;  // bytes
  int major;               // compute capability (CUDA) / MUSA arch major
  int minor;
};

// Attributes of device `dev`, queried from the runtime.
inline DeviceInfo query_device(int dev) {
  DeviceInfo d{};
  d.device = dev;
#if defined(FLASH_KDA_BACKEND_MUSA)
  check(musaDeviceGetAttribute(&d.multiprocessors, musaDevAttrMultiProcessorCount, dev),
        "musaDeviceGetAttribute(multiprocessors)");
  check(musaDeviceGetAttribute(&d.max_smem_per_block, musaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "musaDeviceGetAttribute(max shared memory)");
  check(musaDeviceGetAttribute(&d.smem_per_multiprocessor,
                              musaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
        "musaDeviceGetAttribute(shared memory per multiprocessor)");
  check(musaDeviceGetAttribute(&d.major, musaDevAttrComputeCapabilityMajor, dev),
        "musaDeviceGetAttribute(major)");
  check(musaDeviceGetAttribute(&d.minor, musaDevAttrComputeCapabilityMinor, dev),
        "musaDeviceGetAttribute(minor)");
#else
  check(cudaDeviceGetAttribute(&d.multiprocessors, cudaDevAttrMultiProcessorCount, dev),
        "cudaDeviceGetAttribute(multiprocessors)");
  check(cudaDeviceGetAttribute(&d.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "cudaDeviceGetAttribute(max shared memory)");
  check(cudaDeviceGetAttribute(&d.smem_per_multiprocessor,
                               cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
        "cudaDeviceGetAttribute(shared memory per multiprocessor)");
  check(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev),
        "cudaDeviceGetAttribute(major)");
  check(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev),
        "cudaDeviceGetAttribute(minor)");
#endif
  return d;
}

// Attributes of the current device. They never change while the process runs, so each device is
// queried once (five attribute calls per launch were a measurable share of the host time).
inline DeviceInfo device_info() {
  int dev = 0;
#if defined(FLASH_KDA_BACKEND_MUSA)
  check(musaGetDevice(&dev), "musaGetDevice");
#else
  check(cudaGetDevice(&dev), "cudaGetDevice");
#endif
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it == known.end()) it = known.emplace(dev, query_device(dev)).first;
  return it->second;
}

// Lets `kernel` use `bytes` of dynamic shared memory (needed above 48 KB).
template <class Kernel>
inline void set_max_dynamic_smem(Kernel kernel, int bytes) {
#if defined(FLASH_KDA_BACKEND_MUSA)
  check(musaFuncSetAttribute(kernel, musaFuncAttributeMaxDynamicSharedMemorySize, bytes),
        "musaFuncSetAttribute(max dynamic shared memory)");
#else
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
        "cudaFuncSetAttribute(max dynamic shared memory)");
#endif
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) and throws if the launch failed.
template <class Kernel, class... Args>
inline void launch(const char* name, Kernel kernel, unsigned grid, unsigned block, int smem_bytes,
                   stream_t stream, const Args&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  check(last_error(), name);
}

}  // namespace port
}  // namespace flash_kda

#endif  // FLASH_KDA_PORT_CUH_
