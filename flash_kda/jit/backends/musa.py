"""MUSA backend (Moore Threads GPUs): Moore Threads' mcc, driven by torch_musa's JIT ``load``.

What a MUSA build needs, each checked by ``plan`` with a message that says what to do:

* torch_musa, importable (it registers the ``musa`` device with torch), and new enough to have
  ``torch_musa.utils.musa_extension.load`` -- the MUSA twin of ``torch.utils.cpp_extension.load``,
  added in torch_musa 2.7.0. Older releases only have ``load_inline`` or the setuptools path.
* The MUSA SDK: ``MUSA_HOME`` found the way torch_musa finds it, ``mcc`` (``PYTORCH_MCC`` or
  ``$MUSA_HOME/bin/mcc``), and ``MUSA_VERSION`` in ``$MUSA_HOME/include/musa.h`` at least 5.1.0
  (50100): the fused chunk kernel is documented to need MTCC 5.1.0; 4.3.6 may fail to compile it.
* ninja, and the host C++ compiler (``$CXX`` or ``c++``), which torch_musa uses for the host units
  (``binding.cpp``, ``python_entry.cpp``) and for the link.

torch_musa hands only ``.mu``/``.muh`` files to mcc (a ``.cu`` would go to the host compiler), and
its ``load`` adds no target flag, so the device sources are ``csrc/musa/*.mu`` and the plan passes
``--offload-arch=mp_XY`` itself. The arch (``mp31`` for MTT S5000, ``mp22`` for S4000, ``mp21`` for
S80/S3000) comes from ``torch.musa.get_device_capability()`` or ``FLASH_KDA_MUSA_ARCH`` /
``MTGPU_TARGET``; it names the specialisation and, with the mcc and SDK versions, goes into the
cache key. The build itself runs under flash_kda's own lock and cache (``flash_kda.jit.build``).

Nothing here imports torch_musa at module import: this file is importable on any machine.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
from pathlib import Path

from .base import (BuildPlan, CompilerNotFoundError, Toolchain, UnsupportedToolchainError,
                   csrc_dir, host_sources, require_ninja, run_version, split_arch_list)
from .. import env

MIN_TORCH_MUSA = (2, 7, 0)
MIN_MUSA_SDK = (5, 1, 0)
# Archs whose device code gets real bf16 support (MP22 "Quyuan" and later). On MP21 bf16 is only
# emulated; see _check_dtype_for_archs.
MIN_BF16_ARCH = (2, 2)

_ENTRY = re.compile(r"^(?:mp_?)?(\d)\.?(\d)$")
_TAG = re.compile(r"^mp(\d)(\d)$")


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in version)


# ---------------------------------------------------------------------------------------------
# Archs: 'mp_31' / 'mp31' / '3.1' / '31' -> (3, 1); tag 'mp31'; flag '--offload-arch=mp_31'
# ---------------------------------------------------------------------------------------------
def parse_arch_list(text: str) -> list[tuple[int, int]]:
    """'mp_31' / 'mp31' / '3.1' / '31', or several separated by ';', ',' or spaces -> [(3, 1)]."""
    out = []
    for raw in split_arch_list(text):
        m = _ENTRY.match(raw.lower())
        if not m:
            raise ValueError(f"cannot read MUSA arch {raw!r} (examples: 'mp_31' for MTT S5000, "
                             "'mp_22' for S4000, '3.1')")
        out.append((int(m.group(1)), int(m.group(2))))
    if not out:
        raise ValueError("empty MUSA arch list (example: FLASH_KDA_MUSA_ARCH=mp_31)")
    return sorted(set(out))


def arch_tag_of(archs) -> str:
    return "_".join(f"mp{major}{minor}" for major, minor in archs)


def archs_from_tag(tag: str) -> list[tuple[int, int]]:
    archs = []
    for part in tag.split("_"):
        m = _TAG.match(part)
        if not m:
            raise ValueError(f"{tag!r} is not a MUSA arch tag (expected e.g. 'mp31' or 'mp22_mp31')")
        archs.append((int(m.group(1)), int(m.group(2))))
    return sorted(set(archs))


def offload_arch_flags(archs) -> list[str]:
    return [f"--offload-arch=mp_{major}{minor}" for major, minor in archs]


# ---------------------------------------------------------------------------------------------
# torch_musa
# ---------------------------------------------------------------------------------------------
def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        return None
    return tuple(int(x) for x in m.groups("0"))


def import_torch_musa():
    """The torch_musa module (importing it registers the musa device with torch)."""
    try:
        return importlib.import_module("torch_musa")
    except ImportError as e:
        raise UnsupportedToolchainError(
            "the MUSA backend needs torch_musa, which is not importable here "
            f"({type(e).__name__}: {e}). Install Moore Threads' torch_musa >= {_fmt(MIN_TORCH_MUSA)} "
            "with its matching torch build (wheels from the torch_musa GitHub releases or the MUSA "
            "docker images), or set FLASH_KDA_BACKEND=cpu.") from e
    except Exception as e:  # torch_musa raises RuntimeError itself, e.g. on a torch mismatch
        raise UnsupportedToolchainError(
            f"importing torch_musa failed ({type(e).__name__}: {e}); fix the torch_musa install "
            "(it must match the installed torch), or set FLASH_KDA_BACKEND=cpu.") from e


def torch_musa_version(torch_musa) -> str:
    version = getattr(torch_musa, "__version__", None)
    if version is None:
        try:
            version = importlib.import_module("torch_musa.version").__version__
        except Exception:
            version = "unknown"
    return str(version)


def musa_jit_load():
    """torch_musa.utils.musa_extension.load, or UnsupportedToolchainError naming the minimum."""
    torch_musa = import_torch_musa()
    version = torch_musa_version(torch_musa)
    try:
        ext = importlib.import_module("torch_musa.utils.musa_extension")
    except Exception as e:
        raise UnsupportedToolchainError(
            f"torch_musa {version} has no importable torch_musa.utils.musa_extension "
            f"({type(e).__name__}: {e}); flash_kda needs its JIT `load`, added in torch_musa "
            f"{_fmt(MIN_TORCH_MUSA)}. Upgrade torch_musa to >= {_fmt(MIN_TORCH_MUSA)}, or set "
            "FLASH_KDA_BACKEND=cpu.") from e
    load = getattr(ext, "load", None)
    if not callable(load):
        raise UnsupportedToolchainError(
            f"torch_musa {version} is too old for flash_kda: it has no "
            "torch_musa.utils.musa_extension.load (the JIT twin of torch.utils.cpp_extension.load, "
            f"added in torch_musa {_fmt(MIN_TORCH_MUSA)}), which flash_kda compiles its MUSA kernels "
            f"with. Upgrade to torch_musa >= {_fmt(MIN_TORCH_MUSA)} (with its matching torch and "
            "MUSA SDK), or set FLASH_KDA_BACKEND=cpu.")
    return load


# ---------------------------------------------------------------------------------------------
# The MUSA SDK
# ---------------------------------------------------------------------------------------------
def find_musa_home() -> str | None:
    """Where the MUSA SDK is, looked up as torch_musa looks it up: MUSA_HOME or MUSA_PATH, else
    the directory above the `bin/` holding the mcc on PATH, else /usr/local/musa if it exists."""
    home = os.environ.get("MUSA_HOME") or os.environ.get("MUSA_PATH")
    if home:
        return home
    mcc = shutil.which("mcc")
    if mcc:
        return os.path.dirname(os.path.dirname(mcc))
    if os.path.exists("/usr/local/musa"):
        return "/usr/local/musa"
    return None


def mcc_command(musa_home: str) -> list[str]:
    """The mcc command torch_musa's build will run: PYTORCH_MCC (may be e.g. 'ccache mcc'), else
    $MUSA_HOME/bin/mcc."""
    override = os.environ.get("PYTORCH_MCC")
    if override:
        return shlex.split(override)
    return [os.path.join(musa_home, "bin", "mcc")]


def musa_header_version(musa_home: str) -> tuple[int, int, int]:
    """The SDK version from `#define MUSA_VERSION 50100` in $MUSA_HOME/include/musa.h."""
    header = Path(musa_home) / "include" / "musa.h"
    try:
        text = header.read_text(errors="replace")
    except OSError as e:
        raise CompilerNotFoundError(
            f"the MUSA SDK at {musa_home} has no readable include/musa.h ({e}); reinstall the MUSA "
            f"SDK (>= {_fmt(MIN_MUSA_SDK)}) or point MUSA_HOME at a complete one.") from e
    m = re.search(r"^\s*#\s*define\s+MUSA_VERSION\s+(\d+)\b", text, re.MULTILINE)
    if not m:
        raise UnsupportedToolchainError(
            f"cannot read the MUSA SDK version: {header} has no `#define MUSA_VERSION <number>`. "
            f"flash_kda needs MUSA SDK >= {_fmt(MIN_MUSA_SDK)}; point MUSA_HOME at such an SDK.")
    n = int(m.group(1))
    return n // 10000, (n // 100) % 100, n % 100


class MusaToolchain(Toolchain):
    backend = "musa"

    # ---- device -------------------------------------------------------------------------------
    def device_available(self) -> bool:
        from ..select import musa_present
        return musa_present()

    def archs(self, device_index: int | None = None) -> list[tuple[int, int]]:
        override = env.musa_arch_override()
        if override:
            return parse_arch_list(override)
        if not self.device_available():
            raise UnsupportedToolchainError(
                "no MUSA device is visible (torch_musa missing or torch.musa.is_available() is "
                "False), so the MUSA arch is unknown: set FLASH_KDA_MUSA_ARCH (e.g. 'mp_31' for "
                "MTT S5000, 'mp_22' for S4000) or pass --arch to tools/prewarm.py")
        import torch
        idx = torch.musa.current_device() if device_index is None else device_index
        major, minor = torch.musa.get_device_capability(idx)
        return [(int(major), int(minor))]

    def arch_tag(self, device_index=None) -> str:
        return arch_tag_of(self.archs(device_index))

    def source_paths(self, spec) -> list[str]:
        # The MUSA translation unit compiles the shared CUDA/MUSA body; all of it defines the module.
        # (The headers these include from csrc/ are found by hashed_files.)
        return ["cuda", "musa"]

    # ---- compiler -----------------------------------------------------------------------------
    def musa_home(self) -> str:
        home = find_musa_home()
        if home is None or not os.path.isdir(home):
            where = f" ({home} does not exist)" if home else ""
            raise CompilerNotFoundError(
                f"the MUSA SDK was not found{where}: set MUSA_HOME to its install directory (the "
                "one with bin/mcc and include/musa.h, usually /usr/local/musa). flash_kda compiles "
                f"its MUSA kernels with mcc from MUSA SDK >= {_fmt(MIN_MUSA_SDK)}; "
                "FLASH_KDA_BACKEND=cpu uses the CPU kernels instead.")
        return home

    def mcc(self, musa_home: str) -> list[str]:
        cmd = mcc_command(musa_home)
        exe = shutil.which(cmd[0]) if cmd else None
        if exe is None:
            src = "PYTORCH_MCC" if os.environ.get("PYTORCH_MCC") else "$MUSA_HOME/bin/mcc"
            raise CompilerNotFoundError(
                f"mcc, the MUSA compiler, was not found (looked for {' '.join(cmd) or '(empty)'!r} "
                f"from {src}, MUSA_HOME={musa_home}). Install the MUSA SDK >= {_fmt(MIN_MUSA_SDK)} "
                "and set MUSA_HOME to it (or PYTORCH_MCC to its mcc), or set FLASH_KDA_BACKEND=cpu.")
        return [exe, *cmd[1:]]

    def check_sdk(self, musa_home: str) -> tuple[int, int, int]:
        version = musa_header_version(musa_home)
        if version < MIN_MUSA_SDK:
            raise UnsupportedToolchainError(
                f"the MUSA SDK at {musa_home} is version {_fmt(version)}; flash_kda's fused chunk KDA "
                f"kernel needs MUSA SDK / MTCC >= {_fmt(MIN_MUSA_SDK)} (older MTCC, e.g. 4.3.6, may "
                f"fail to compile it). Install MUSA SDK >= {_fmt(MIN_MUSA_SDK)} and point MUSA_HOME at "
                "it, or set FLASH_KDA_BACKEND=cpu to use the CPU kernels.")
        return version

    def host_compiler(self) -> str:
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise CompilerNotFoundError(
                f"no host C++ compiler found (looked for {cxx!r}; set CXX to choose one). torch_musa "
                "compiles flash_kda's binding.cpp and links the module with it: install g++.")
        return cxx

    @staticmethod
    def _check_dtype_for_archs(spec, archs) -> None:
        """bf16 device code needs MP22+: torch_musa declares __mt_bfloat16 for device code only
        from MP22 (MP21 emulates bf16), so a bf16 module is not built for MP21 rather than left to
        fail inside mcc. fp16 specialisations build for MP21."""
        old = [a for a in archs if a < MIN_BF16_ARCH]
        if spec.dtype == "bf16" and old:
            names = ", ".join(f"mp_{ma}{mi}" for ma, mi in old)
            raise UnsupportedToolchainError(
                f"{spec.name}: bf16 device code needs MUSA arch mp_22 or newer, and {names} "
                "(MTT S80/S3000) only emulates bf16. Use fp16 inputs on this GPU, build for a newer "
                "arch (FLASH_KDA_MUSA_ARCH), or run bf16 on the CPU backend (FLASH_KDA_BACKEND=cpu).")

    # ---- plan ---------------------------------------------------------------------------------
    def plan(self, spec) -> BuildPlan:
        try:
            archs = archs_from_tag(spec.arch)
        except ValueError as e:
            raise UnsupportedToolchainError(str(e)) from e
        self._check_dtype_for_archs(spec, archs)
        torch_musa = import_torch_musa()
        musa_jit_load()  # raises if this torch_musa has no JIT load
        home = self.musa_home()
        mcc = self.mcc(home)
        sdk = self.check_sdk(home)
        require_ninja()
        cxx = self.host_compiler()

        defines = spec.defines()
        device_defines = defines + [d for d in ["-DFLASH_KDA_KERNEL_PORTABLE"] if d not in defines]
        # torch_musa's load adds -fPIC, -std=c++17 (when no -std is given: mcc rejects two) and its
        # include paths; the target arch is ours to give.
        device_flags = [*offload_arch_flags(archs), "-O2", *device_defines,
                        *env.extra_device_cflags()]
        compiler = (f"mcc {' '.join(mcc)} (MUSA SDK {_fmt(sdk)} at {home}, torch_musa "
                    f"{torch_musa_version(torch_musa)}): {run_version([*mcc, '--version'])}; "
                    f"host: {run_version([cxx, '--version'])}")
        return BuildPlan(
            loader="torch_musa",
            sources=[*host_sources(), str(csrc_dir() / "musa" / "kda_musa.mu")],
            extra_cflags=["-O3", *defines, *env.extra_cflags()],
            extra_device_cflags=device_flags,
            # torch_musa adds $MUSA_HOME/include as a system path too; naming it here ties the key
            # to the SDK the module is compiled against.
            extra_include_paths=[str(Path(home) / "include")],
            compiler=compiler,
        )
