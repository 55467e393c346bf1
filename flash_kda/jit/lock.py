"""One inter-process lock per cache key, so that N processes build a module once.

py-filelock's FileLock is an OS lock (flock on POSIX): the kernel releases it when the holder dies,
so a killed build never leaves a lock that wedges later imports (unlike torch's own "baton" file).
A sidecar ``.owner`` file records who holds it, so a waiting process can say whom it waits for.
Cache cleanup takes the same lock without waiting (``try_lock``), so it never deletes a key that a
live process is building.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import filelock

from . import env


def _owner_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def owner_of(lock_path: Path) -> str:
    """Who holds (or last held) the lock, in words."""
    return _read_owner(_owner_path(lock_path))


def _read_owner(path: Path) -> str:
    try:
        with open(path) as f:
            o = json.load(f)
        return f"pid {o.get('pid')} on {o.get('host')}, since {time.ctime(o.get('since', 0))}"
    except (OSError, ValueError):
        return "an unknown process"


def _write_owner(owner_path: Path) -> None:
    try:
        with open(owner_path, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
    except OSError:  # only a nicer message for waiters depends on it
        pass


def try_lock(lock_path: Path) -> filelock.FileLock | None:
    """The lock, acquired, if nobody holds it (the caller releases it); None at once if a live
    process holds it. Raises OSError if the lock file cannot be created (read-only cache)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    _write_owner(_owner_path(lock_path))
    return lock


@contextmanager
def build_lock(lock_path: Path, what: str):
    """Hold the lock for `what` (a spec name); tell the user when we have to wait for it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    owner_path = _owner_path(lock_path)
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        timeout = env.lock_timeout()
        print(f"flash_kda: waiting for {_read_owner(owner_path)}, which is building {what} "
              f"(lock {lock_path}; giving up after {timeout:.0f} s)", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise TimeoutError(
                f"flash_kda: gave up after {timeout:.0f} s waiting for {_read_owner(owner_path)} to "
                f"finish building {what}. If that process is stuck, kill it (the lock is released "
                f"when it exits) or raise FLASH_KDA_LOCK_TIMEOUT. Lock: {lock_path}") from None
    try:
        _write_owner(owner_path)
        yield
    finally:
        lock.release()
