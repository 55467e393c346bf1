#!/usr/bin/env python
"""The CUDA bodies' outputs on fixed problems, run on the CPU by the SIMT emulator, saved or compared.

    FLASH_KDA_CACHE_DIR=/tmp/emu_a python tools/emu_outputs.py save a.pt     # in one tree
    FLASH_KDA_CACHE_DIR=/tmp/emu_b python tools/emu_outputs.py save b.pt     # in the other
    python tools/emu_outputs.py compare a.pt b.pt

For changes meant to leave every result bit for bit as it was (an instruction diet that only
reorders exact operations, such as folding power-of-two scales): run `save` in a checkout of each
tree (each with its own cache directory, since the emulator's build is named per head dim and
dtype, not per tree), then `compare`, which prints each problem's difference and exits 1 if any
output or final state differs. The problems: the split form's layouts (wgmma and mma16 products,
D = 64/128/256, varlen) and extreme magnitudes at VS 64 and 128 (fixed seeds; the magnitude edits
are tests/kda_testing.py's far_from_one, zero_channels and huge_state_channel, and a 1e-30 initial
state). Correctness against the float64 reference stays the tests' job; this checks identity.
About 4 minutes on a 2-core machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


class _Env:
    """The one monkeypatch method tests/test_simt.py's run() uses."""

    def setenv(self, key, value):
        os.environ[key] = value


def _problems():
    from kda_testing import far_from_one, huge_state_channel, make_problem, zero_channels

    bf16 = torch.bfloat16
    split = lambda vs, prep=512, mma="auto": {"FORM": "split", "VS": vs, "PREP_THREADS": prep, "MMA": mma}  # noqa: E731
    yield "D128 VS64", make_problem(B=2, T=100, hqk=2, hv=2, D=128, dtype=bf16, state=True, seed=1,
                                    weak_decay=True), 128, split(64), True
    yield "D128 VS128", make_problem(B=1, T=130, hqk=1, hv=2, D=128, dtype=bf16, state=True, seed=2,
                                     weak_decay=True), 128, split(128), True
    yield "D64 VS32 fp16", make_problem(B=1, T=97, hqk=1, hv=2, D=64, dtype=torch.float16, state=True,
                                        seed=3), 64, split(32, 256), True
    yield "varlen mma16", make_problem(seqlens=[70, 0, 1, 100, 33], hqk=1, hv=2, D=128, dtype=bf16, state=True,
                                       seed=4, weak_decay=True), 128, split(64, mma="mma16"), True
    yield "D256 VS64", make_problem(B=1, T=80, hqk=1, hv=1, D=256, dtype=bf16, state=True, seed=5,
                                    weak_decay=True), 256, split(64), True
    base = lambda seed, weak=False: make_problem(B=1, T=96, hqk=2, hv=2, D=128, dtype=bf16, state=True,  # noqa: E731
                                                 seed=seed, weak_decay=weak)
    extreme = {}
    cases = ["values x1e6", "values x1e-6", "values x1e-20", "queries x1e-5, no l2norm", "near-parallel keys, beta~1"]
    for sd, case in enumerate(cases, start=11):
        extreme[case] = far_from_one(base(sd), case)
    extreme["zero channels"] = (zero_channels(base(16, True)), True)
    extreme["huge state channel"] = (huge_state_channel(base(17, True)), True)
    p = base(18, True)
    p["initial_state"] = p["initial_state"] * 1e-30
    extreme["initial state x1e-30"] = (p, True)
    for name, (p, l2) in extreme.items():
        for vs in (64, 128):
            yield f"{name} VS{vs}", p, 128, split(vs), l2


def save(path: str) -> None:
    import test_simt

    results = {}
    for name, p, D, layout, l2 in _problems():
        for key in [k for k in os.environ if k.startswith("FLASH_KDA_SIM_")]:
            del os.environ[key]
        out, final = test_simt.run(p, D=D, dtype=p["v"].dtype, layout=layout, use_qk_l2norm=l2,
                                   monkeypatch=_Env())
        results[name] = (out.clone(), final.clone())
        print(f"{name}: done", flush=True)
    torch.save(results, path)
    print(f"saved {len(results)} problems to {path}")


def compare(path_a: str, path_b: str) -> int:
    a, b = torch.load(path_a), torch.load(path_b)
    differ = 0
    for name in a:
        if name not in b:
            print(f"{name}: missing from {path_b}")
            differ += 1
            continue
        parts = []
        for what, x, y in (("out", a[name][0], b[name][0]), ("final state", a[name][1], b[name][1])):
            if torch.equal(x, y):
                parts.append(f"{what} identical")
            else:
                x, y = x.double(), y.double()
                parts.append(f"{what} differs (rel-L2 {((x - y).norm() / y.norm()).item():.2e})")
                differ += 1
        print(f"{name}: " + ", ".join(parts))
    print(f"{differ} differences")
    return 1 if differ else 0


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(sys.argv[2])
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
