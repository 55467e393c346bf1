"""CPU backend: the host C++ compiler (``$CXX``, default ``c++``) with OpenMP."""

from __future__ import annotations

import os
import platform
import shutil

from .base import (BuildPlan, CompilerNotFoundError, Toolchain, csrc_dir, host_sources, require_ninja,
                   run_version)
from .. import env

# x86-64 micro-architecture levels (gcc >= 11 / clang >= 12 accept these -march names),
# from the CPU feature flags that each level requires at least.
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx2", "fma", "bmi2", "avx"}),
    ("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}),
)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_march() -> str | None:
    """The -march this machine's CPU supports (None: leave the compiler's default)."""
    override = env.cpu_arch_override()
    if override:
        return override
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = _cpu_flags()
    for level, needed in _X86_LEVELS:
        if needed <= flags:
            return level
    return "x86-64"


class CpuToolchain(Toolchain):
    backend = "cpu"

    def device_available(self) -> bool:
        return True

    def arch_tag(self, device_index=None) -> str:
        march = host_march()
        machine = platform.machine().lower() or "unknown"
        tag = machine if march is None else march
        return tag.replace("-", "_").replace(".", "_").lower()

    def source_paths(self, spec) -> list[str]:
        return ["cpu"]

    def compiler_path(self) -> str:
        cxx = os.environ.get("CXX", "c++")
        path = shutil.which(cxx)
        if path is None:
            raise CompilerNotFoundError(
                f"no C++ compiler found (looked for {cxx!r}; set CXX to choose one). flash_kda "
                "compiles its CPU kernels on first use: install g++ or clang++ "
                "(Debian/Ubuntu: `apt-get install g++`; conda: `conda install gxx_linux-64`).")
        return path

    def plan(self, spec) -> BuildPlan:
        cxx = self.compiler_path()
        require_ninja()
        march = host_march() if spec.arch == self.arch_tag() else spec.arch.replace("_", "-")
        cflags = ["-O3", "-fopenmp", *spec.defines()]
        if march is not None and platform.machine() in ("x86_64", "AMD64"):
            cflags.append(f"-march={march}")
        cflags += env.extra_cflags()
        return BuildPlan(
            loader="torch",
            sources=[*host_sources(), str(csrc_dir() / "cpu" / "kda_cpu.cpp")],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            compiler=f"{cxx}: {run_version([cxx, '--version'])}",
        )
