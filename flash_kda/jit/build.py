"""build_and_load(spec): from a KernelSpec to a callable torch op, building it at most once.

    resolve plan + key  ->  load from cache  ->  pick a writable root  ->  (lock)  ->  load again
                        ->  build  ->  publish  ->  load

Loading only reads (a read-only prewarmed cache works); the writable root is chosen on a miss
(``cache.build_root``: an unwritable FLASH_KDA_CACHE_DIR is an error before anything is compiled).

The build runs in a child process (``_worker``) into a private temporary directory that is renamed
into the cache only when complete (see ``cache``); the lock (``lock``) makes concurrent processes
wait for one builder instead of all compiling. A cached library that fails to load is rebuilt once.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from . import cache, env
from .backends import get_toolchain
from .backends.base import csrc_dir
from .lock import build_lock
from .spec import KernelSpec


class KernelBuildError(RuntimeError):
    """Compiling a specialisation failed. The message names the compiler, the step and the log."""


class KernelLoadError(RuntimeError):
    """A built library could not be loaded, even after one rebuild."""


class MissingKernelError(RuntimeError):
    """FLASH_KDA_DISABLE_JIT=1 and the specialisation is not in the cache."""


_memo: dict[KernelSpec, "LoadedKernel"] = {}
_memo_lock = threading.RLock()


class LoadedKernel:
    """A loaded specialisation: its torch op plus where it came from."""

    def __init__(self, spec: KernelSpec, entry: cache.CacheEntry, built: bool, seconds: float):
        import torch
        self.spec = spec
        self.entry = entry
        self.built = built          # compiled by this process (False: loaded from cache)
        self.seconds = seconds      # build (or load) time
        self.op = getattr(torch.ops.flash_kda_kernels, entry.op_name)
        self.direct = _python_entry(entry.library) if env.direct_entry() else None

    def __repr__(self):
        return f"LoadedKernel({self.spec.name}, {self.entry.dir})"


def _python_entry(library: Path):
    """The library's direct entry (csrc/python_entry.cpp): the op's arguments, past torch's
    dispatcher; True if it ran, False if it declined the call (then the op must run). None where
    the library has none (then callers use the op alone)."""
    try:
        fetch = ctypes.PyDLL(str(library)).flash_kda_python_entry
    except (OSError, AttributeError):
        return None
    fetch.restype = ctypes.py_object
    fetch.argtypes = []
    try:
        return fetch()
    except (ValueError, SystemError):  # a null result: the entry could not be made
        return None


def clear_memo() -> None:
    """Forget loaded kernels of this process (tests; after editing sources in place)."""
    with _memo_lock:
        _memo.clear()


def resolve(spec: KernelSpec):
    """(plan, entry, material) for spec; raises CompilerNotFoundError if no compiler is present."""
    toolchain = get_toolchain(spec.backend)
    plan = toolchain.plan(spec)
    files = toolchain.hashed_files(spec)
    material = cache.key_material(spec, plan, files, csrc_dir())
    entry = cache.entry_for(spec.name, cache.key_of(material))
    return plan, entry, material


def _loaded_ops() -> set:
    import torch
    try:
        return {name for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("flash_kda_kernels::")}
    except AttributeError:  # very old torch: fall back to trying the load
        return set()


def _try_load(entry: cache.CacheEntry) -> tuple[bool, str | None]:
    """Load a published entry. Returns (ok, error): (False, None) if there is nothing valid to
    load, (False, message) if a published library failed to load."""
    import torch
    if f"flash_kda_kernels::{entry.op_name}" in _loaded_ops():
        return True, None
    if cache.read_valid_meta(entry) is None:
        return False, None
    try:
        torch.ops.load_library(str(entry.library))
    except (OSError, RuntimeError) as e:
        return False, f"{type(e).__name__}: {e}"
    if f"flash_kda_kernels::{entry.op_name}" not in _loaded_ops():
        return False, f"{entry.library} loaded but did not register {entry.op_name}"
    return True, None


def _say(msg: str) -> None:
    print(f"flash_kda: {msg}", file=sys.stderr, flush=True)


def _run_worker(entry: cache.CacheEntry, plan, tmp_dir: Path) -> None:
    """Compile into tmp_dir in a child process, with all its output in the entry's log."""
    request = tmp_dir / "request.json"
    plan_args = plan.as_dict()
    # The op name is derived from the key, so it is added here rather than being part of the plan.
    plan_args["extra_cflags"] = [*plan.extra_cflags, f"-DFLASH_KDA_OP_NAME={entry.op_name}"]
    with open(request, "w") as f:
        json.dump({"name": entry.op_name, "plan": plan_args, "build_directory": str(tmp_dir)},
                  f, indent=1)
    entry.log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flash_kda.jit._worker", str(request)]
    # The child must import this same flash_kda, wherever it was imported from.
    child_env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, child_env.get("PYTHONPATH")) if p)
    # The worker imports the flash_kda package; it must not start a build of its own (it would
    # wait for the lock we hold).
    child_env["FLASH_KDA_BUILD_ON_IMPORT"] = "0"
    stream = env.verbose()
    with open(entry.log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                text=True, errors="replace")
        try:
            for line in proc.stdout:
                log.write(line)
                if stream:
                    sys.stderr.write(line)
            rc = proc.wait()
        except BaseException:  # KeyboardInterrupt: don't leave a compiler running behind us
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        raise KernelBuildError(_failure_message(entry, plan, rc))
    if not (tmp_dir / f"{entry.op_name}.so").exists():
        raise KernelBuildError(f"building {entry.spec_name}: the compiler reported success but "
                               f"{entry.op_name}.so is missing; log: {entry.log_path}")


