"""KernelSpec: the name of one compiled specialisation (backend, arch, head dim, dtype, variant).

A spec knows nothing about compilers or caches; ``flash_kda.jit.backends`` turns it into sources
and flags, ``flash_kda.jit.cache`` into a directory, ``flash_kda.jit.build`` into a loaded op.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

HEAD_DIMS = (64, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BACKENDS = ("cpu", "cuda", "musa")
# fp32 inputs are a CPU-only convenience; the GPU kernels take the 16-bit types.
BACKEND_DTYPES = {"cpu": ("bf16", "fp16", "fp32"), "cuda": ("bf16", "fp16"), "musa": ("bf16", "fp16")}
KERNEL_VARIANTS = ("fast", "portable")

_ARCH_RE = re.compile(r"^[a-z0-9_]+$")
# The inverse of KernelSpec.name; the arch tag may itself contain '_' ('x86_64_v3').
_NAME_RE = re.compile(r"^kda_(?P<backend>[a-z]+)_(?P<arch>[a-z0-9_]+)_d(?P<head_dim>[0-9]+)_"
                      r"(?P<dtype>[a-z0-9]+?)(?P<portable>_portable)?$")


@dataclass(frozen=True)
class KernelSpec:
    backend: str
    arch: str        # filename-safe tag: 'x86_64_v3', 'sm90a', 'sm80_sm90a', 'mp31'
    head_dim: int
    dtype: str       # 'bf16' | 'fp16' | 'fp32'
    kernel: str = "fast"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head dim {self.head_dim} is not specialised; expected one of {HEAD_DIMS}")
        if self.dtype not in BACKEND_DTYPES[self.backend]:
            raise ValueError(f"dtype {self.dtype!r} is not supported on {self.backend}; "
                             f"expected one of {BACKEND_DTYPES[self.backend]}")
        if self.kernel not in KERNEL_VARIANTS:
            raise ValueError(f"kernel variant {self.kernel!r}; expected one of {KERNEL_VARIANTS}")
        if not _ARCH_RE.match(self.arch):
            raise ValueError(f"arch tag {self.arch!r} must be lower-case letters, digits and '_'")

    @property
    def name(self) -> str:
        """Human-readable module name, e.g. ``kda_cuda_sm90a_d128_bf16``."""
        suffix = "_portable" if self.kernel == "portable" else ""
        return f"kda_{self.backend}_{self.arch}_d{self.head_dim}_{self.dtype}{suffix}"

    @classmethod
    def from_name(cls, name: str) -> "KernelSpec":
        """The spec whose ``name`` is `name` (cache cleanup finds specs by their directory names).
        ValueError if no spec of this version is called that."""
        m = _NAME_RE.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a kernel specialisation name")
        spec = cls(m["backend"], m["arch"], int(m["head_dim"]), m["dtype"],
                   "portable" if m["portable"] else "fast")
        if spec.name != name:  # e.g. a leading zero in the head dim
            raise ValueError(f"{name!r} is not a kernel specialisation name")
        return spec

    def defines(self) -> list[str]:
        """Preprocessor definitions that pick this specialisation out of the shared sources."""
        out = [
            f"-DFLASH_KDA_BACKEND_{self.backend.upper()}",
            f"-DFLASH_KDA_HEAD_DIM={self.head_dim}",
            f"-DFLASH_KDA_DTYPE_{self.dtype.upper()}",
        ]
        if self.kernel == "portable":
            out.append("-DFLASH_KDA_KERNEL_PORTABLE")
        return out

    def as_dict(self) -> dict:
        return asdict(self)
