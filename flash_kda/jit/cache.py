"""The on-disk cache: where a specialisation lives, what its key covers, how it is published.

Layout under the cache root (``flash_kda.jit.env.cache_root()``)::

    <spec.name>-<key>/          one published module: <op>.so, build.ninja, objects, meta.json
    logs/<spec.name>-<key>.log  the latest build log of that key (kept on failure too)
    locks/<spec.name>-<key>.lock (+ .owner)   one lock per key
    .tmp-<spec.name>-<key>-<pid>-<nonce>/     a build in progress (renamed into place on success)
    tool-versions.json          memo of compiler --version outputs (TOOL_MEMO)

Which root: ``FLASH_KDA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/flash_kda`` or
``~/.cache/flash_kda`` (``env``). Loading only reads, so a read-only prewarmed cache keeps working;
only a build checks that it can write (``build_root``): an unwritable ``FLASH_KDA_CACHE_DIR`` is an
error, an unwritable default root falls back to a private per-user directory under the system
temp dir, which later lookups also search (``lookup_roots``).

The key is a content hash of: the sources that make up the module, the build plan (flags, defines,
include paths), the compiler's identity, torch's version (and CUDA/MUSA versions), the Python ABI
and flash_kda's version. Nothing else, and never file modification times.

``meta.json`` is written last, inside the temporary directory, which is then renamed into place:
a directory without a valid ``meta.json`` is never trusted, so a crash can never leave a
half-written module behind that a later import would load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import env

KEY_LEN = 16
STALE_TMP_SECONDS = 24 * 3600
TOOL_MEMO = "tool-versions.json"

# The names of the cache's own files. Cleanup removes nothing else: FLASH_KDA_CACHE_DIR may point
# at a directory that holds other things too.
_STEM = rf"(?P<name>kda_[a-z0-9_]+)-(?P<key>[0-9a-f]{{{KEY_LEN}}})"
ENTRY_DIR_RE = re.compile(rf"^{_STEM}$")
TMP_DIR_RE = re.compile(rf"^\.tmp-(?:removed-)?{_STEM}-[0-9a-z-]+$")
LOG_RE = re.compile(rf"^{_STEM}\.log$")


class CacheDirError(RuntimeError):
    """No cache directory a build can write into; the message names the path and the variable."""


# -- Which root --------------------------------------------------------------------------------

_fallback_announced = False


def lookup_roots() -> list[Path]:
    """Roots a published module is loaded from, in order: FLASH_KDA_CACHE_DIR alone when it is
    set; else the default root, then the fallback if an earlier build made it (and it is ours)."""
    override = env.cache_dir_override()
    if override is not None:
        return [override]
    roots = [root for root in (env.default_cache_root(),) if root is not None]
    fallback = env.fallback_cache_root()
    if fallback not in roots and _not_private(fallback) is None:
        roots.append(fallback)
    return roots


def build_root(what: str = "a kernel") -> Path:
    """The root a build of `what` writes into (created if missing). Called on a cache miss only,
    so that loading from a read-only cache never depends on being able to write.

    FLASH_KDA_CACHE_DIR unwritable: CacheDirError (the user chose that directory; no fallback).
    Default root unwritable: the per-user fallback, announced once per process on stderr."""
    override = env.cache_dir_override()
    if override is not None:
        problem = unwritable_reason(override)
        if problem is not None:
            raise CacheDirError(
                f"FLASH_KDA_CACHE_DIR={override} is not writable ({problem}), so {what}, which "
                "is not in it, cannot be compiled there. Point FLASH_KDA_CACHE_DIR at a writable "
                "directory (or unset it to use the default cache); a read-only cache can only "
                "serve modules prewarmed into it with tools/prewarm.py.")
        return override
    default = env.default_cache_root()
    problem = "there is no home directory" if default is None else unwritable_reason(default)
    if problem is None:
        return default
    fallback = env.fallback_cache_root()
    fallback_problem = _claim_private_dir(fallback)
    if fallback_problem is not None:
        raise CacheDirError(
            f"no writable kernel cache: the default {_describe_default(default)} is not writable "
            f"({problem}), nor is the fallback {fallback} ({fallback_problem}). Set "
            "FLASH_KDA_CACHE_DIR to a writable directory.")
    _announce_fallback(default, problem, fallback)
    return fallback


def _describe_default(default: Path | None) -> str:
    return str(default) if default is not None else "($XDG_CACHE_HOME or ~/.cache)/flash_kda"


def _announce_fallback(default: Path | None, problem: str, fallback: Path) -> None:
    global _fallback_announced
    if _fallback_announced:
        return
    _fallback_announced = True
    print(f"flash_kda: the kernel cache {_describe_default(default)} is not writable ({problem}); "
          f"using {fallback} instead, which the system may clean up. Set FLASH_KDA_CACHE_DIR to "
          "choose the cache directory.", file=sys.stderr, flush=True)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def unwritable_reason(root: Path) -> str | None:
    """Why a build could not create files under root (created if missing), or None if it can.

    Tries it instead of reading mode bits: read-only mounts, ACLs, root squashing and running as
    root all make os.access and the mode bits a poor guide."""
    if root.exists() and not root.is_dir():
        return "it exists and is not a directory"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create it: {_why(e)}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=root)
    except OSError as e:
        return f"cannot create files in it: {_why(e)}"
    os.close(fd)
    os.unlink(probe)
    return None


def _claim_private_dir(path: Path) -> str | None:
    """Create the fallback directory (mode 0700) or check the existing one; None if a build may
    use it. It lives in a world-writable temp dir, where another user could create it first and
    plant a library that we would load: it must be ours and writable by nobody else."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        return f"cannot create it: {_why(e)}"
    return _not_private(path) or unwritable_reason(path)


