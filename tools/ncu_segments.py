"""Where a kernel's instructions and stalls go, phase by phase, from an Nsight Compute SASS listing.

    ncu -i report.ncu-rep --page source --print-source sass > sass.txt
    python tools/ncu_segments.py sass.txt [--dump N,M] [--blocks N]

Our kernels separate their phases with barriers, so cutting the SASS after each BAR.SYNC gives one
segment per phase (in code order). For each segment: its instruction count, the warp-stall samples
taken at its instructions, the warp-level instructions executed with the commonest opcodes, and the
commonest stall reasons (share of all samples). `--dump` prints the executed instructions of the
named segments. tools/device_check.sh's `ncu` step runs it.

Where a barrier's waiters are sampled: not at the BAR.SYNC itself. Our barriers compile to
BAR.SYNC.DEFER_BLOCKING, after which a warp goes on issuing until the first instruction that must
wait (a branch, a shared-memory read, a few instructions on), and that is where its "barrier" stall
samples land, i.e. at the start of the next segment. So the table ends with the barrier waits per
barrier: the "barrier" samples of segment k + 1 are warps that finished segment k early and wait
there for the rest of the block (the preparation, session 20: 171 samples of any reason at its
seven BAR.SYNC rows, about 8,700 "barrier" samples at the rows after them).

Columns are found by the dashed line above the listing's header, whose dashes give each column's
width; a column's name is its header cells joined (ncu wraps names inside the width). The stall
reasons are the columns named `stall_*` that count all samples (not the "not issued" ones).

Where the listing has them (`--set full`), each segment also gets its shared-memory wavefronts
(L1 Wavefronts Shared: what the MIO path and shared-memory banks serve, one per cycle per SM) and
how many of them bank conflicts added (Shared Excessive); `--blocks N` prints them per block. And
its global loads and stores apart: warp-instructions executed, L1 tag requests (about the 128-byte
lines a warp instruction touches: 4 for 512 contiguous bytes, 16 where the same bytes lie in 32-byte
pieces on 16 lines) and L2 sectors with the share the access pattern wasted (Global Excessive).
"""

import argparse
import collections
import re


def opcode(instr):
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0].split(".")[0]


def columns(lines):
    """The line of the listing's 'Address' header and its columns [(start, end, name)], from the
    dashed line above that header."""
    head = next(i for i, line in enumerate(lines) if line.startswith("Address"))
    dashes = next(lines[i] for i in range(head - 1, -1, -1) if lines[i].startswith("---"))
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dashes)]
    body = next(i for i in range(head, len(lines)) if lines[i].startswith("0x"))
    cells = lines[head:body]
    return head, [(s, e, "".join(c[s:e].strip() for c in cells)) for s, e in spans]


def parse(path):
    """Rows of (instruction, samples, executed, {stall reason: samples}, {"shared" / "excess":
    wavefronts}) in code order."""
    lines = open(path).read().split("\n")
    head, cols = columns(lines)
    # (names compared without spaces: where ncu wraps a name decides whether a space survives)
    key = lambda k: cols[k][2].replace(" ", "")  # noqa: E731
    name = lambda prefix: next(k for k in range(len(cols)) if key(k).startswith(prefix))  # noqa: E731
    i_src, i_samples, i_exec = name("Source"), name("WarpStallSampling(All"), name("InstructionsExecuted")
    stalls = [(k, key(k)[len("stall_"):]) for k in range(len(cols))
              if key(k).startswith("stall_") and "Not" not in key(k)]
    # shared-memory wavefronts: column name -> our name (absent from reports without source counters)
    wanted = {"L1WavefrontsShared": "shared", "L1WavefrontsSharedExcessive": "excess"}
    mem = [(k, wanted[key(k)]) for k in range(len(cols)) if key(k) in wanted]
    # global accesses: per row, "<load|store>_<what>" (what: executed, tags, sectors, wasted)
    glob = {"L1TagRequestsGlobal": "tags", "L2TheoreticalSectorsGlobal": "sectors",
            "L2TheoreticalSectorsGlobalExcessive": "wasted"}
    gcols = [(k, glob[key(k)]) for k in range(len(cols)) if key(k) in glob]
    i_space = next((k for k in range(len(cols)) if key(k) == "AddressSpace"), None)
    i_op = next((k for k in range(len(cols)) if key(k) == "AccessOperation"), None)
    rows, odd = [], 0
    for line in lines[head:]:
        if not line.startswith("0x"):
            continue
        cell = [line[s:e].strip() for s, e, _ in cols]
        num = [int(v) if v.isdigit() else 0 for v in cell]
        odd += not (cell[i_samples].isdigit() and cell[i_exec].isdigit())
        m = {name: num[k] for k, name in mem}
        if gcols and i_space is not None and i_op is not None and cell[i_space] == "Global" \
                and cell[i_op] in ("Load", "Store"):
            op = cell[i_op].lower()
            m[f"{op}_executed"] = num[i_exec]
            m.update({f"{op}_{name}": num[k] for k, name in gcols})
        rows.append((cell[i_src], num[i_samples], num[i_exec], {r: num[k] for k, r in stalls if num[k]}, m))
    if odd:
        print(f"warning: {odd} rows do not fit the header's column widths; their counts read as 0")
    return rows


