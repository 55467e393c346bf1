#!/usr/bin/env python
"""Instructions one warp issues along a chosen path through a kernel's SASS, without a GPU.

    cuobjdump -sass build.o > k.sass
    python tools/sass_path_count.py k.sass --kernel 'kda_prep_kernel.*ILi128ELi32ELi512' \\
        --taken 120,bc0 --stop HMMA

Walks the kernel's listing from its first instruction. An unconditional BRA is followed; a
predicated one falls through unless its address (hex, as the listing prints it) is in --taken.
Every instruction passed counts once, predicated-off ones included (they issue). It stops at the
first instruction matching --stop (counted), at EXIT, or after --limit steps (a loop whose branch
back is not in --taken runs once). Printed: the count and each branch met, so that the decisions
can be checked against the source. Used for docs/next-prep.md's comparison of two preparations
before either ran on a GPU; on main it came within ~3 % of Nsight Compute's executed count.
Divergent sections (some lanes take a branch, others do not) issue both sides: give the branch as
not taken and add the skipped side by hand.
"""

from __future__ import annotations

import argparse
import re
import sys

INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# a branch, its guard (if any) and its target; `BRA P2, 0x...` carries a second predicate
BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)")


def kernel_listing(text: str, kernel: str) -> list[tuple[int, str]]:
    """(address, instruction) of the first function whose name matches `kernel` (a regex)."""
    out, inside = [], False
    for line in text.splitlines():
        if "Function :" in line:
            if inside:
                break
            inside = re.search(kernel, line) is not None
            continue
        m = INSTR.match(line) if inside else None
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def walk(listing: list[tuple[int, str]], taken: set[int], stop: str, limit: int = 100_000):
    """Returns (instructions issued, the branches met as text)."""
    index = {addr: i for i, (addr, _) in enumerate(listing)}
    i, count, met = 0, 0, []
    while 0 <= i < len(listing) and count < limit:
        addr, text = listing[i]
        count += 1
        if re.search(stop, text) or text.startswith("EXIT"):
            break
        m = BRANCH.match(text)
        if m:
            target = int(m.group(2), 16)
            if m.group(1) is None or addr in taken:
                met.append(f"{addr:x}->{target:x}" + ("" if m.group(1) is None else " (taken)"))
                i = index[target]
                continue
            met.append(f"{addr:x} not taken")
        i += 1
    return count, met


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass", help="cuobjdump -sass output")
    ap.add_argument("--kernel", required=True, help="regex for the function's name")
    ap.add_argument("--taken", default="", help="comma-separated hex addresses of predicated BRAs to take")
    ap.add_argument("--stop", default="HMMA", help="regex of the instruction to stop at (default HMMA)")
    ap.add_argument("--limit", type=int, default=100_000)
    args = ap.parse_args(argv)
    listing = kernel_listing(open(args.sass).read(), args.kernel)
    if not listing:
        ap.error(f"no function matching {args.kernel!r} in {args.sass}")
    taken = {int(a, 16) for a in args.taken.split(",") if a.strip()}
    count, met = walk(listing, taken, args.stop, args.limit)
    print(f"{count} instructions issued to the stop ({len(listing)} in the kernel)")
    for m in met:
        print("   ", m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
