"""flash_kda: Kimi Delta Attention (KDA) forward kernels, compiled on first import.

``import flash_kda`` builds (or loads from the cache) the default specialisation — head dim 128,
bf16 — for the present device: CUDA if available, else MUSA, else CPU (``FLASH_KDA_BACKEND``
overrides; ``FLASH_KDA_BUILD_ON_IMPORT=0`` defers the build to first use). Other head dims and
dtypes are built on the first call that needs them. See README.md.
"""

__version__ = "0.1.0"

from .api import chunk_kda, fwd, get_workspace_size  # noqa: E402
from . import jit  # noqa: E402

__all__ = ["fwd", "get_workspace_size", "chunk_kda", "__version__", "warmup"]


def warmup(backend=None):
    """Build (or load from cache) the default specialisation of `backend` (default: detected)."""
    return jit.build_and_load(jit.default_spec(backend))


def _build_on_import() -> None:
    if not jit.env.build_on_import():
        return
    try:
        warmup()
    except (jit.KernelBuildError, jit.KernelLoadError, jit.CompilerNotFoundError,
            jit.UnsupportedToolchainError, jit.MissingKernelError, jit.CacheDirError,
            TimeoutError) as e:
        # ImportError keeps `try: import flash_kda except ImportError:` fallbacks working.
        raise ImportError(f"flash_kda could not build its kernels: {e}") from e


_build_on_import()