def segments(rows):
    segs, seg = [], []
    for row in rows:
        seg.append(row)
        if "BAR.SYNC" in row[0]:
            segs.append(seg)
            seg = []
    segs.append(seg)
    return segs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass")
    ap.add_argument("--dump", default="", help="comma-separated segment numbers to print")
    ap.add_argument("--blocks", type=int, default=0,
                    help="the launch's block count, to print shared wavefronts per block")
    a = ap.parse_args()
    if a.blocks < 0:
        ap.error("--blocks must be the launch's block count (a positive number)")
    segs = segments(parse(a.sass))
    samples = sum(r[1] for s in segs for r in s) or 1
    executed = sum(r[2] for s in segs for r in s) or 1
    has_shared = any("shared" in r[4] for s in segs for r in s)
    total_shared = sum(r[4].get("shared", 0) for s in segs for r in s) or 1
    total_excess = sum(r[4].get("excess", 0) for s in segs for r in s)
    if a.blocks and not has_shared:
        print("note: --blocks has no effect: this listing has no shared-memory wavefront columns (--set full)")
    print(f"{sum(map(len, segs))} instructions, {samples} stall samples, {executed} warp-instructions executed"
          + (f", {total_shared} shared-memory wavefronts ({100 * total_excess / total_shared:.1f}% of them"
             " bank-conflict excess)" if has_shared else ""))
    waits = []
    for k, s in enumerate(segs):
        ns, ni = sum(r[1] for r in s), sum(r[2] for r in s)
        reasons = collections.Counter()
        for r in s:
            reasons.update(r[3])
        if k > 0:
            waits.append((k - 1, reasons["barrier"]))
        if ns == 0 and ni == 0:
            continue
        ops = collections.Counter()
        for r in s:
            ops[opcode(r[0])] += r[2]
        top = ", ".join(f"{o} {100 * c // max(ni, 1)}%" for o, c in ops.most_common(6))
        why = ", ".join(f"{w} {100 * c / samples:.1f}" for w, c in reasons.most_common(4))
        stalls = f"\n    stalls, % of all samples: {why}" if why else ""
        print(f"segment {k:2d}: {len(s):4d} instr, samples {100 * ns / samples:5.1f}%, "
              f"executed {100 * ni / executed:5.1f}%  ({top})" + stalls)
        shared, excess = (sum(r[4].get(m, 0) for r in s) for m in ("shared", "excess"))
        if shared:
            per = f", {shared / a.blocks:,.0f} a block" if a.blocks else ""
            print(f"    shared-memory wavefronts: {100 * shared / total_shared:.1f}% of the kernel's{per}"
                  f" ({100 * excess / shared:.0f}% of them bank-conflict excess)")
        for op in ("load", "store"):
            n, tags, sectors, wasted = (sum(r[4].get(f"{op}_{w}", 0) for r in s)
                                        for w in ("executed", "tags", "sectors", "wasted"))
            if n:
                per = f", {tags / a.blocks:,.0f} tag requests a block" if a.blocks else ""
                print(f"    global {op}s: {n} warp-instructions, {tags / n:.1f} L1 tag requests each{per},"
                      f" {sectors} L2 sectors ({100 * wasted / max(sectors, 1):.0f}% of them wasted)")
    if any(c for _, c in waits):
        print("barrier waits (samples of warps waiting at the barrier that ends segment k, % of all):")
        print("    " + ", ".join(f"after {k}: {100 * c / samples:.1f}" for k, c in waits))
    for k in (int(x) for x in a.dump.split(",") if x):
        for instr, ns, ni, *_ in segs[k]:
            if ni:
                print(f"{k:2d} {ni:10d} {ns:6d}  {instr}")


if __name__ == "__main__":
    main()
