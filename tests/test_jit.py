"""The JIT as a user meets it: cold build, cache hit, rebuild on source change, concurrent
imports, a build killed mid-way, a corrupted cached module, missing compiler, failing build.

These tests are about the JIT, not the kernel: they compile a copy of flash_kda/csrc whose CPU
kernel is replaced by a tiny stand-in (FLASH_KDA_CSRC_DIR), so each build takes seconds, and each
test uses its own throwaway cache directory (helpers: jit_testing.py; fixtures: conftest.py).
Cache directories and cleanup: test_jit_cache.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jit_testing import IMPORT, REPO, compiles, copy_of, entries, jit_env, run_import


def test_cold_build_then_cache_hit(built, tmp_path):
    res = built["res"]
    assert res.returncode == 0, res.stderr
    assert compiles(res.stderr) == 1 and "built kda_cpu_" in res.stderr
    csrc, cache = copy_of(built, tmp_path)
    [entry] = entries(cache)  # FLASH_KDA_CACHE_DIR honoured: the module lives there
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["spec"]["backend"] == "cpu" and meta["spec"]["head_dim"] == 128
    assert (cache / "logs" / f"{entry.name}.log").exists()
    so = entry / f"{meta['op_name']}.so"
    so_mtime = so.stat().st_mtime_ns

    res2, warm = run_import(jit_env(cache, csrc))
    assert res2.returncode == 0, res2.stderr
    assert compiles(res2.stderr) == 0, res2.stderr
    assert so.stat().st_mtime_ns == so_mtime
    assert entries(cache) == [entry]
    assert warm < built["seconds"]


def test_source_edit_rebuilds_and_other_backends_do_not(built, tmp_path):
    csrc, cache = copy_of(built, tmp_path)
    env = jit_env(cache, csrc)
    # editing a CUDA-only source leaves the CPU module's key alone
    (csrc / "cuda").mkdir(exist_ok=True)
    (csrc / "cuda" / "extra_note.cuh").write_text("// not part of the CPU module\n")
    res, _ = run_import(env)
    assert res.returncode == 0 and compiles(res.stderr) == 0, res.stderr
    # editing the CPU kernel source rebuilds (verbose: the compiler's command lines are streamed)
    with open(csrc / "cpu" / "kda_cpu.cpp", "a") as f:
        f.write("// edited\n")
    res, _ = run_import(jit_env(cache, csrc, FLASH_KDA_VERBOSE=1))
    assert res.returncode == 0, res.stderr
    assert compiles(res.stderr) == 1
    assert "kda_cpu.cpp" in res.stderr and "-O3" in res.stderr
    assert len(entries(cache)) == 2


def test_concurrent_imports_build_once(tmp_path, stub_csrc):
    cache = tmp_path / "cache"
    env = jit_env(cache, stub_csrc)
    procs = [subprocess.Popen([sys.executable, "-c", IMPORT], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    stderr = "".join(o[1] for o in outs)
    assert compiles(stderr) == 1, stderr
    assert "waiting for pid" in stderr
    assert len(entries(cache)) == 1


def test_killed_build_recovers(tmp_path, stub_csrc):
    cache = tmp_path / "cache"
    env = jit_env(cache, stub_csrc)
    proc = subprocess.Popen([sys.executable, "-c", IMPORT], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    # wait until the compiler runs, then kill the whole process group (like a cancelled job)
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(cache.glob(".tmp-*/build.ninja")):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the build never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert entries(cache) == []  # nothing half-written was published
    # a leftover torch baton must not matter either
    [tmp] = list(cache.glob(".tmp-*"))
    (tmp / "lock").write_text("")
    res, _ = run_import(env)
    assert res.returncode == 0, res.stderr
    assert compiles(res.stderr) == 1
    assert len(entries(cache)) == 1
    assert not list(cache.glob(".tmp-*")), "the dead build's temporary directory was not cleaned"


def test_corrupted_cached_module_is_rebuilt(built, tmp_path):
    csrc, cache = copy_of(built, tmp_path)
    env = jit_env(cache, csrc)
    [entry] = entries(cache)
    [so] = list(entry.glob("*.so"))
    so.write_bytes(b"\x7fELF this is not a shared library")
    res, _ = run_import(env)
    assert res.returncode == 0, res.stderr
    assert "failed to load" in res.stderr and compiles(res.stderr) == 1
    res, _ = run_import(env)
    assert res.returncode == 0 and compiles(res.stderr) == 0


def test_failing_build_gives_import_error_with_compiler_step_and_log(tmp_path, stub_csrc):
    (stub_csrc / "cpu" / "kda_cpu.cpp").write_text("this is not C++;\n")
    cache = tmp_path / "cache"
    code = ("try:\n    import flash_kda\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    res, _ = run_import(jit_env(cache, stub_csrc), code)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "IMPORTERROR" in out and "failed" in out
    assert "c++" in out or "g++" in out  # the compiler
    assert "kda_cpu.o" in out             # the failing step
    log = out.split("full build log: ")[1].split()[0]
    assert Path(log).exists() and "this is not C++" in Path(log).read_text()
    assert entries(cache) == []


def test_missing_compiler_message(tmp_path, stub_csrc):
    code = ("try:\n    import flash_kda\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    res, _ = run_import(jit_env(tmp_path / "cache", stub_csrc, CXX="no-such-compiler-xyz"), code)
    assert "IMPORTERROR" in res.stdout and "no C++ compiler found" in res.stdout
    assert "install g++" in res.stdout


def test_build_on_import_off_and_disable_jit(tmp_path, stub_csrc):
    cache = tmp_path / "cache"
    res, _ = run_import(jit_env(cache, stub_csrc, FLASH_KDA_BUILD_ON_IMPORT=0))
    assert res.returncode == 0 and compiles(res.stderr) == 0
    assert not cache.exists() or entries(cache) == []
    code = ("try:\n    import flash_kda\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    res, _ = run_import(jit_env(cache, stub_csrc, FLASH_KDA_DISABLE_JIT=1), code)
    assert "FLASH_KDA_DISABLE_JIT=1" in res.stdout and compiles(res.stderr) == 0


def test_key_covers_flags_compiler_and_torch(monkeypatch, stub_csrc):
    from flash_kda import jit
    from flash_kda.jit import build, cache
    monkeypatch.setenv("FLASH_KDA_CSRC_DIR", str(stub_csrc))
    spec = jit.KernelSpec("cpu", "x86_64_v3", 64, "fp32")
    plan, entry, material = build.resolve(spec)
    for field in ("sources", "plan", "python", "torch", "flash_kda"):
        assert field in material
    assert material["plan"]["compiler"]
    monkeypatch.setenv("FLASH_KDA_EXTRA_CFLAGS", "-DSOMETHING_ELSE")
    assert build.resolve(spec)[1].key != entry.key
    monkeypatch.delenv("FLASH_KDA_EXTRA_CFLAGS")
    assert build.resolve(spec)[1].key == entry.key
    changed = dict(material, torch="0.0.0")
    assert cache.key_of(changed) != entry.key
