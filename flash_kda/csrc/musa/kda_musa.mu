// kda_musa.mu: the MUSA translation unit of one specialisation (head dim, input dtype).
//
// torch_musa's JIT `load` gives only .mu/.muh files to mcc (a .cu would go to the host C++
// compiler), so this file exists to compile the one kernel body that CUDA and MUSA share
// (../cuda/kda_chunk_portable.cuh, through ../cuda/kda_cuda.cu and its launch_kda) under mcc.
// There is no MUSA copy of the kernel: port.cuh maps types, the runtime API and the warp width.
//
// Flags (flash_kda/jit/backends/musa.py): -DFLASH_KDA_BACKEND_MUSA, the head dim and dtype of the
// spec, -DFLASH_KDA_KERNEL_PORTABLE (so kda_cuda.cu never compiles its NVIDIA-only fast path here;
// it also excludes that path under __MUSACC__), and --offload-arch=mp_XY for the device's arch.
//
// Warp size per arch (the body never assumes one: it cooperates through shared memory and
// __syncthreads only, in blocks of 256 threads, a multiple of every warp width below):
//   MP31 (MTT S5000, __MUSA_ARCH__ 310): 32 threads per warp  -> 8 warps per block.
//   MP22 (MTT S4000, __MUSA_ARCH__ 220): 128 threads per warp -> 2 warps per block.
//   MP21 (MTT S80/S3000, __MUSA_ARCH__ 210): 128 threads per warp; bf16 is only emulated there,
//        so the JIT builds fp16 specialisations only for MP21 (it refuses bf16 with a message),
//        and this file stops a bf16 build for an arch below MP22 that reaches mcc anyway.
// port::kWarpSize carries the same numbers for any code that needs them.

#if !defined(FLASH_KDA_BACKEND_MUSA)
#error "kda_musa.mu is the MUSA translation unit: compile it with mcc and -DFLASH_KDA_BACKEND_MUSA"
#endif

#if defined(FLASH_KDA_DTYPE_BF16) && defined(__MUSA_ARCH__) && __MUSA_ARCH__ < 220
#error "flash_kda: bf16 kernels need MUSA arch mp_22 or newer (MP21 only emulates bf16); build fp16"
#endif

#ifndef FLASH_KDA_KERNEL_PORTABLE
#define FLASH_KDA_KERNEL_PORTABLE 1
#endif

#include "../cuda/kda_cuda.cu"