def _not_private(path: Path) -> str | None:
    """Why path is not a directory owned by this user that only it can write, or None."""
    try:
        st = os.lstat(path)  # lstat: a symlink (possibly planted by someone else) is refused
    except OSError as e:
        return _why(e)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"other users can write into it (mode {stat.S_IMODE(st.st_mode):04o}; expected 0700)"
    return None


# -- The key -----------------------------------------------------------------------------------


def python_abi() -> str:
    return f"{sys.implementation.cache_tag}-{sysconfig.get_config_var('SOABI') or ''}"


def torch_identity() -> dict:
    import torch
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "musa": getattr(torch.version, "musa", None),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
    }


def digest_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def key_material(spec, plan, files: list[Path], csrc_root: Path) -> dict:
    from .. import __version__
    flags = plan.as_dict()
    # Absolute source paths differ between installs of the same version; the contents matter,
    # and they are hashed below.
    flags["sources"] = [os.path.relpath(s, csrc_root) for s in flags["sources"]]
    return {
        "flash_kda": __version__,
        "spec": spec.as_dict(),
        "sources": digest_files(files, csrc_root),
        "plan": flags,
        "python": python_abi(),
        **torch_identity(),
    }


def key_of(material: dict) -> str:
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LEN]


@dataclass(frozen=True)
class CacheEntry:
    root: Path
    spec_name: str
    key: str

    @property
    def stem(self) -> str:
        return f"{self.spec_name}-{self.key}"

    @property
    def op_name(self) -> str:
        """Name of the torch op (and shared library) this entry registers; unique per key, so that
        two versions of one spec can be loaded into one process without clashing."""
        return f"{self.spec_name}_{self.key[:10]}"

    @property
    def dir(self) -> Path:
        return self.root / self.stem

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    @property
    def library(self) -> Path:
        return self.dir / f"{self.op_name}.so"

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / f"{self.stem}.log"

    @property
    def lock_path(self) -> Path:
        return self.root / "locks" / f"{self.stem}.lock"

    def new_tmp_dir(self) -> Path:
        path = self.root / f".tmp-{self.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path


def entry_for(spec_name: str, key: str, root: Path | None = None) -> CacheEntry:
    return CacheEntry(root or env.cache_root(), spec_name, key)


