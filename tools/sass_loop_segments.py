#!/usr/bin/env python
"""A kernel's main loop cut at its waits, with each segment's instruction count and opcodes.

    cuobjdump -sass build.o > k.sass
    python tools/sass_loop_segments.py k.sass --kernel 'kda_recurrence_kernel.*ILi128ELi64ELi32ELi2E.*Lb0E'

The loop is the longest backward branch of the function (for the recurrence: its chunk loop). Its
body is cut before every barrier or wait (`BAR.SYNC`, `WARPGROUP.DEPBAR`, `DEPBAR`, `LDGDEPBAR`) and
before the first `HGMMA` of each run of them, so a segment is what a warp issues between two points
where it may wait. Why: in the one-block-per-SM recurrence the time went with the instructions
between the first products' results and the update's issue, not with the loop's total
(docs/performance.md v27); this prints that split for two builds to compare before a device run.
Static counts: every instruction once, predicated or not, branches inside the loop ignored.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

from sass_path_count import BRANCH, kernel_listing

# (SYNCS.PHASECHK: an mbarrier wait, the bulk copies' in the in-step recurrence)
WAIT = re.compile(r"BAR\.SYNC|WARPGROUP\.DEPBAR|(?<![A-Z])DEPBAR|LDGDEPBAR|SYNCS\.PHASECHK")


def opcode(text: str) -> str:
    """The instruction's opcode without its guard predicate."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main_loop(listing: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions of the longest backward branch's range (empty if the function has no loop).
    A range that holds an unconditional EXIT is no loop: ptxas places an mbarrier wait's retry
    loop after the function's end, and its branch back into the chunk loop spans the EXIT."""
    exits = [addr for addr, text in listing if text.split()[0] == "EXIT"]
    loops = []
    for addr, text in listing:
        m = BRANCH.match(text)
        target = int(m.group(2), 16) if m else addr
        if target < addr and not any(target <= e <= addr for e in exits):
            loops.append((target, addr))
    if not loops:
        return []
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    return [(a, t) for a, t in listing if lo <= a <= hi]


def segments(body: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """body cut before each wait and before the first HGMMA of each run of HGMMAs."""
    out: list[list[tuple[int, str]]] = [[]]
    prev = ""
    for addr, text in body:
        op = opcode(text)
        starts_products = op.startswith("HGMMA") and not prev.startswith("HGMMA")
        if (WAIT.search(text) or starts_products) and out[-1]:
            out.append([])
        out[-1].append((addr, text))
        if not op.startswith(("WARPGROUP.ARRIVE", "UIADD3", "UMOV", "R2UR")):  # (set-up between HGMMAs)
            prev = op
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass", help="cuobjdump -sass output")
    ap.add_argument("--kernel", required=True, help="regex for the function's name")
    ap.add_argument("--top", type=int, default=6, help="opcodes listed per segment")
    args = ap.parse_args(argv)
    listing = kernel_listing(open(args.sass).read(), args.kernel)
    if not listing:
        ap.error(f"no function matching {args.kernel!r} in {args.sass}")
    body = main_loop(listing)
    if not body:
        ap.error("the function has no backward branch")
    print(f"loop {body[0][0]:#x}-{body[-1][0]:#x}: {len(body)} instructions")
    for seg in segments(body):
        ops = Counter(opcode(t) for _, t in seg)
        mix = ", ".join(f"{o} {n}" for o, n in ops.most_common(args.top))
        print(f"  {seg[0][0]:#06x} {len(seg):5d}  starts {opcode(seg[0][1]):22s} {mix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
