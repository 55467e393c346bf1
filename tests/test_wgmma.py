"""One wgmma (ptx.cuh's wgmma_f16, the form the sm_90a recurrence uses) on known operands, run on
the CPU by the SIMT emulator and, where an sm_90 GPU is present, on the GPU: both must give the
matrix product. On a GPU this checks the emulator's model of wgmma (fragments, descriptor) against
the hardware, so that the emulator's verdict on the recurrence means something; on the CPU it
checks the model against the PTX ISA's description written independently in the probe."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "flash_kda" / "csrc"
SIMT = Path(__file__).resolve().parent / "simt"
SIZES = [32, 64, 128]

_CALL = """
template <int N>
void run(const uint16_t* A, const uint16_t* Bt, float* D);
void wgmma_probe(torch::Tensor A, torch::Tensor Bt, torch::Tensor D) {
  const int n = static_cast<int>(D.size(1));
  auto a = reinterpret_cast<const uint16_t*>(A.data_ptr());
  auto b = reinterpret_cast<const uint16_t*>(Bt.data_ptr());
  float* d = D.data_ptr<float>();
  if (n == 32) run<32>(a, b, d); else if (n == 64) run<64>(a, b, d); else run<128>(a, b, d);
}
"""

_CPU_SOURCE = """
#include <torch/extension.h>
#include "simt.h"
#include "wgmma_probe.cuh"
template <int N>
void run(const uint16_t* A, const uint16_t* Bt, float* D) {
  simt::run_grid(1, 128, N * 16 * 2, [&](int64_t, float* sm, int t) {
    flash_kda::probe::wgmma_probe<N>(A, Bt, D, reinterpret_cast<uint16_t*>(sm), t);
  });
}
""" + _CALL

_CUDA_SOURCE = """
#include <torch/extension.h>
#include <stdint.h>
#include "cuda/ptx.cuh"
#include "wgmma_probe.cuh"
template <int N>
__global__ void probe_kernel(const uint16_t* A, const uint16_t* Bt, float* D) {
  __shared__ __align__(128) uint16_t smem[N * 16];
  flash_kda::probe::wgmma_probe<N>(A, Bt, D, smem, threadIdx.x);
}
template <int N>
void run(const uint16_t* A, const uint16_t* Bt, float* D) {
  probe_kernel<N><<<1, 128>>>(A, Bt, D);
  TORCH_CHECK(cudaDeviceSynchronize() == cudaSuccess, "wgmma probe kernel failed");
}
""" + _CALL


_DECLARATION = "void wgmma_probe(torch::Tensor A, torch::Tensor Bt, torch::Tensor D);"


def _load(name, **kw):
    from torch.utils.cpp_extension import load_inline
    build = Path(os.environ["FLASH_KDA_CACHE_DIR"]) / "wgmma_probe" / name
    build.mkdir(parents=True, exist_ok=True)
    return load_inline(name=name, functions=["wgmma_probe"], build_directory=str(build),
                       verbose=False, **kw)


def _operands(n, device):
    gen = torch.Generator().manual_seed(n)
    A = torch.randn(64, 16, generator=gen).half()
    Bt = torch.randn(n, 16, generator=gen).half()
    D0 = torch.randn(64, n, generator=gen)
    want = D0.double() + A.double() @ Bt.double().T
    return A.view(torch.int16).to(device), Bt.view(torch.int16).to(device), D0.to(device), want


def _check(mod, n, device):
    A, Bt, D, want = _operands(n, device)
    mod.wgmma_probe(A, Bt, D)
    err = ((D.cpu().double() - want).norm() / want.norm()).item()
    assert err < 1e-6, f"wgmma m64n{n}k16: rel-L2 {err:.2e} against A B + D"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the SIMT emulator uses ucontext (Linux)")
@pytest.mark.parametrize("n", SIZES)
def test_emulated_wgmma_is_the_matrix_product(n):
    mod = _load("wgmma_probe_simt", cpp_sources=[_CPU_SOURCE],
                extra_cflags=["-O1", "-std=c++17", "-DFLASH_KDA_DTYPE_FP16", f"-I{CSRC}", f"-I{SIMT}"])
    _check(mod, n, "cpu")


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (wgmma)")
@pytest.mark.parametrize("n", SIZES)
def test_gpu_wgmma_is_the_matrix_product(n, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # sm_90a only (wgmma), no plain sm_90 pass
    # (main.cpp holds load_inline's bindings: it needs the declaration; the definition is CUDA)
    mod = _load("wgmma_probe_cuda", cpp_sources=[_DECLARATION], cuda_sources=[_CUDA_SOURCE],
                extra_cuda_cflags=["-std=c++17", "-DFLASH_KDA_BACKEND_CUDA", "-DFLASH_KDA_DTYPE_FP16",
                                   f"-I{CSRC}", f"-I{SIMT}"])
    _check(mod, n, "cuda")
