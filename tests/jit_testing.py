"""Helpers of the JIT tests (test_jit.py, test_jit_cache.py): a copy of flash_kda/csrc whose CPU
kernel is a tiny stand-in (FLASH_KDA_CSRC_DIR), so that a build takes seconds, and child processes
that import flash_kda against a throwaway cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "flash_kda" / "csrc"
STUB_KERNEL = """// stand-in CPU kernel for the JIT tests: writes zeros
#include <string.h>
#include "../kda_params.h"
namespace flash_kda {
int64_t workspace_bytes(const KdaParams&) { return 0; }
void launch_kda(const KdaParams& p, void*) { (void)p; }
}
"""
IMPORT = "import flash_kda, sys; sys.stdout.write('ok')"


def make_stub_csrc(dst: Path) -> Path:
    shutil.copytree(CSRC, dst)
    (dst / "cpu" / "kda_cpu.cpp").write_text(STUB_KERNEL)
    return dst


def build_stub_cache(root: Path) -> dict:
    """A cold build of the stand-in kernel into root/cache (from root/csrc), timed."""
    csrc = make_stub_csrc(root / "csrc")
    cache = root / "cache"
    res, seconds = run_import(jit_env(cache, csrc))
    return dict(csrc=csrc, cache=cache, res=res, seconds=seconds)


def copy_of(built, tmp_path) -> tuple[Path, Path]:
    csrc, cache = tmp_path / "csrc", tmp_path / "cache"
    shutil.copytree(built["csrc"], csrc)
    shutil.copytree(built["cache"], cache)
    return csrc, cache


def jit_env(cache: Path | None, csrc: Path, **extra) -> dict:
    """The environment of a child process that uses `cache` (None: the default cache root, i.e.
    FLASH_KDA_CACHE_DIR unset) and compiles from `csrc`."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("FLASH_KDA_"):
            del env[k]
    env.update(FLASH_KDA_CSRC_DIR=str(csrc), FLASH_KDA_BACKEND="cpu", PYTHONPATH=str(REPO))
    if cache is not None:
        env["FLASH_KDA_CACHE_DIR"] = str(cache)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_import(env: dict, code: str = IMPORT, timeout=600):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    return res, time.perf_counter() - t0


def compiles(stderr: str) -> int:
    return stderr.count("flash_kda: compiling ")


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and (p / "meta.json").exists())


def include_closure(root: Path, start: list[str]) -> set[str]:
    """Every file under root that `start` (paths relative to root) reaches by #include "..."."""
    seen, todo = set(), list(start)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        path = root / rel
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M):
            target = (path.parent / name).resolve()
            if target.is_file() and root.resolve() in target.parents:
                todo.append(str(target.relative_to(root.resolve())))
    return seen
