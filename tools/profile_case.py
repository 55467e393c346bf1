"""One flash_kda.fwd call of a bench shape, for Nsight Compute (see docs/performance.md).

    ncu --set full --import-source yes -k regex:kda_ -c 1 -o prof python tools/profile_case.py [T] [H]

T is a token count (one sequence) or a comma-separated list of lengths (a varlen call, as in
tools/kernel_times.py: `1024,1024,1024,1024,1024,1024,1024,1024 96`). Inputs as in tools/bench.py
(bf16, D = 128, gate parameters and l2norm on, no state). One warm-up call runs first so that ncu's
`-c 1` after `--launch-skip 1` profiles a call on a warm module.
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):  # before flash_kda builds on import
    print(__doc__)
    sys.exit(0)

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_inputs, run_ours  # noqa: E402  (the benchmark's inputs and call)

shape = sys.argv[1] if len(sys.argv) > 1 else "8192"
seqlens = [int(n) for n in shape.split(",") if n] if "," in shape else None
T = sum(seqlens) if seqlens else int(shape)
H = int(sys.argv[2]) if len(sys.argv) > 2 else 96
x = make_inputs(seqlens, T, H, states=False, gen=torch.Generator("cuda").manual_seed(0))
for _ in range(2):
    run_ours(x)
torch.cuda.synchronize()
print("ok", bool(torch.isfinite(x["out"]).all()))
