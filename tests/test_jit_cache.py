"""The cache directory as a user meets it: a read-only or missing $HOME (builds fall back to a
private per-user temp directory), an unwritable FLASH_KDA_CACHE_DIR (an error before anything is
compiled), a read-only prewarmed cache (still loads), and `tools/prewarm.py --clear / --prune`.

Same stand-in kernel and throwaway caches as test_jit.py. The tests may run as root, where chmod
does not stop writes: "cannot be created" is a regular file where a directory should be (which
stops root too), "read-only" is a patched write probe, and the chmod variants skip as root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from jit_testing import REPO, compiles, copy_of, entries, jit_env, run_import

from flash_kda import jit
from flash_kda.jit import cache, cleanup, env
from flash_kda.jit.spec import KernelSpec

IMPORT_ERROR = "try:\n    import flash_kda\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
FALLBACK_SAYS = "is not writable"  # the one-line notice of a build falling back
PREWARM = str(REPO / "tools" / "prewarm.py")


def fallback_dir(tmp: Path) -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else None
    return tmp / f"flash_kda-{uid}"


def blocked_path(tmp_path: Path) -> Path:
    """A path under which no directory can be created, not even by root: its parent is a file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a directory is expected\n")
    return blocker


def chmod_read_only(directory: Path) -> None:
    """chmod -R a-w directory; skip the test if that does not stop writes (root)."""
    for path in [directory, *directory.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o555)
    try:
        (directory / ".can-i-write").touch()
    except PermissionError:
        return
    (directory / ".can-i-write").unlink()
    make_writable(directory)
    pytest.skip("chmod does not stop this user's writes (running as root)")


