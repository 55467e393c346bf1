"""Cache cleanup: remove everything (``clear``), or what this installation will never load again
(``prune``). Used by ``tools/prewarm.py --clear`` / ``--prune``.

Both go key by key (``<spec name>-<key>``: its module directory, temporary build directories and
build log) and take that key's build lock without waiting. A key whose lock is held belongs to a
live process (the OS releases a dead one's lock) that is building it right now, so it is skipped
and reported rather than deleted from under that build.

Only names of the cache's own layout are removed (``cache.ENTRY_DIR_RE`` and friends), because
FLASH_KDA_CACHE_DIR may point at a directory that holds other things too. Lock files are kept:
they are empty, and deleting one that another process has open would let a third process lock a
new file of the same name, so two builds of one key could run at once.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import cache
from .lock import owner_of, try_lock
from .spec import KernelSpec


@dataclass
class Item:
    """One path (or, for a busy key, its name), why it went or stayed, and its size."""
    path: Path | str
    why: str
    bytes: int = 0


@dataclass
class Report:
    """What one cleanup did under one cache root."""
    root: Path
    removed: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)      # prune: current modules, or undecidable
    skipped: list[Item] = field(default_factory=list)   # wanted gone but not removed (busy, error)

    @property
    def freed(self) -> int:
        # A removal that failed half-way still freed what it deleted before the error.
        return sum(item.bytes for item in self.removed + self.skipped)


def clear(root: Path) -> Report:
    """Remove every module, temporary build directory and build log under root, and the compiler
    version memo; keys being built by a live process are skipped."""
    report = Report(root)
    if not _writable(root, report):
        return report
    for entry in cache.entries_on_disk(root):
        _under_lock(entry, report, functools.partial(_remove_key, entry, "module", report))
    _remove(root / cache.TOOL_MEMO, "compiler version memo", report)
    return report


def prune(root: Path, current_key: Callable[[KernelSpec], str] | None = None) -> Report:
    """Remove the modules (with their logs and unfinished builds) whose key is not the one this
    installation computes for the same spec name now: older sources, compiler, torch, flags or
    flash_kda version; or a name this version has no spec for. The current modules stay.

    current_key(spec) defaults to the key `build_and_load(spec)` would look for (same sources,
    toolchain and FLASH_KDA_* environment as this process)."""
    # Several keys of one spec are common (one per past version): compute its current key once.
    current_key = functools.lru_cache(maxsize=None)(current_key or _key_now)
    report = Report(root)
    if not _writable(root, report):
        return report
    for entry in cache.entries_on_disk(root):
        verdict = _prune_verdict(entry, current_key)
        if isinstance(verdict, Item):  # its current key is unknown here: leave it alone
            report.kept.append(verdict)
        elif verdict is None:
            _under_lock(entry, report, functools.partial(_tidy_current, entry, report))
        else:
            _under_lock(entry, report, functools.partial(_remove_key, entry, verdict, report))
    return report


def _key_now(spec: KernelSpec) -> str:
    from .build import resolve  # build imports much more; only prune needs it
    return resolve(spec)[1].key


def _prune_verdict(entry: cache.CacheEntry, current_key) -> str | Item | None:
    """None: entry is current; a str: why it is stale; an Item: kept, its current key unknown."""
    try:
        spec = KernelSpec.from_name(entry.spec_name)
    except ValueError:
        return "stale: no such specialisation in this version"
    try:
        key = current_key(spec)
    except Exception as e:  # e.g. no nvcc on this machine: cannot tell, so never delete
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        return Item(entry.dir, f"current key unknown here ({first_line})")
    return None if key == entry.key else f"stale: the current key is {key}"


def _writable(root: Path, report: Report) -> bool:
    if not root.is_dir():
        return False  # nothing to clean; and do not create it
    problem = cache.unwritable_reason(root)
    if problem is not None:
        report.skipped.append(Item(root, f"cannot remove anything: {problem}"))
    return problem is None


def _under_lock(entry: cache.CacheEntry, report: Report, action: Callable[[], None]) -> None:
    """Run action() holding entry's build lock; if a live process holds it, report and skip."""
    try:
        lock = try_lock(entry.lock_path)
    except OSError as e:
        report.skipped.append(Item(entry.stem, f"cannot take its build lock: {e}"))
        return
    if lock is None:
        report.skipped.append(Item(entry.stem, f"being built: its lock is held by "
                                               f"{owner_of(entry.lock_path)}"))
        return
    try:
        action()
    finally:
        lock.release()


def _remove_key(entry: cache.CacheEntry, why: str, report: Report) -> None:
    _remove_module(entry, why, report)
    _remove_unfinished_builds(entry, report)
    _remove(entry.log_path, "build log", report)


def _tidy_current(entry: cache.CacheEntry, report: Report) -> None:
    """A current key: keep its module and log, remove what can never be loaded."""
    if cache.read_valid_meta(entry) is not None:
        report.kept.append(Item(entry.dir, "current", _size(entry.dir)))
    elif entry.dir.exists():
        _remove_module(entry, "broken: no valid meta.json or library", report)
    _remove_unfinished_builds(entry, report)


def _remove_module(entry: cache.CacheEntry, why: str, report: Report) -> None:
    try:
        doomed = cache.move_aside(entry)  # a concurrent reader then sees no entry, not half of one
    except OSError as e:
        report.skipped.append(Item(entry.dir, f"could not remove it: {e}"))
        return
    if doomed is not None:
        _remove(doomed, why, report, shown_as=entry.dir)


def _remove_unfinished_builds(entry: cache.CacheEntry, report: Report) -> None:
    stale = cache.stale_tmp_dirs(entry.root, entry.stem)
    for path in stale:
        _remove(path, "unfinished build", report)
    # Under the lock no build of this host runs; a live pid here is another host's build on a
    # shared file system (or a reused pid), which the builders' own rule leaves for a day.
    for path in set(entry.root.glob(f".tmp-{entry.stem}-*")) - set(stale):
        report.skipped.append(Item(path, "temporary build directory of a live process id"))


def _remove(path: Path, why: str, report: Report, shown_as: Path | None = None) -> None:
    """Delete a file or directory tree, recording the bytes freed, or why it could not."""
    if not os.path.lexists(path):
        return
    before = _size(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as e:
        report.skipped.append(Item(shown_as or path, f"could not remove it: {e}",
                                   before - _size(path)))
        return
    report.removed.append(Item(shown_as or path, why, before))


def _size(path: Path) -> int:
    """Bytes in the files under path (symlinks not followed)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