def _failure_message(entry: cache.CacheEntry, plan, rc: int) -> str:
    """Name the compiler, the failing step (ninja's FAILED line) and the first error, and the log."""
    lines = entry.log_path.read_text(errors="replace").splitlines()
    failed = next((i for i, ln in enumerate(lines) if ln.startswith("FAILED:")), None)
    if failed is None:
        step = f"the build worker exited with status {rc}"
        detail = lines[-15:]
    else:
        step = f"step {lines[failed][len('FAILED:'):].strip()}"
        errors = [ln for ln in lines[failed:] if "error" in ln.lower()]
        detail = (errors or lines[failed + 1:])[:12]
    compiler = plan.compiler_summary()
    return (f"building {entry.spec_name} failed ({compiler}): {step}\n"
            + "\n".join(f"  {ln}" for ln in detail) + f"\nfull build log: {entry.log_path}")


def _build(spec: KernelSpec, entry: cache.CacheEntry, plan, material: dict) -> float:
    cache.remove_stale_tmp(entry.root, entry.stem)
    tmp_dir = entry.new_tmp_dir()
    _say(f"compiling {spec.name} with {plan.compiler_summary()} (one-time, may take a "
         f"minute; cache {entry.root}; log {entry.log_path})")
    t0 = time.perf_counter()
    try:
        _run_worker(entry, plan, tmp_dir)
        # torch's own "lock" baton inside the build dir is meaningless once we hold ours; a killed
        # torch build leaves it behind and any later torch load in that directory would wait forever.
        (tmp_dir / "lock").unlink(missing_ok=True)
        seconds = time.perf_counter() - t0
        cache.publish(tmp_dir, entry, {"spec": spec.as_dict(), "material": material,
                                       "build_seconds": round(seconds, 2)})
    except BaseException:
        import shutil
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _say(f"built {spec.name} in {seconds:.1f} s")
    return seconds


def _load_cached(entry: cache.CacheEntry) -> cache.CacheEntry | None:
    """Load entry's key from the first cache root that has it; the entry loaded, or None."""
    for root in cache.lookup_roots():
        candidate = replace(entry, root=root)
        if _try_load(candidate)[0]:
            return candidate
    return None


def _build_locked(spec: KernelSpec, entry: cache.CacheEntry, plan, material: dict) -> float | None:
    """Build and load entry under its lock; build seconds, or None if another process published
    it while we waited for the lock."""
    with build_lock(entry.lock_path, spec.name):
        ok, err = _try_load(entry)  # another process may have built it while we waited
        if ok:
            return None
        if err is not None:  # published but broken: rebuild it once
            _say(f"cached {spec.name} failed to load ({err}); rebuilding it")
            cache.remove_entry(entry)
        seconds = _build(spec, entry, plan, material)
        ok, err = _try_load(entry)
        if not ok:
            raise KernelLoadError(f"{spec.name} was just built but fails to load: {err}; "
                                  f"library {entry.library}, log {entry.log_path}")
        return seconds


def build_and_load(spec: KernelSpec) -> LoadedKernel:
    """The loaded kernel for spec, compiling it if the cache does not have it."""
    with _memo_lock:
        hit = _memo.get(spec)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        plan, entry, material = resolve(spec)
        found = _load_cached(entry)
        built_seconds = None
        if found is None:
            if env.disable_jit():
                roots = " or ".join(str(r) for r in cache.lookup_roots()) or str(entry.root)
                raise MissingKernelError(
                    f"{spec.name} is not in the cache {roots} and FLASH_KDA_DISABLE_JIT=1 "
                    "forbids compiling it; prewarm it with tools/prewarm.py")
            found = replace(entry, root=cache.build_root(spec.name))  # may raise CacheDirError
            built_seconds = _build_locked(spec, found, plan, material)
        seconds = built_seconds if built_seconds is not None else time.perf_counter() - t0
        kernel = LoadedKernel(spec, found, built_seconds is not None, seconds)
        _memo[spec] = kernel
        return kernel
