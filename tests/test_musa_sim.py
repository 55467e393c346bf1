"""The MUSA build path, driven on a CPU-only machine through a simulated toolchain.

No Moore Threads GPU, MUSA SDK or torch_musa is needed: ``tests/fake_musa`` holds a fake
``torch_musa`` package (device detection, and a JIT ``load`` that records its arguments and runs
mcc the way torch_musa's build does) and a fake ``mcc`` (records its argv, answers ``--version``,
preprocesses the MUSA translation unit once per pass and rejects NVIDIA-only code in it). Each test
gets a fake MUSA SDK directory of its own (``bin/mcc``, ``include/musa.h`` with the MUSA_VERSION
the test needs, header stubs) and a throwaway cache.

Nothing real is compiled, so these tests take seconds. The fake torch_musa is imported in this
process for the detection and planning tests; the ``fake_musa`` fixture removes it from
``sys.modules`` and restores ``torch.version.musa`` / ``torch.musa`` afterwards, so no other test
sees it. The end-to-end tests run the real build worker (a child process) against it.

On a machine where the real torch_musa is installed these tests are skipped: the real MUSA
tests (``pytest tests``) exercise the real toolchain there.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("torch_musa") is not None or getattr(torch.version, "musa", None):
    pytest.skip("a real torch_musa is installed: the simulated MUSA toolchain tests do not apply",
                allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).resolve().parent / "fake_musa"
CSRC = REPO / "flash_kda" / "csrc"

# Everything in the environment that would change what these tests see.
CLEARED_ENV = (
    "FLASH_KDA_BACKEND", "FLASH_KDA_MUSA_ARCH", "MTGPU_TARGET", "FLASH_KDA_KERNEL",
    "FLASH_KDA_EXTRA_CFLAGS", "FLASH_KDA_EXTRA_CUDA_CFLAGS", "FLASH_KDA_CSRC_DIR",
    "FLASH_KDA_DISABLE_JIT", "FLASH_KDA_VERBOSE", "MUSA_HOME", "MUSA_PATH", "PYTORCH_MCC", "CC",
    "FAKE_TORCH_MUSA_VERSION", "FAKE_MUSA_RUNTIME_VERSION", "FAKE_MUSA_DEVICE_COUNT",
    "FAKE_MUSA_CAPABILITY", "FAKE_MUSA_LOAD_RECORD", "FAKE_MCC_LOG", "FAKE_MCC_FAIL",
)


@pytest.fixture
def jit(monkeypatch, tmp_path):
    """flash_kda.jit with a clean environment, no build on import and a throwaway cache."""
    for var in CLEARED_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLASH_KDA_BUILD_ON_IMPORT", "0")
    monkeypatch.setenv("FLASH_KDA_CACHE_DIR", str(tmp_path / "cache"))
    # A torch_musa build of torch has no CUDA: detection must decide without asking CUDA.
    monkeypatch.setattr(torch.version, "cuda", None)

    def no_cuda(*a, **k):
        raise AssertionError("MUSA detection touched torch.cuda")
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    import flash_kda.jit as jit_module
    jit_module.clear_memo()
    yield jit_module
    jit_module.clear_memo()


class FakeMusa:
    """One fake MUSA SDK directory plus the records the fake toolchain writes."""

    def __init__(self, root: Path):
        self.home = root / "musa"
        shutil.copytree(FAKE / "sdk", self.home)
        (self.home / "bin").mkdir()
        self.mcc_log = root / "mcc-calls.jsonl"
        self.load_log = root / "load-calls.jsonl"
        self.write_mcc("5.1.0")
        self.write_sdk_version(50100)

    @property
    def mcc(self) -> Path:
        return self.home / "bin" / "mcc"

    def write_mcc(self, version: str, mtime_ns: int | None = None) -> None:
        """A copy of the fake mcc that reports `version` (run by this test's Python)."""
        text = (FAKE / "mcc").read_text()
        assert text.startswith("#!") and 'VERSION = "5.1.0"' in text
        text = f"#!{sys.executable}\n" + text.split("\n", 1)[1]
        self.mcc.write_text(text.replace('VERSION = "5.1.0"', f'VERSION = "{version}"'))
        self.mcc.chmod(0o755)
        if mtime_ns is not None:  # the --version memo is keyed by the compiler's size and mtime
            os.utime(self.mcc, ns=(mtime_ns, mtime_ns))

    def write_sdk_version(self, number: int | None) -> None:
        define = f"#define MUSA_VERSION {number}\n" if number is not None else ""
        (self.home / "include" / "musa.h").write_text(
            f"// fake MUSA SDK driver header (flash_kda tests)\n#pragma once\n{define}")

    @staticmethod
    def _jsonl(path: Path) -> list[dict]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def mcc_calls(self) -> list[list[str]]:
        return [rec["argv"] for rec in self._jsonl(self.mcc_log)]

    def compile_calls(self) -> list[list[str]]:
        return [argv for argv in self.mcc_calls() if "-c" in argv]

    def load_calls(self) -> list[dict]:
        return self._jsonl(self.load_log)


@pytest.fixture
def fake_musa(jit, monkeypatch, tmp_path):
    """The fake torch_musa importable (here and in child processes) and a fake SDK at MUSA_HOME."""
    fake = FakeMusa(tmp_path)
    monkeypatch.setenv("MUSA_HOME", str(fake.home))
    monkeypatch.setenv("FAKE_MCC_LOG", str(fake.mcc_log))
    monkeypatch.setenv("FAKE_MUSA_LOAD_RECORD", str(fake.load_log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(FAKE), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.syspath_prepend(str(FAKE))
    had_version, old_version = hasattr(torch.version, "musa"), getattr(torch.version, "musa", None)
    had_musa, old_musa = hasattr(torch, "musa"), getattr(torch, "musa", None)
    try:
        yield fake
    finally:
        for name in [m for m in sys.modules if m == "torch_musa" or m.startswith("torch_musa.")]:
            del sys.modules[name]
        for obj, attr, had, old in ((torch.version, "musa", had_version, old_version),
                                    (torch, "musa", had_musa, old_musa)):
            if had:
                setattr(obj, attr, old)
            elif hasattr(obj, attr):
                delattr(obj, attr)
        importlib.invalidate_caches()


def musa_spec(arch="mp31", head_dim=128, dtype="bf16"):
    from flash_kda.jit import KernelSpec
    return KernelSpec("musa", arch, head_dim, dtype)


def toolchain():
    from flash_kda.jit.backends import get_toolchain
    return get_toolchain("musa")


def offload_flags(flags):
    return [f for f in flags if "offload-arch" in f or "gpu-arch" in f]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
def test_detects_musa_from_torch_musa_without_touching_cuda(fake_musa, jit):
    assert "torch_musa" not in sys.modules  # nothing left over from another test
    assert jit.default_backend() == "musa"
    assert torch.version.musa == "5.1.0" and torch.musa.is_available()
    tc = toolchain()
    assert tc.backend == "musa" and tc.device_available()
    assert tc.arch_tag() == "mp31"  # from torch.musa.get_device_capability() == (3, 1)
    spec = jit.default_spec()
    assert (spec.backend, spec.arch, spec.head_dim, spec.dtype) == ("musa", "mp31", 128, "bf16")
    assert spec.name == "kda_musa_mp31_d128_bf16"
    # Tensors of the renamed PrivateUse1 device ("musa") route to the MUSA backend.
    from flash_kda.jit.select import backend_of_device
    dev = torch.device("privateuseone", 0)
    assert backend_of_device(dev) == "musa"
    assert jit.spec_for(dev, 64, torch.float16).name == "kda_musa_mp31_d64_fp16"


def test_detection_without_torch_musa_is_cpu(jit, tmp_path):
    assert importlib.util.find_spec("torch_musa") is None
    assert jit.default_backend() == "cpu"
    assert "torch_musa" not in sys.modules and getattr(torch.version, "musa", None) is None
    tc = toolchain()
    assert not tc.device_available()
    with pytest.raises(jit.UnsupportedToolchainError, match="FLASH_KDA_MUSA_ARCH"):
        tc.arch_tag()
    with pytest.raises(jit.UnsupportedToolchainError, match="torch_musa.*FLASH_KDA_BACKEND=cpu"):
        tc.plan(musa_spec())


def test_torch_musa_without_a_device_is_not_musa(fake_musa, jit, monkeypatch):
    monkeypatch.setenv("FAKE_MUSA_DEVICE_COUNT", "0")
    assert jit.default_backend() == "cpu"
    with pytest.raises(jit.UnsupportedToolchainError, match="no MUSA device.*FLASH_KDA_MUSA_ARCH"):
        toolchain().arch_tag()
    monkeypatch.setenv("FLASH_KDA_MUSA_ARCH", "mp_31")  # prewarming for a GPU that is not here
    assert toolchain().arch_tag() == "mp31"
    monkeypatch.setenv("FLASH_KDA_BACKEND", "musa")
    assert jit.default_spec().name == "kda_musa_mp31_d128_bf16"


# ---------------------------------------------------------------------------------------------
# The build plan
# ---------------------------------------------------------------------------------------------
def test_plan_for_mp31(fake_musa, jit):
    spec = jit.default_spec("musa")
    plan = toolchain().plan(spec)
    assert plan.loader == "torch_musa"
    # The host units go to the host compiler; every device translation unit is .mu (torch_musa
    # hands only .mu/.muh to mcc).
    host = [str(CSRC / "binding.cpp"), str(CSRC / "python_entry.cpp")]
    assert plan.sources == host + [str(CSRC / "musa" / "kda_musa.mu")]
    assert all(Path(s).exists() for s in plan.sources)
    assert all(s.endswith(".mu") for s in plan.sources if s not in host)
    assert '#include "../cuda/kda_cuda.cu"' in (CSRC / "musa" / "kda_musa.mu").read_text()

    dev = plan.extra_device_cflags
    assert offload_flags(dev) == ["--offload-arch=mp_31"]
    for flag in ("-DFLASH_KDA_BACKEND_MUSA", "-DFLASH_KDA_HEAD_DIM=128", "-DFLASH_KDA_DTYPE_BF16",
                 "-DFLASH_KDA_KERNEL_PORTABLE"):
        assert dev.count(flag) == 1, flag
    assert any(f in dev for f in ("-O2", "-O3"))
    assert not any(f.startswith("-std=") for f in dev)  # torch_musa adds exactly one
    host = plan.extra_cflags
    for flag in ("-DFLASH_KDA_BACKEND_MUSA", "-DFLASH_KDA_HEAD_DIM=128", "-DFLASH_KDA_DTYPE_BF16"):
        assert flag in host, flag
    assert not offload_flags(host)
    everything = " ".join(host + dev)
    assert "FLASH_KDA_BACKEND_CUDA" not in everything and "FLASH_KDA_BACKEND_CPU" not in everything
    assert "gencode" not in everything and "sm_" not in everything
    assert plan.extra_include_paths == [str(fake_musa.home / "include")]
    # The identity names mcc, its version and the SDK version (all part of the cache key).
    assert "mcc" in plan.compiler and "mcc version 5.1.0" in plan.compiler
    assert "MUSA SDK 5.1.0" in plan.compiler and "torch_musa 2.7.1" in plan.compiler

    rel = {str(p.relative_to(CSRC)) for p in toolchain().hashed_files(spec)}
    assert {"port.cuh", "port_device.cuh", "binding.cpp", "binding.h", "python_entry.cpp", "kda_params.h",
            "musa/kda_musa.mu", "cuda/kda_cuda.cu", "cuda/kda_chunk_portable.cuh"} <= rel
    assert not any(r.startswith("cpu/") for r in rel)
    from jit_testing import include_closure  # every header the translation unit can reach
    reached = include_closure(CSRC, ["musa/kda_musa.mu", "binding.cpp", "python_entry.cpp"])
    assert "cuda/kda_cuda.cu" in reached and reached <= rel, f"not in the key: {sorted(reached - rel)}"

    fp16 = toolchain().plan(musa_spec(head_dim=64, dtype="fp16"))
    assert "-DFLASH_KDA_HEAD_DIM=64" in fp16.extra_device_cflags
    assert "-DFLASH_KDA_DTYPE_FP16" in fp16.extra_device_cflags
    assert "-DFLASH_KDA_DTYPE_BF16" not in fp16.extra_device_cflags


@pytest.mark.parametrize("var,value", [("FLASH_KDA_MUSA_ARCH", "mp_22"), ("FLASH_KDA_MUSA_ARCH", "2.2"),
                                       ("MTGPU_TARGET", "mp_22")])
def test_arch_override(fake_musa, jit, monkeypatch, var, value):
    monkeypatch.setenv("FAKE_MUSA_CAPABILITY", "3.1")  # the device says mp_31; the override wins
    monkeypatch.setenv(var, value)
    spec = jit.default_spec("musa")
    assert spec.arch == "mp22" and spec.name == "kda_musa_mp22_d128_bf16"
    assert offload_flags(toolchain().plan(spec).extra_device_cflags) == ["--offload-arch=mp_22"]


def test_arch_from_capability_and_lists(fake_musa, jit, monkeypatch):
    monkeypatch.setenv("FAKE_MUSA_CAPABILITY", "2.2")
    assert toolchain().arch_tag() == "mp22"
    monkeypatch.setenv("FLASH_KDA_MUSA_ARCH", "mp_31;mp_22")
    spec = jit.default_spec("musa")
    assert spec.arch == "mp22_mp31"
    assert offload_flags(toolchain().plan(spec).extra_device_cflags) == [
        "--offload-arch=mp_22", "--offload-arch=mp_31"]
    monkeypatch.setenv("FLASH_KDA_MUSA_ARCH", "sm_90")
    with pytest.raises(ValueError, match="MUSA arch"):
        toolchain().arch_tag()


def test_bf16_needs_mp22_fp16_builds_for_mp21(fake_musa, jit, monkeypatch):
    monkeypatch.setenv("FLASH_KDA_MUSA_ARCH", "mp_21")
    with pytest.raises(jit.UnsupportedToolchainError, match="bf16.*mp_22.*fp16"):
        toolchain().plan(musa_spec("mp21", dtype="bf16"))
    # so the module `import flash_kda` builds on MP21 is the fp16 one, which it can compile
    default = jit.default_spec("musa")
    assert (default.arch, default.dtype) == ("mp21", "fp16")
    plan = toolchain().plan(default)
    assert offload_flags(plan.extra_device_cflags) == ["--offload-arch=mp_21"]


def test_cache_key_covers_arch_and_mtcc_version(fake_musa, jit):
    from flash_kda.jit.build import resolve
    plan, entry, material = resolve(musa_spec("mp31"))
    assert "mp31" in entry.stem and "mp31" in entry.op_name
    assert material["spec"]["arch"] == "mp31"
    assert "--offload-arch=mp_31" in material["plan"]["extra_device_cflags"]
    assert "mcc version 5.1.0" in material["plan"]["compiler"]
    assert material["musa"] == "5.1.0"  # torch.version.musa

    _, entry22, _ = resolve(musa_spec("mp22"))
    assert "mp22" in entry22.stem and entry22.key != entry.key

    # Same spec, new MTCC: new key (the --version memo notices the new compiler file).
    st = fake_musa.mcc.stat()
    fake_musa.write_mcc("5.2.0", mtime_ns=st.st_mtime_ns + 1_000_000_000)
    _, entry_new_mcc, material_new = resolve(musa_spec("mp31"))
    assert "mcc version 5.2.0" in material_new["plan"]["compiler"]
    assert entry_new_mcc.stem.startswith("kda_musa_mp31_d128_bf16-")
    assert entry_new_mcc.key != entry.key

    # Same spec and mcc, new SDK headers: new key.
    fake_musa.write_sdk_version(50200)
    _, entry_new_sdk, _ = resolve(musa_spec("mp31"))
    assert entry_new_sdk.key not in (entry.key, entry_new_mcc.key)

    # Nothing changed: the key is stable.
    assert resolve(musa_spec("mp31"))[1].key == entry_new_sdk.key


# ---------------------------------------------------------------------------------------------
# Refusals: each with the message a user can act on
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("number,shown", [(40306, "4.3.6"), (50000, "5.0.0")])
def test_sdk_older_than_5_1_is_refused(fake_musa, jit, number, shown):
    fake_musa.write_sdk_version(number)
    with pytest.raises(jit.UnsupportedToolchainError) as info:
        toolchain().plan(musa_spec())
    msg = str(info.value)
    assert shown in msg and "5.1.0" in msg and "MUSA_HOME" in msg
    with pytest.raises(jit.UnsupportedToolchainError, match="5.1.0"):
        jit.build_and_load(musa_spec())
    assert fake_musa.compile_calls() == [] and fake_musa.load_calls() == []


def test_sdk_version_unreadable(fake_musa, jit):
    fake_musa.write_sdk_version(None)
    with pytest.raises(jit.UnsupportedToolchainError, match="MUSA_VERSION"):
        toolchain().plan(musa_spec())
    (fake_musa.home / "include" / "musa.h").unlink()
    with pytest.raises(jit.CompilerNotFoundError, match="musa.h"):
        toolchain().plan(musa_spec())


def test_torch_musa_without_jit_load_names_2_7(fake_musa, jit, monkeypatch):
    monkeypatch.setenv("FAKE_TORCH_MUSA_VERSION", "2.5.0")  # has load_inline, no load
    with pytest.raises(jit.UnsupportedToolchainError) as info:
        toolchain().plan(musa_spec())
    msg = str(info.value)
    assert "2.7.0" in msg and "2.5.0" in msg and "musa_extension.load" in msg
    with pytest.raises(jit.UnsupportedToolchainError, match="2.7.0"):
        jit.build_and_load(musa_spec())
    assert fake_musa.load_calls() == []


def test_missing_mcc_or_sdk(fake_musa, jit, monkeypatch, tmp_path):
    fake_musa.mcc.unlink()
    with pytest.raises(jit.CompilerNotFoundError, match="mcc.*MUSA_HOME"):
        toolchain().plan(musa_spec())
    monkeypatch.setenv("MUSA_HOME", str(tmp_path / "no-such-sdk"))
    with pytest.raises(jit.CompilerNotFoundError, match="MUSA SDK was not found.*MUSA_HOME"):
        toolchain().plan(musa_spec())
    with pytest.raises(jit.CompilerNotFoundError):
        jit.build_and_load(musa_spec())
    assert fake_musa.load_calls() == []


def test_musa_home_and_mcc_lookup(fake_musa, jit, monkeypatch, tmp_path):
    # PYTORCH_MCC names the compiler (as torch_musa reads it); the SDK stays at MUSA_HOME.
    other = tmp_path / "elsewhere" / "mcc"
    other.parent.mkdir()
    shutil.copy2(fake_musa.mcc, other)
    fake_musa.mcc.unlink()
    monkeypatch.setenv("PYTORCH_MCC", str(other))
    assert str(other) in toolchain().plan(musa_spec()).compiler
    monkeypatch.setenv("PYTORCH_MCC", str(tmp_path / "missing-mcc"))
    with pytest.raises(jit.CompilerNotFoundError, match="PYTORCH_MCC"):
        toolchain().plan(musa_spec())
    # No MUSA_HOME: the SDK is the directory above the mcc on PATH.
    monkeypatch.delenv("PYTORCH_MCC")
    fake_musa.write_mcc("5.1.0")
    monkeypatch.delenv("MUSA_HOME")
    monkeypatch.setenv("PATH", f"{fake_musa.home / 'bin'}{os.pathsep}{os.environ['PATH']}")
    plan = toolchain().plan(musa_spec())
    assert plan.extra_include_paths == [str(fake_musa.home / "include")]


# ---------------------------------------------------------------------------------------------
# End to end: build_and_load -> lock -> worker process -> torch_musa load -> mcc
# ---------------------------------------------------------------------------------------------
def _assert_mcc_got_the_plan(fake_musa, plan, entry):
    calls = fake_musa.compile_calls()
    assert len(calls) == 1, calls
    argv = calls[0]
    assert argv[0] == str(fake_musa.mcc)
    src = argv[argv.index("-c") + 1]
    assert src == str(CSRC / "musa" / "kda_musa.mu")
    assert argv[argv.index("-o") + 1].endswith("kda_musa.musa.o")
    assert offload_flags(argv) == ["--offload-arch=mp_31"]
    for flag in ("-DFLASH_KDA_BACKEND_MUSA", "-DFLASH_KDA_HEAD_DIM=128", "-DFLASH_KDA_DTYPE_BF16",
                 "-DFLASH_KDA_KERNEL_PORTABLE", "-fPIC", f"-I{fake_musa.home / 'include'}"):
        assert flag in argv, flag
    assert sum(a.startswith("-std=") for a in argv) == 1
    assert "-ccbin" not in argv

    (record,) = fake_musa.load_calls()
    kw = record["kwargs"]
    assert kw["name"] == entry.op_name and kw["is_python_module"] is False
    assert kw["sources"] == plan.sources
    assert kw["extra_musa_cflags"] == plan.extra_device_cflags
    assert kw["extra_cflags"] == plan.extra_cflags + [f"-DFLASH_KDA_OP_NAME={entry.op_name}"]
    assert kw["extra_include_paths"] == plan.extra_include_paths
    assert Path(kw["build_directory"]).parent == entry.root  # our cache, not torch's
    host = [s for s in record["steps"] if s["kind"] == "cxx"]
    assert [Path(s["argv"][s["argv"].index("-c") + 1]).name for s in host] == ["binding.cpp", "python_entry.cpp"]


def test_build_runs_the_fake_toolchain_and_reports_compile_errors(fake_musa, jit, monkeypatch):
    from flash_kda.jit.build import resolve
    monkeypatch.setenv("FAKE_MCC_FAIL", "1")
    plan, entry, _ = resolve(musa_spec())
    with pytest.raises(jit.KernelBuildError) as info:
        jit.build_and_load(musa_spec())
    msg = str(info.value)
    assert "kda_musa_mp31_d128_bf16" in msg and "mcc" in msg
    assert "kda_musa.musa.o" in msg                      # ninja's failed step
    assert "fake mcc was told to fail" in msg            # the compiler's error line
    assert str(entry.log_path) in msg and entry.log_path.exists()
    _assert_mcc_got_the_plan(fake_musa, plan, entry)
    # Nothing half-built is left in the cache.
    assert not entry.dir.exists()
    assert not list(entry.root.glob(".tmp-*"))


def test_build_passes_mcc_then_stops_at_the_placeholder_library(fake_musa, jit, monkeypatch):
    """The fake mcc accepts the translation unit (all passes preprocess, no NVIDIA-only code);
    the fake torch_musa writes a placeholder .so, which flash_kda publishes and then fails to
    load: the simulation ends exactly where a real MUSA library would be needed."""
    from flash_kda.jit.build import resolve
    monkeypatch.setenv("CC", "gcc")  # torch_musa would turn it into `mcc -ccbin gcc`
    plan, entry, _ = resolve(musa_spec())
    with pytest.raises(jit.KernelLoadError, match="just built but fails to load") as info:
        jit.build_and_load(musa_spec())
    assert str(entry.library) in str(info.value)
    _assert_mcc_got_the_plan(fake_musa, plan, entry)
    log = entry.log_path.read_text()
    assert "CC unset for the MUSA build" in log and "torch_musa load" in log
    meta = json.loads(entry.meta_path.read_text())
    assert meta["key"] == entry.key and meta["spec"]["arch"] == "mp31"
    assert meta["material"]["plan"]["loader"] == "torch_musa"


def test_fake_mcc_rejects_nvidia_only_code(fake_musa, tmp_path):
    """The check the end-to-end build relies on: the fake mcc fails on inline asm in a .mu."""
    import subprocess
    src = tmp_path / "csrc" / "musa" / "bad.mu"
    src.parent.mkdir(parents=True)
    src.write_text('#if defined(__MUSA_ARCH__)\n__device__ void f() { asm volatile("bar.sync 0;"); }\n'
                   '#endif\n')
    res = subprocess.run([str(fake_musa.mcc), "--offload-arch=mp_31", "-c", str(src), "-o",
                          str(tmp_path / "bad.o")], capture_output=True, text=True)
    assert res.returncode != 0 and "NVIDIA-only code" in res.stderr and "310" in res.stderr
    res = subprocess.run([str(fake_musa.mcc), "-c", str(src), "-o", str(tmp_path / "bad.o")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "--offload-arch" in res.stderr
