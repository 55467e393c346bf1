"""Compile the CUDA sources with the machine's nvcc, without a GPU, so compile errors surface in
CI. The device translation unit includes no torch headers, so plain `nvcc -c` builds it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flash_kda.jit.backends.cuda import gencode_flags, parse_arch_list
from flash_kda.jit.backends.base import PACKAGE_CSRC
from flash_kda.jit.spec import KernelSpec

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")


@pytest.mark.parametrize("arch,variant,head_dim,dtype", [
    ("8.0", "fast", 128, "bf16"),
    ("9.0a", "fast", 128, "bf16"),
    ("9.0a", "portable", 64, "fp16"),
    ("9.0a", "fast", 256, "fp16"),
])
def test_nvcc_compiles_cuda_sources(tmp_path, arch, variant, head_dim, dtype):
    archs = parse_arch_list(arch)
    spec = KernelSpec("cuda", "sm" + arch.replace(".", ""), head_dim, dtype, variant)
    cmd = [NVCC, "-std=c++17", "-O3", *gencode_flags(archs), *spec.defines(),
           "-I", str(PACKAGE_CSRC), "-c", str(PACKAGE_CSRC / "cuda" / "kda_cuda.cu"),
           "-o", str(tmp_path / "kda_cuda.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    obj = (tmp_path / "kda_cuda.o").read_bytes()
    # The fast build carries the tensor-core kernels (fused, and the two-kernel form) next to the
    # portable ones (the launcher picks at run time); the portable build, like every MUSA build,
    # must not contain them.
    assert b"kda_portable_kernel" in obj
    for kernel in (b"kda_tc_kernel", b"kda_prep_kernel", b"kda_recurrence_kernel"):
        assert (kernel in obj) == (variant == "fast"), f"{kernel.decode()} in a {variant} build"
