"""Where a kernel's instructions and stalls go, phase by phase, from an Nsight Compute SASS listing.

    ncu -i report.ncu-rep --page source --print-source sass > sass.txt
    python tools/ncu_segments.py sass.txt [--dump N,M]

Our kernels separate their phases with barriers, so cutting the SASS at each BAR.SYNC gives one
segment per phase (in code order). For each segment: its instruction count, the warp-stall samples
(where warps waited: a barrier's waiters are counted at the barrier that ends the segment) and the
warp-level instructions executed, with the commonest opcodes. `--dump` prints the executed
instructions of the named segments. tools/device_check.sh's `ncu` step runs it.
"""

import argparse
import collections
import re

# A SASS row: address, instruction, then the numeric columns; the first two are the warp-stall
# samples (all, not-issued), the fourth the warp-level instructions executed.
ROW = re.compile(r"^0x[0-9a-f]+\s+(.*?)\s{2,}(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s")


def opcode(instr):
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0].split(".")[0]


def segments(path):
    rows, seg = [], []
    for line in open(path):
        m = ROW.match(line)
        if m:
            seg.append((m.group(1).strip(), int(m.group(2)), int(m.group(5))))
            if "BAR.SYNC" in m.group(1):
                rows.append(seg)
                seg = []
    rows.append(seg)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass")
    ap.add_argument("--dump", default="", help="comma-separated segment numbers to print")
    a = ap.parse_args()
    segs = segments(a.sass)
    samples = sum(r[1] for s in segs for r in s) or 1
    executed = sum(r[2] for s in segs for r in s) or 1
    print(f"{sum(map(len, segs))} instructions, {samples} stall samples, {executed} warp-instructions executed")
    for k, s in enumerate(segs):
        ns, ni = sum(r[1] for r in s), sum(r[2] for r in s)
        if ns == 0 and ni == 0:
            continue
        ops = collections.Counter()
        for r in s:
            ops[opcode(r[0])] += r[2]
        top = ", ".join(f"{o} {100 * c // max(ni, 1)}%" for o, c in ops.most_common(6))
        print(f"segment {k:2d}: {len(s):4d} instr, samples {100 * ns / samples:5.1f}%, "
              f"executed {100 * ni / executed:5.1f}%  ({top})")
    for k in (int(x) for x in a.dump.split(",") if x):
        for instr, ns, ni in segs[k]:
            if ni:
                print(f"{k:2d} {ni:10d} {ns:6d}  {instr}")


if __name__ == "__main__":
    main()
