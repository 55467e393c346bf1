"""The files a module's sources reach by ``#include "..."``: what its cache key must cover.

Each backend names the files and directories it compiles from (``Toolchain.source_paths``); a
header that a source includes but that list forgets would otherwise leave the key unchanged when
it is edited, and a stale module would load (session 9 found ``fast_div.h`` missing from two
backends' lists). Following the includes closes that gap for every backend at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

# A quoted include at the start of a line (system headers use <...>; toolkit headers that are
# quoted, such as torch_musa's, resolve outside csrc/ and are not followed).
_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)


def local_includes(root: Path, start: Iterable[Path]) -> set[Path]:
    """`start` plus every file under `root` that it reaches through ``#include "..."``, resolved
    as a compiler does for quoted includes: beside the including file first, then from `root`
    (the ``-I`` directory the backends pass). Paths are normalised (``..`` folded) but symbolic
    links are kept, so that every result stays relative to `root` as the caller names it."""
    root = _norm(root)
    seen: set[Path] = set()
    todo = [_norm(p) for p in start]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for name in _QUOTED_INCLUDE.findall(path.read_text(encoding="utf-8", errors="replace")):
            for candidate in (_norm(path.parent / name), _norm(root / name)):
                if candidate.is_file():
                    if root in candidate.parents:
                        todo.append(candidate)
                    break
    return seen


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))
