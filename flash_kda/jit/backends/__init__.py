"""One toolchain class per backend: how its specialisations are compiled.

Each toolchain answers the same questions (see ``Toolchain``): is the backend usable here, which
arch tag the present device gets, which compiler it is, which sources and flags a spec needs, and
which ``load`` function builds it. The build/cache code is the same for all backends.
"""

from __future__ import annotations

from .base import BuildPlan, CompilerNotFoundError, Toolchain, UnsupportedToolchainError


def get_toolchain(backend: str) -> Toolchain:
    if backend == "cpu":
        from .cpu import CpuToolchain
        return CpuToolchain()
    if backend == "cuda":
        from .cuda import CudaToolchain
        return CudaToolchain()
    if backend == "musa":
        from .musa import MusaToolchain
        return MusaToolchain()
    raise ValueError(f"unknown backend {backend!r}")


__all__ = ["BuildPlan", "CompilerNotFoundError", "Toolchain", "UnsupportedToolchainError",
           "get_toolchain"]
