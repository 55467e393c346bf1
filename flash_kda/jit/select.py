"""Which backend and which specialisation: for the present machine, and for a given tensor."""

from __future__ import annotations

import importlib.util

from . import env
from .backends import get_toolchain
from .spec import DTYPE_NAMES, KernelSpec

DEFAULT_HEAD_DIM = 128
DEFAULT_DTYPE = "bf16"


def musa_present() -> bool:
    """torch_musa importable and a MUSA device present; never touches CUDA."""
    import torch
    if getattr(torch.version, "musa", None) is None:
        if importlib.util.find_spec("torch_musa") is None:
            return False
        try:
            import torch_musa  # noqa: F401
        except Exception:  # a broken torch_musa install: not a MUSA machine for us
            return False
    musa = getattr(torch, "musa", None)
    try:
        return bool(musa is not None and musa.is_available())
    except Exception:
        return False


def default_backend() -> str:
    """FLASH_KDA_BACKEND, else cuda if a CUDA device is present, else musa, else cpu."""
    override = env.backend_override()
    if override:
        if override not in ("cpu", "cuda", "musa"):
            raise ValueError(f"FLASH_KDA_BACKEND must be cpu, cuda or musa, got {override!r}")
        return override
    import torch
    if torch.version.cuda is not None and torch.cuda.is_available():
        return "cuda"
    if musa_present():
        return "musa"
    return "cpu"


def backend_of_device(device) -> str:
    kind = device.type
    if kind in ("cpu", "cuda"):
        return kind
    if kind in ("musa", "privateuseone"):
        return "musa"
    raise ValueError(f"flash_kda has no backend for device {device}")


def default_spec(backend: str | None = None) -> KernelSpec:
    """The specialisation `import flash_kda` builds: head dim 128, bf16, for the present device."""
    backend = backend or default_backend()
    arch = get_toolchain(backend).arch_tag()
    # MP21 (MTT S80/S3000) has no native bf16: its default module is fp16 so the import works.
    dtype = "fp16" if (backend, arch) == ("musa", "mp21") else DEFAULT_DTYPE
    return KernelSpec(backend, arch, DEFAULT_HEAD_DIM, dtype, _variant(backend))


def _variant(backend: str) -> str:
    # The CPU kernel has a single implementation; 'portable' only distinguishes GPU code paths.
    return env.kernel_variant() if backend != "cpu" else "fast"


def spec_for(device, head_dim: int, dtype) -> KernelSpec:
    """The specialisation that runs tensors of `dtype` and `head_dim` on `device`."""
    backend = backend_of_device(device)
    index = device.index if backend != "cpu" else None
    arch = get_toolchain(backend).arch_tag(index)
    return KernelSpec(backend, arch, head_dim, DTYPE_NAMES[dtype], _variant(backend))
