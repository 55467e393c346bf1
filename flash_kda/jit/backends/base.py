"""The interface every backend toolchain implements, and the plan it hands to the builder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ..includes import local_includes

PACKAGE_CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"


def csrc_dir() -> Path:
    """The kernel sources: the package's csrc/, or FLASH_KDA_CSRC_DIR (a developer's copy)."""
    from .. import env
    return env.csrc_override() or PACKAGE_CSRC

# The host translation units of every backend's module: the torch op, and its direct entry from
# Python past the dispatcher (compiled apart: its Python-binding headers are the slow part).
HOST_UNITS = ["binding.cpp", "python_entry.cpp"]
# Every backend's module includes these.
SHARED_SOURCES = ["kda_params.h", "binding.h", *HOST_UNITS]


def host_sources() -> list[str]:
    """Absolute paths of HOST_UNITS, for a plan's sources (before the backend's own units)."""
    return [str(csrc_dir() / unit) for unit in HOST_UNITS]


class CompilerNotFoundError(RuntimeError):
    """The compiler (or ninja) a backend needs is not installed; the message says what to install."""


class UnsupportedToolchainError(RuntimeError):
    """The toolchain exists but is too old or otherwise cannot build the kernels."""


@dataclass
class BuildPlan:
    """Everything the build worker passes to a ``load`` function, and what goes into the cache key."""
    loader: str                      # 'torch' (torch.utils.cpp_extension.load) or 'torch_musa'
    sources: list[str]               # absolute paths of the translation units
    extra_cflags: list[str] = field(default_factory=list)
    extra_device_cflags: list[str] = field(default_factory=list)   # nvcc / mcc flags
    extra_ldflags: list[str] = field(default_factory=list)
    extra_include_paths: list[str] = field(default_factory=list)
    compiler: str = ""               # the identity string that goes into the key (name + version)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def compiler_summary(self) -> str:
        """One short line for messages: the tool and its release (nvcc prints it on line 4)."""
        parts = [p.strip() for p in self.compiler.split("|")]
        release = next((p for p in parts if "release" in p.lower()), None)
        return f"{parts[0].split(':')[0]} ({release})" if release else parts[0]


def split_arch_list(text: str) -> list[str]:
    """Entries of an arch list written with ';', ',' or spaces between them ('8.0;9.0a')."""
    return [x for x in re.split(r"[;,\s]+", text.strip()) if x]


def run_version(argv: list[str]) -> str:
    """The `argv` (a `--version`-style command) output on one line, or raise CompilerNotFoundError.

    Memoised on disk by the executable's real path, size and mtime, so that a warm import does
    not pay for a compiler subprocess; replacing the compiler changes the memo key."""
    from .. import env
    from ..cache import TOOL_MEMO
    exe = shutil.which(argv[0]) or argv[0]
    try:
        st = os.stat(exe)
        memo_key = f"{os.path.realpath(exe)}|{st.st_size}|{st.st_mtime_ns}|{' '.join(argv[1:])}"
    except OSError:
        memo_key = None
    memo_path = env.cache_root() / TOOL_MEMO
    memo = _read_json(memo_path)
    if memo_key and memo_key in memo:
        return memo[memo_key]
    text = _run_version_uncached(argv)
    if memo_key:
        memo[memo_key] = text
        _write_json_atomic(memo_path, memo)
    return text


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    """Best effort: a read-only or racing cache only costs a subprocess next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _run_version_uncached(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompilerNotFoundError(f"could not run {' '.join(argv)}: {e}") from e
    text = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise CompilerNotFoundError(f"{' '.join(argv)} exited with {res.returncode}: {text[-500:]}")
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def require_ninja() -> None:
    if shutil.which("ninja") is None:
        raise CompilerNotFoundError(
            "ninja is not on PATH; flash_kda compiles its kernels with it. "
            "Install it with `pip install ninja` (it is a dependency of flash_kda).")


class Toolchain(ABC):
    """How one backend compiles a KernelSpec. Methods raise CompilerNotFoundError /
    UnsupportedToolchainError with an actionable message; they never return a broken plan."""

    backend: str

    @abstractmethod
    def device_available(self) -> bool:
        """A device of this backend is present now (CPU: always)."""

    @abstractmethod
    def arch_tag(self, device_index: int | None = None) -> str:
        """Filename-safe arch tag for the present device (or the environment's override)."""

    @abstractmethod
    def plan(self, spec) -> BuildPlan:
        """Sources, flags and compiler identity for `spec`; checks the compiler exists."""

    def hashed_files(self, spec) -> list[Path]:
        """Files whose contents define the module: the shared header and binding plus the
        backend's own files, and every file under csrc/ those reach by ``#include "..."`` (so a
        header missing from ``source_paths`` is still covered). Editing any of them changes the
        cache key; editing another backend's files does not."""
        files = []
        for rel in SHARED_SOURCES + self.source_paths(spec):
            path = csrc_dir() / rel
            files += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        return sorted(local_includes(csrc_dir(), files))

    @abstractmethod
    def source_paths(self, spec) -> list[str]:
        """Files and directories under csrc/ that this backend compiles from (beyond the shared
        ones). Headers they reach by ``#include "..."`` need not be listed: hashed_files follows
        the includes."""
