"""CUDA backend: nvcc (from torch's CUDA_HOME) for the device's compute capability."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .base import (BuildPlan, CompilerNotFoundError, Toolchain, UnsupportedToolchainError, csrc_dir,
                   host_sources, require_ninja, run_version, split_arch_list)
from .. import env

# Compute capabilities that get the arch-specific ("a") target: wgmma and setmaxnreg need sm_90a.
_ARCH_SPECIFIC = {(9, 0)}
_ENTRY = re.compile(r"^(?:sm_?|compute_?)?(\d+)\.?(\d)?([af]?)(\+ptx)?$")


def parse_arch_list(text: str) -> list[tuple[int, int, str, bool]]:
    """'8.0;9.0a' / 'sm_90a' / '90a' / '8.6+PTX' -> [(major, minor, suffix, ptx)]."""
    out = []
    for raw in split_arch_list(text):
        m = _ENTRY.match(raw.lower())
        if not m:
            raise ValueError(f"cannot read CUDA arch {raw!r} (examples: '9.0a', 'sm_90a', '8.0')")
        digits, minor, suffix, ptx = m.groups()
        if minor is None:  # '90a' / 'sm_90a' style: the last digit is the minor version
            major, minor = int(digits[:-1]), int(digits[-1])
        else:
            major, minor = int(digits), int(minor)
        if (major, minor) in _ARCH_SPECIFIC and not suffix:
            suffix = "a"
        out.append((major, minor, suffix, bool(ptx)))
    if not out:
        raise ValueError("empty CUDA arch list")
    return sorted(set(out))


def gencode_flags(archs) -> list[str]:
    flags = []
    for major, minor, suffix, ptx in archs:
        cc = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def arch_tag_of(archs) -> str:
    return "_".join(f"sm{ma}{mi}{sfx}" for ma, mi, sfx, _ in archs)


def archs_from_tag(tag: str):
    return parse_arch_list(tag.replace("_", ";"))


class CudaToolchain(Toolchain):
    backend = "cuda"

    def device_available(self) -> bool:
        import torch
        return torch.version.cuda is not None and torch.cuda.is_available()

    def archs(self, device_index: int | None = None):
        override = env.cuda_arch_override()
        if override:
            return parse_arch_list(override)
        import torch
        if not torch.cuda.is_available():
            raise UnsupportedToolchainError(
                "no CUDA device is visible, so the CUDA arch is unknown: set FLASH_KDA_CUDA_ARCH "
                "(e.g. '9.0a') or pass --arch to tools/prewarm.py")
        idx = torch.cuda.current_device() if device_index is None else device_index
        major, minor = torch.cuda.get_device_capability(idx)
        return parse_arch_list(f"{major}.{minor}")

    def arch_tag(self, device_index=None) -> str:
        return arch_tag_of(self.archs(device_index))

    def source_paths(self, spec) -> list[str]:
        return ["cuda"]  # the headers it includes from csrc/ are found by hashed_files

    def nvcc_path(self) -> str:
        import torch
        if torch.version.cuda is None:
            raise UnsupportedToolchainError(
                f"this torch ({torch.__version__}) is a CPU-only build; the CUDA backend needs a "
                "CUDA build of torch")
        from torch.utils.cpp_extension import CUDA_HOME
        nvcc = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
        if not nvcc.exists():
            raise CompilerNotFoundError(
                f"nvcc not found (looked in {nvcc}); flash_kda compiles its CUDA kernels on first "
                f"import. Install the CUDA toolkit {torch.version.cuda} (matching torch) and set "
                "CUDA_HOME, or set FLASH_KDA_BACKEND=cpu to use the CPU kernels.")
        return str(nvcc)

    def plan(self, spec) -> BuildPlan:
        nvcc = self.nvcc_path()
        require_ninja()
        cxx = os.environ.get("CXX", "c++")
        device_flags = ["-O3", "-std=c++17", *gencode_flags(archs_from_tag(spec.arch)),
                        *spec.defines(), *env.extra_device_cflags()]
        return BuildPlan(
            loader="torch",
            sources=[*host_sources(), str(csrc_dir() / "cuda" / "kda_cuda.cu")],
            extra_cflags=["-O3", *spec.defines(), *env.extra_cflags()],
            extra_device_cflags=device_flags,
            compiler=f"nvcc: {run_version([nvcc, '--version'])}; host: {run_version([cxx, '--version'])}",
        )
