"""The JIT: specialisation specs, per-backend toolchains, the cache, the lock and the builder.

Public entry points: ``KernelSpec``, ``build_and_load``, ``default_spec``, ``spec_for``.
"""

from .build import (KernelBuildError, KernelLoadError, LoadedKernel, MissingKernelError,
                    build_and_load, clear_memo)
from .backends import CompilerNotFoundError, UnsupportedToolchainError
from .cache import CacheDirError
from .spec import KernelSpec
from .select import default_backend, default_spec, spec_for

__all__ = ["KernelSpec", "build_and_load", "clear_memo", "default_backend", "default_spec",
           "spec_for", "LoadedKernel", "KernelBuildError", "KernelLoadError", "MissingKernelError",
           "CompilerNotFoundError", "UnsupportedToolchainError", "CacheDirError"]
