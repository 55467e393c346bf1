"""The on-disk cache: where a specialisation lives, what its key covers, how it is published.

Layout under the cache root (``flash_kda.jit.env.cache_root()``)::

    <spec.name>-<key>/          one published module: <op>.so, build.ninja, objects, meta.json
    logs/<spec.name>-<key>.log  the latest build log of that key (kept on failure too)
    locks/<spec.name>-<key>.lock (+ .owner)   one lock per key
    .tmp-<spec.name>-<key>-<pid>-<nonce>/     a build in progress (renamed into place on success)
    tool-versions.json          memo of compiler --version outputs

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
import shutil
import socket
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import env

KEY_LEN = 16
STALE_TMP_SECONDS = 24 * 3600


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


def remove_entry(entry: CacheEntry) -> None:
    if entry.dir.exists():
        # Rename first so a concurrent reader never sees a half-deleted directory as an entry.
        doomed = entry.root / f".tmp-removed-{entry.stem}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(entry.dir, doomed)
        except OSError:
            doomed = entry.dir
        shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(root: Path, stem: str) -> list[Path]:
    """Remove temporary build directories of `stem` whose builder is gone (a killed build).
    Called with the entry's lock held: no live process of this host is building this key."""
    removed = []
    if not root.exists():
        return removed
    for path in root.glob(f".tmp-{stem}-*"):
        parts = path.name[len(f".tmp-{stem}-"):].split("-")
        try:
            pid = int(parts[0])
        except (ValueError, IndexError):
            pid = -1
        old = time.time() - path.stat().st_mtime > STALE_TMP_SECONDS
        if pid == os.getpid() or not _pid_alive(pid) or old:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in root.glob(f".tmp-removed-{stem}-*"):
        shutil.rmtree(path, ignore_errors=True)
    return removed


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
