"""Every ``FLASH_KDA_*`` environment variable the JIT reads, with its default. Nothing else.

Read through these functions (not at import) so that tests and tools can change the environment
of a running process. The README's table lists the same variables.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    return default


def cache_dir_override() -> Path | None:
    """FLASH_KDA_CACHE_DIR, if set: the user's choice, used as it is (never a silent fallback)."""
    raw = os.environ.get("FLASH_KDA_CACHE_DIR")
    return Path(raw).expanduser() if raw else None


def default_cache_root() -> Path | None:
    """$XDG_CACHE_HOME/flash_kda, else ~/.cache/flash_kda; None if there is no home directory."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "flash_kda"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry (Python >= 3.12 raises)
        return None
    # Older Pythons leave "~" unexpanded instead of raising; a relative root would land in the cwd.
    return home / ".cache" / "flash_kda" if home.is_absolute() else None


def fallback_cache_root() -> Path:
    """Per-user directory under the system temp dir ($TMPDIR, else /tmp): the cache used when
    FLASH_KDA_CACHE_DIR is unset and the default root cannot be written (read-only $HOME)."""
    if hasattr(os, "getuid"):
        user = str(os.getuid())
    else:  # Windows: no uids
        import getpass
        user = getpass.getuser()
    return Path(tempfile.gettempdir()) / f"flash_kda-{user}"


def cache_root() -> Path:
    """The cache looked in first: FLASH_KDA_CACHE_DIR, else the default root, else (no home
    directory) the fallback. Where a build writes is decided by ``cache.build_root()``."""
    return cache_dir_override() or default_cache_root() or fallback_cache_root()


def backend_override() -> str | None:
    """FLASH_KDA_BACKEND: cuda | musa | cpu (default: detect)."""
    raw = os.environ.get("FLASH_KDA_BACKEND", "").strip().lower()
    return raw or None


def build_on_import() -> bool:
    """FLASH_KDA_BUILD_ON_IMPORT=0 defers building the default specialisation to its first use."""
    return _flag("FLASH_KDA_BUILD_ON_IMPORT", True)


def verbose() -> bool:
    """FLASH_KDA_VERBOSE=1 streams the compiler's output to stderr while building."""
    return _flag("FLASH_KDA_VERBOSE", False)


def direct_entry() -> bool:
    """FLASH_KDA_DIRECT_ENTRY=0 calls every kernel through its torch op, never through the
    library's direct entry (csrc/python_entry.cpp; ~3 us more host time a call on a GPU). Read when
    a kernel is loaded (flash_kda._ops.forget_kernels() makes a change take effect)."""
    return _flag("FLASH_KDA_DIRECT_ENTRY", True)


def disable_jit() -> bool:
    """FLASH_KDA_DISABLE_JIT=1 never compiles: a missing cache entry is an error (production images)."""
    return _flag("FLASH_KDA_DISABLE_JIT", False)


def kernel_variant() -> str:
    """FLASH_KDA_KERNEL: fast (default; arch-specific code where it exists) | portable."""
    raw = os.environ.get("FLASH_KDA_KERNEL", "fast").strip().lower() or "fast"
    if raw not in ("fast", "portable"):
        raise ValueError(f"FLASH_KDA_KERNEL must be 'fast' or 'portable', got {raw!r}")
    return raw


def cuda_arch_override() -> str | None:
    """FLASH_KDA_CUDA_ARCH (e.g. '9.0a', 'sm_90a', '8.0'), else TORCH_CUDA_ARCH_LIST."""
    return (os.environ.get("FLASH_KDA_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST")
            or None)


def musa_arch_override() -> str | None:
    """FLASH_KDA_MUSA_ARCH (e.g. 'mp_31'), else MTGPU_TARGET."""
    return os.environ.get("FLASH_KDA_MUSA_ARCH") or os.environ.get("MTGPU_TARGET") or None


def cpu_arch_override() -> str | None:
    """FLASH_KDA_CPU_ARCH: an -march value for the CPU backend (default: from the CPU's features)."""
    return os.environ.get("FLASH_KDA_CPU_ARCH") or None


def lock_timeout() -> float:
    """FLASH_KDA_LOCK_TIMEOUT seconds to wait for another process's build (default 1800)."""
    return float(os.environ.get("FLASH_KDA_LOCK_TIMEOUT", "1800"))


def extra_cflags() -> list[str]:
    return os.environ.get("FLASH_KDA_EXTRA_CFLAGS", "").split()


def extra_device_cflags() -> list[str]:
    """FLASH_KDA_EXTRA_CUDA_CFLAGS: extra nvcc / mcc flags."""
    return os.environ.get("FLASH_KDA_EXTRA_CUDA_CFLAGS", "").split()


def csrc_override() -> Path | None:
    """FLASH_KDA_CSRC_DIR: compile from this copy of flash_kda/csrc (kernel development, tests)."""
    raw = os.environ.get("FLASH_KDA_CSRC_DIR")
    return Path(raw).expanduser().resolve() if raw else None
