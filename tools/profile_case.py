"""One flash_kda.fwd call of a bench shape, for Nsight Compute (see docs/performance.md).

    ncu --set full --import-source yes -k regex:kda_ -c 1 -o prof python tools/profile_case.py [T] [H]

Inputs as in tools/bench.py (bf16, D = 128, gate parameters and l2norm on, no state). One warm-up
call runs first so that ncu's `-c 1` after `--launch-skip 1` profiles a call on a warm module.
"""

import sys

import torch

import flash_kda

T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
H = int(sys.argv[2]) if len(sys.argv) > 2 else 96
D = 128
torch.manual_seed(0)
dev = "cuda"
q, k, v, g = (torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
beta = torch.randn(1, T, H, device=dev, dtype=torch.bfloat16)
A_log = torch.randn(H, device=dev) * 0.5
dt_bias = torch.randn(H, D, device=dev) * 0.1
out = torch.empty_like(v)
for _ in range(2):
    flash_kda.fwd(q, k, v, g, beta, D ** -0.5, out, A_log, dt_bias, -5.0)
torch.cuda.synchronize()
print("ok", bool(torch.isfinite(out).all()))