def read_valid_meta(entry: CacheEntry) -> dict | None:
    """meta.json of a published entry, or None if it is missing, for another key, or its library
    is missing or empty."""
    try:
        with open(entry.meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != entry.key:
        return None
    try:
        if entry.library.stat().st_size == 0:
            return None
    except OSError:
        return None
    return meta


def publish(tmp_dir: Path, entry: CacheEntry, meta: dict) -> None:
    """Write meta.json into the finished build directory, then move it into place atomically.
    Called with the entry's lock held, so nobody else is publishing the same key."""
    meta = dict(meta, key=entry.key, op_name=entry.op_name, created=time.time(),
                host=socket.gethostname())
    tmp_meta = tmp_dir / "meta.json.tmp"
    with open(tmp_meta, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_meta, tmp_dir / "meta.json")
    remove_entry(entry)  # an unpublished or broken leftover of the same key
    os.replace(tmp_dir, entry.dir)


def move_aside(entry: CacheEntry) -> Path | None:
    """Rename the entry's directory to a temporary name (returned; None if there is none), so that
    a concurrent reader never sees a half-deleted directory as an entry. Raises OSError."""
    if not entry.dir.exists():
        return None
    doomed = entry.root / f".tmp-removed-{entry.stem}-{uuid.uuid4().hex[:8]}"
    os.replace(entry.dir, doomed)
    return doomed


def remove_entry(entry: CacheEntry) -> None:
    try:
        doomed = move_aside(entry)
    except OSError:
        doomed = entry.dir
    if doomed is not None:
        shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # unparsable name; os.kill(0 or -1, 0) would probe a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_builder_pid(path: Path, stem: str) -> int:
    try:
        return int(path.name[len(f".tmp-{stem}-"):].split("-")[0])
    except (ValueError, IndexError):
        return -1


def stale_tmp_dirs(root: Path, stem: str) -> list[Path]:
    """Temporary directories of `stem` that no build will finish: builds whose builder is gone (a
    killed build) or older than a day, and entries moved aside for deletion. Meaningful with the
    entry's lock held: then no live process of this host is building this key."""
    if not root.exists():
        return []
    stale = []
    for path in root.glob(f".tmp-{stem}-*"):
        pid = _tmp_builder_pid(path, stem)
        old = time.time() - path.stat().st_mtime > STALE_TMP_SECONDS
        if pid == os.getpid() or not _pid_alive(pid) or old:
            stale.append(path)
    return stale + list(root.glob(f".tmp-removed-{stem}-*"))


def remove_stale_tmp(root: Path, stem: str) -> list[Path]:
    """Remove stale_tmp_dirs(root, stem). Called with the entry's lock held."""
    removed = stale_tmp_dirs(root, stem)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:  # missing, or not a directory
        return []


def entries_on_disk(root: Path) -> list[CacheEntry]:
    """Every key with anything of its own under root: a module directory, a temporary build
    directory or a build log (for cleanup; lock files do not count)."""
    found = set()
    for name in _names(root):
        m = ENTRY_DIR_RE.match(name) or TMP_DIR_RE.match(name)
        if m and (root / name).is_dir():
            found.add((m["name"], m["key"]))
    for name in _names(root / "logs"):
        m = LOG_RE.match(name)
        if m:
            found.add((m["name"], m["key"]))
    return [CacheEntry(root, name, key) for name, key in sorted(found)]


def list_entries(root: Path | None = None) -> list[dict]:
    """Published entries under the cache root (for `tools/prewarm.py --list`)."""
    root = root or env.cache_root()
    out = []
    if not root.exists():
        return out
    for meta_path in sorted(root.glob("*/meta.json")):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        lib = meta_path.parent / f"{meta.get('op_name')}.so"
        meta["path"] = str(meta_path.parent)
        meta["size_mb"] = lib.stat().st_size / 1e6 if lib.exists() else 0.0
        out.append(meta)
    return out