def make_writable(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def tree_state(root: Path) -> dict:
    """Every path under root (root included) with its size and mtime: any write shows."""
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def prewarm(env_vars: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PREWARM, *args], env=env_vars, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


# -- Which root: in-process, with the environment of a user whose default root is <tmp>/xdg -----

@pytest.fixture
def roots(monkeypatch, tmp_path):
    """FLASH_KDA_CACHE_DIR unset, default root <tmp>/xdg/flash_kda, temp dir <tmp>/tmp."""
    monkeypatch.delenv("FLASH_KDA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(cache, "_fallback_announced", False)
    return dict(default=tmp_path / "xdg" / "flash_kda", fallback=fallback_dir(tmp_path / "tmp"))


def refuse_probe_in(monkeypatch, directory: Path) -> None:
    """Make `directory` look like a read-only mount to the write probe (works as root too)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == directory:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(directory))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(cache.tempfile, "mkstemp", mkstemp)


def test_writable_default_root_is_used(roots, capsys):
    assert cache.build_root() == roots["default"]
    assert cache.lookup_roots() == [roots["default"]]
    assert list(roots["default"].iterdir()) == []  # the write probe cleaned up after itself
    assert not roots["fallback"].exists()
    assert capsys.readouterr().err == ""


def test_default_root_that_cannot_be_created_falls_back_once(roots, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked_path(tmp_path)))
    default = env.default_cache_root()
    assert cache.build_root() == roots["fallback"]
    assert cache.build_root() == roots["fallback"]
    err = capsys.readouterr().err
    assert err.count(FALLBACK_SAYS) == 1, err  # said once per process, not per build
    assert str(default) in err and str(roots["fallback"]) in err and "FLASH_KDA_CACHE_DIR" in err
    assert roots["fallback"].stat().st_mode & 0o777 == 0o700
    assert cache.lookup_roots() == [default, roots["fallback"]]


def test_read_only_default_root_falls_back(roots, monkeypatch, capsys):
    roots["default"].mkdir(parents=True)
    refuse_probe_in(monkeypatch, roots["default"])
    assert cache.build_root() == roots["fallback"]
    assert "Read-only file system" in capsys.readouterr().err


def test_chmod_read_only_default_root_falls_back(roots, capsys):
    roots["default"].mkdir(parents=True)
    chmod_read_only(roots["default"])
    try:
        assert cache.build_root() == roots["fallback"]
    finally:
        make_writable(roots["default"])
    assert FALLBACK_SAYS in capsys.readouterr().err


def test_no_home_directory_falls_back(roots, monkeypatch, capsys):
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert env.default_cache_root() is None
    assert env.cache_root() == roots["fallback"]
    assert cache.build_root() == roots["fallback"]
    assert "no home directory" in capsys.readouterr().err


def test_unwritable_cache_dir_variable_is_an_error_not_a_fallback(roots, monkeypatch, tmp_path):
    chosen = blocked_path(tmp_path) / "cache"
    monkeypatch.setenv("FLASH_KDA_CACHE_DIR", str(chosen))
    with pytest.raises(jit.CacheDirError, match="FLASH_KDA_CACHE_DIR") as e:
        cache.build_root()
    assert str(chosen) in str(e.value)
    existing = tmp_path / "read-only-cache"
    existing.mkdir()
    monkeypatch.setenv("FLASH_KDA_CACHE_DIR", str(existing))
    refuse_probe_in(monkeypatch, existing)
    with pytest.raises(jit.CacheDirError, match="Read-only file system"):
        cache.build_root()
    assert not roots["fallback"].exists()


def test_chmod_read_only_cache_dir_variable_is_an_error(roots, monkeypatch, tmp_path):
    chosen = tmp_path / "read-only-cache"
    chosen.mkdir()
    monkeypatch.setenv("FLASH_KDA_CACHE_DIR", str(chosen))
    chmod_read_only(chosen)
    try:
        with pytest.raises(jit.CacheDirError, match="FLASH_KDA_CACHE_DIR"):
            cache.build_root()
    finally:
        make_writable(chosen)


def test_fallback_must_be_private(roots, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked_path(tmp_path)))
    fallback = roots["fallback"]
    fallback.mkdir(mode=0o700)
    fallback.chmod(0o777)  # anyone could have put a library in there
    with pytest.raises(jit.CacheDirError, match="other users can write") as e:
        cache.build_root()
    assert "FLASH_KDA_CACHE_DIR" in str(e.value)
    assert fallback not in cache.lookup_roots()
    fallback.rmdir()
    fallback.symlink_to(tmp_path)  # a link planted in a shared temp dir is refused too
    with pytest.raises(jit.CacheDirError, match="symbolic link"):
        cache.build_root()
    fallback.unlink()
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # only root can give it away
        fallback.mkdir(mode=0o700)
        os.chown(fallback, 54321, -1)
        with pytest.raises(jit.CacheDirError, match="belongs to uid 54321"):
            cache.build_root()


# -- Whole processes ---------------------------------------------------------------------------

def test_unwritable_cache_dir_variable_fails_import_before_compiling(tmp_path, stub_csrc):
    chosen = blocked_path(tmp_path) / "cache"
    (tmp_path / "tmp").mkdir()
    res, _ = run_import(jit_env(chosen, stub_csrc, TMPDIR=tmp_path / "tmp"), IMPORT_ERROR)
    assert "IMPORTERROR" in res.stdout, res.stderr
    assert f"FLASH_KDA_CACHE_DIR={chosen} is not writable" in res.stdout
    assert "kda_cpu_" in res.stdout  # which kernel it could not build
    assert compiles(res.stderr) == 0
    assert list((tmp_path / "tmp").iterdir()) == []  # and no silent fallback


def test_read_only_prewarmed_cache_still_loads(built, tmp_path):
    """A prewarmed cache in a read-only image: loading must neither write nor need to."""
    csrc, cache_dir = copy_of(built, tmp_path)
    default_parent = tmp_path / "xdg"
    default_parent.mkdir()
    default_root = default_parent / "flash_kda"
    cache_dir.rename(default_root)
    (tmp_path / "tmp").mkdir()
    via_variable = jit_env(default_root, csrc, TMPDIR=tmp_path / "tmp")
    via_default = jit_env(None, csrc, XDG_CACHE_HOME=default_parent, TMPDIR=tmp_path / "tmp")
    before = tree_state(default_root)
    for env_vars in (via_variable, via_default,
                     dict(via_default, FLASH_KDA_DISABLE_JIT="1")):
        res, _ = run_import(env_vars)
        assert res.returncode == 0 and res.stdout == "ok", res.stderr
        assert compiles(res.stderr) == 0 and FALLBACK_SAYS not in res.stderr, res.stderr
        # not even a write probe (it would change the directory's mtime), no fallback created
        assert tree_state(default_root) == before
        assert list((tmp_path / "tmp").iterdir()) == []


def test_chmod_read_only_prewarmed_cache_still_loads(built, tmp_path):
    csrc, cache_dir = copy_of(built, tmp_path)
    (tmp_path / "tmp").mkdir()
    chmod_read_only(cache_dir)
    try:
        res, _ = run_import(jit_env(cache_dir, csrc, TMPDIR=tmp_path / "tmp"))
        assert res.returncode == 0 and res.stdout == "ok", res.stderr
        assert compiles(res.stderr) == 0
        # ...while a module missing from it is the clear error, not a failed build
        res, _ = run_import(jit_env(cache_dir, csrc, FLASH_KDA_EXTRA_CFLAGS="-DNEW_KEY",
                                    TMPDIR=tmp_path / "tmp"), IMPORT_ERROR)
        assert "IMPORTERROR" in res.stdout and "FLASH_KDA_CACHE_DIR" in res.stdout
        assert compiles(res.stderr) == 0
    finally:
        make_writable(cache_dir)


def test_unwritable_default_root_builds_into_private_temp_dir(tmp_path, stub_csrc):
    (tmp_path / "tmp").mkdir()
    env_vars = jit_env(None, stub_csrc, XDG_CACHE_HOME=blocked_path(tmp_path),
                       TMPDIR=tmp_path / "tmp")
    fallback = fallback_dir(tmp_path / "tmp")
    res, _ = run_import(env_vars)
    assert res.returncode == 0, res.stderr
    assert compiles(res.stderr) == 1 and res.stderr.count(FALLBACK_SAYS) == 1, res.stderr
    assert str(fallback) in res.stderr and "FLASH_KDA_CACHE_DIR" in res.stderr
    assert len(entries(fallback)) == 1 and fallback.stat().st_mode & 0o777 == 0o700
    # the next process finds it there, builds nothing and has nothing to announce
    res, _ = run_import(env_vars)
    assert res.returncode == 0 and compiles(res.stderr) == 0, res.stderr
    assert FALLBACK_SAYS not in res.stderr
    listing = prewarm(env_vars, "--list")
    assert listing.returncode == 0 and str(fallback) in listing.stdout
    assert "kda_cpu_" in listing.stdout
    cleared = prewarm(env_vars, "--clear")
    assert cleared.returncode == 0, cleared.stdout + cleared.stderr
    assert entries(fallback) == []


# -- Cleanup -----------------------------------------------------------------------------------

def add_stale_key(entry: Path, key: str) -> Path:
    """A copy of a published entry under another key, as an older installation left it."""
    name = entry.name.rsplit("-", 1)[0]
    stale = entry.with_name(f"{name}-{key}")
    shutil.copytree(entry, stale)
    meta = json.loads((stale / "meta.json").read_text())
    old_op = meta["op_name"]
    meta.update(key=key, op_name=f"{name}_{key[:10]}")
    (stale / "meta.json").write_text(json.dumps(meta))
    (stale / f"{old_op}.so").rename(stale / f"{meta['op_name']}.so")
    (entry.parent / "logs" / f"{stale.name}.log").write_text("an old build log\n")
    return stale


def size_of(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*"))
               if f.is_file())


def populate(built, tmp_path):
    """A copy of the built cache plus what cleanup must and must not touch."""
    csrc, cache_dir = copy_of(built, tmp_path)
    [current] = entries(cache_dir)
    name = current.name.rsplit("-", 1)[0]
    stale = add_stale_key(current, "0123456789abcdef")
    dead_build = cache_dir / f".tmp-{stale.name}-999999999-0badf00d"  # its builder is gone
    dead_build.mkdir()
    (dead_build / "half.o").write_bytes(b"\0" * 1000)
    unknown = cache_dir / "kda_cpu_x86_64_v3_d96_bf16-fedcba9876543210"  # no such spec
    unknown.mkdir()
    (unknown / "meta.json").write_text("{}")
    foreign = [cache_dir / "notes.txt", cache_dir / "other-tool", cache_dir / "logs" / "mine.txt"]
    foreign[0].write_text("not ours\n")
    foreign[1].mkdir()
    foreign[2].write_text("not ours either\n")
    return dict(csrc=csrc, cache=cache_dir, current=current, stale=stale, dead_build=dead_build,
                unknown=unknown, foreign=foreign, name=name,
                current_log=cache_dir / "logs" / f"{current.name}.log",
                stale_log=cache_dir / "logs" / f"{stale.name}.log")


def test_prune_removes_what_this_installation_would_not_load(built, tmp_path):
    c = populate(built, tmp_path)
    doomed = [c["stale"], c["stale_log"], c["dead_build"], c["unknown"]]
    freed = size_of(*doomed)
    res = prewarm(jit_env(c["cache"], c["csrc"]), "--prune")
    assert res.returncode == 0, res.stdout + res.stderr
    for path in doomed:
        assert not path.exists(), path
        assert str(path) in res.stdout
    for path in [c["current"], c["current_log"], *c["foreign"]]:
        assert path.exists(), path
    assert f"({freed} bytes)" in res.stdout, res.stdout
    assert f"{c['current']}  (current)" in res.stdout
    # what stayed is exactly what the next import wants
    res, _ = run_import(jit_env(c["cache"], c["csrc"]))
    assert res.returncode == 0 and compiles(res.stderr) == 0, res.stderr


def test_prune_removes_modules_of_changed_sources(built, tmp_path):
    csrc, cache_dir = copy_of(built, tmp_path)
    [old] = entries(cache_dir)
    with open(csrc / "cpu" / "kda_cpu.cpp", "a") as f:
        f.write("// edited: every existing module of this spec is now stale\n")
    res = prewarm(jit_env(cache_dir, csrc), "--prune")
    assert res.returncode == 0 and "stale: the current key is" in res.stdout, res.stdout
    assert entries(cache_dir) == [] and not old.exists()


HOLD_LOCK = """
import sys
from pathlib import Path
from flash_kda.jit.lock import try_lock
lock = try_lock(Path(sys.argv[1]))
print("locked" if lock else "busy", flush=True)
sys.stdin.read()  # hold it until the test closes our stdin
"""


def test_clear_removes_everything_except_keys_being_built(built, tmp_path):
    c = populate(built, tmp_path)
    env_vars = jit_env(c["cache"], c["csrc"])
    memo = c["cache"] / cache.TOOL_MEMO
    assert memo.exists()
    doomed = [c["stale"], c["stale_log"], c["dead_build"], c["unknown"], memo]
    freed = size_of(*doomed)
    lock_path = c["cache"] / "locks" / f"{c['current'].name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path)], text=True,
                              env=dict(env_vars, FLASH_KDA_BUILD_ON_IMPORT="0"), cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = prewarm(env_vars, "--clear")
    finally:
        holder.communicate("", timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr  # something was left: say so
    assert "SKIPPED" in res.stdout and f"pid {holder.pid}" in res.stdout, res.stdout
    assert c["current"].exists() and c["current_log"].exists()  # not pulled from under a build
    for path in doomed:
        assert not path.exists(), path
    assert f"({freed} bytes)" in res.stdout, res.stdout
    # the lock is free now: everything of ours goes, nothing else does
    freed = size_of(c["current"], c["current_log"])
    res = prewarm(env_vars, "--clear")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"({freed} bytes)" in res.stdout
    assert entries(c["cache"]) == [] and list((c["cache"] / "logs").glob("*.log")) == []
    assert not list(c["cache"].glob(".tmp-*"))
    assert all(path.exists() for path in c["foreign"])


def test_cleanup_keeps_what_it_cannot_judge_and_reports_unwritable_roots(built, tmp_path,
                                                                        monkeypatch):
    c = populate(built, tmp_path)

    def no_compiler(spec):
        raise jit.CompilerNotFoundError("no C++ compiler found (test)")
    report = cleanup.prune(c["cache"], current_key=no_compiler)
    kept = {Path(item.path) for item in report.kept}
    assert c["current"] in kept and c["stale"] in kept, report
    assert c["stale"].exists() and c["current"].exists()
    # a spec this version does not have is known stale without asking any compiler
    assert [Path(i.path) for i in report.removed] == [c["unknown"]], report.removed
    monkeypatch.setattr(cache, "unwritable_reason", lambda root: "Read-only file system")
    report = cleanup.clear(c["cache"])
    assert report.removed == [] and "Read-only file system" in report.skipped[0].why
    assert c["current"].exists()


def test_spec_names_parse_back():
    for spec in [KernelSpec("cpu", "x86_64_v3", 128, "bf16"),
                 KernelSpec("cuda", "sm80_sm90a", 64, "fp16", "portable"),
                 KernelSpec("musa", "mp31", 256, "bf16")]:
        assert KernelSpec.from_name(spec.name) == spec
    for bad in ["kda_cpu_x86_64_v3_d96_bf16", "kda_cpu_x86_64_v3_d0128_bf16", "kda_cpu_d128_bf16",
                "notes"]:
        with pytest.raises(ValueError):
            KernelSpec.from_name(bad)


def test_cuda_key_covers_every_header_the_cuda_module_compiles():
    """Editing any file the CUDA translation units include must change the cache key: found by
    following #include "..." from kda_cuda.cu and the host units (so a new header cannot be missed),
    plus every body under cuda/."""
    from flash_kda.jit.backends import get_toolchain
    from flash_kda.jit.backends.base import csrc_dir
    spec = KernelSpec("cuda", "sm90a", 128, "bf16")
    rel = {str(p.relative_to(csrc_dir())) for p in get_toolchain("cuda").hashed_files(spec)}
    from jit_testing import include_closure
    included = include_closure(csrc_dir(), ["cuda/kda_cuda.cu", "binding.cpp", "python_entry.cpp"]) | {
        f"cuda/{p.name}" for p in (csrc_dir() / "cuda").iterdir()}
    assert {"port.cuh", "kda_params.h", "binding.h", "cuda/ptx.cuh"} <= included  # the closure works
    assert included <= rel, f"not in the key: {sorted(included - rel)}"
    assert not any(r.startswith(("cpu/", "musa/")) for r in rel)


def test_key_follows_includes_beyond_the_declared_sources(tmp_path, monkeypatch):
    """A header that a backend's sources reach by #include but that its source_paths does not
    name is still hashed, so editing it changes the cache key (session 9 found fast_div.h missing
    from two backends' lists: only the tests' include walk caught it)."""
    from flash_kda.jit import cache
    from flash_kda.jit.backends.base import PACKAGE_CSRC
    from flash_kda.jit.backends.cpu import CpuToolchain
    csrc = tmp_path / "csrc"
    shutil.copytree(PACKAGE_CSRC, csrc)
    (csrc / "nested").mkdir()
    (csrc / "nested" / "deeper.h").write_text("#pragma once\n#define FLASH_KDA_DEEPER 1\n")
    (csrc / "extra_new.h").write_text('#pragma once\n#include "nested/deeper.h"\n')
    tu = csrc / "cpu" / "kda_cpu.cpp"
    tu.write_text('#include "../extra_new.h"\n' + tu.read_text())
    (csrc / "unrelated.h").write_text("#pragma once\n")  # reached by nothing
    monkeypatch.setenv("FLASH_KDA_CSRC_DIR", str(csrc))
    tc, spec = CpuToolchain(), KernelSpec("cpu", "x86_64_v3", 128, "bf16")
    assert not any(p.startswith(("extra", "nested")) for p in tc.source_paths(spec))
    rel = {str(p.relative_to(csrc.resolve())) for p in tc.hashed_files(spec)}
    assert {"extra_new.h", "nested/deeper.h", "cpu/kda_cpu.cpp", "kda_params.h"} <= rel
    assert "unrelated.h" not in rel and not any(r.startswith(("cuda/", "musa/")) for r in rel)
    before = cache.digest_files(tc.hashed_files(spec), csrc.resolve())
    (csrc / "nested" / "deeper.h").write_text("#pragma once\n#define FLASH_KDA_DEEPER 2\n")
    assert cache.digest_files(tc.hashed_files(spec), csrc.resolve()) != before
