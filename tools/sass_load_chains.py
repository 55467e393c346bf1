"""How many global-memory round trips a kernel's code waits for in a row, read from its SASS.

    nvcc ... -cubin -o k.cubin   (or any object file)
    cuobjdump -sass k.cubin > k.sass
    python tools/sass_load_chains.py k.sass kda_prep_kernel [--upto-barrier]

A global load (LDG) issued after the first use of another load's result cannot start before that
result has arrived, so the two latencies add up; loads issued before any such use overlap. For each
LDG of the matching kernels, in code order, this prints its depth: 1 for a load that no earlier
load's use precedes, else one more than the deepest load whose result was used before it. The
largest depth is the number of DRAM or L2 latencies a warp running straight through pays in a row
(docs/performance.md v11: the preparation's loader went from depth 4 to 1).

This is a reading of code order, not of a run: it follows the listing straight down, ignoring which
way branches go (a load and a use on paths that exclude each other still count), and takes any
later mention of a destination register as its use. Good enough to compare two builds of one
kernel; read the listing where a figure surprises.
"""

import argparse
import re

FUNC = re.compile(r"\s+Function : (\S+)")
INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LDG = re.compile(r"^(?:@!?P\w+\s+)?LDG\.E(\S*)\s+(R\d+)")
REG = re.compile(r"\bR(\d+)\b")


def functions(path):
    out, cur = {}, None
    for line in open(path):
        m = FUNC.match(line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = INSTR.match(line)
        if m and cur is not None:
            out[cur].append((m.group(1), m.group(2)))
    return out


def load_width(suffix):
    """Registers an LDG writes, from its type suffix (.64, .128; 32 bits and narrower: one)."""
    if ".128" in suffix:
        return 4
    if ".64" in suffix:
        return 2
    return 1


def chains(instrs):
    """[(address, text, depth)] for each LDG of instrs (code order)."""
    pending = []  # (first register, count, depth) of loads whose result is not yet used
    used_depth = 0  # deepest load whose result some instruction so far has used
    out = []
    for addr, text in instrs:
        m = LDG.match(text)
        # The registers the instruction reads: the operands after the destination (the first one),
        # a load's address registers included; a store's first operand is its address, read too.
        body = re.sub(r"^@!?P\w+\s+", "", text).split(None, 1)
        operands = (body[1] if len(body) > 1 else "").split(",", 1)
        writes = bool(operands[0]) and not operands[0].lstrip().startswith("[")
        read_text = (operands[1] if len(operands) > 1 else "") if writes else ",".join(operands)
        read = {int(r) for r in REG.findall(read_text)}
        still = []
        for first, n, depth in pending:
            if any(first <= r < first + n for r in read):
                used_depth = max(used_depth, depth)
            else:
                still.append((first, n, depth))
        pending = still
        if m:
            depth = used_depth + 1
            pending.append((int(m.group(2)[1:]), load_width(m.group(1)), depth))
            out.append((addr, text, depth))
        else:
            # an unpredicated write to a pending load's destination ends that load's tracking (the
            # register is reused)
            dst = REG.findall(operands[0]) if writes else []
            if dst and not text.startswith("@"):
                d = int(dst[0])
                pending = [(f, n, dp) for f, n, dp in pending if not (f <= d < f + n)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass", help="cuobjdump -sass output")
    ap.add_argument("kernel", help="a substring of the (mangled) kernel names to read")
    ap.add_argument("--upto-barrier", action="store_true", help="stop each kernel at its first BAR.SYNC")
    args = ap.parse_args()
    found = False
    for name, instrs in functions(args.sass).items():
        if args.kernel not in name:
            continue
        found = True
        if args.upto_barrier:
            cut = next((i for i, (_, t) in enumerate(instrs) if "BAR.SYNC" in t), len(instrs))
            instrs = instrs[:cut]
        rows = chains(instrs)
        print(f"{name[:110]}: {len(rows)} loads, deepest chain {max((d for *_, d in rows), default=0)}")
        for addr, text, depth in rows:
            print(f"  {addr}  depth {depth}  {text[:70]}")
    if not found:
        raise SystemExit(f"no kernel matching {args.kernel!r} in {args.sass}")


if __name__ == "__main__":
    main()
