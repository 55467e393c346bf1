"""Small dense and varlen calls for compute-sanitizer (memcheck / racecheck): see device_check.sh.

    python tools/sanitize_case.py [dense|varlen]    (default: both, dense first)
"""

import sys

if {"-h", "--help"} & set(sys.argv[1:]):  # before importing flash_kda, which may build
    print(__doc__)
    sys.exit(0)

import torch  # noqa: E402

import flash_kda  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
CASES = {"dense": None, "varlen": [1, 17, 0, 70]}
unknown = [a for a in sys.argv[1:] if a not in CASES]
if unknown:
    sys.exit(f"sanitize_case.py: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
for name in sys.argv[1:] or CASES:
    seqlens = CASES[name]
    S = sum(seqlens) if seqlens else 80
    B = 1 if seqlens else 2
    H, D = 2, 128
    shape = (S, H, D) if seqlens else (B, S, H, D)
    q, k, v, g = (torch.randn(*shape, device=dev, dtype=torch.bfloat16) for _ in range(4))
    beta = torch.randn(*shape[:-1], device=dev, dtype=torch.bfloat16)
    N = len(seqlens) if seqlens else B
    cu = None if not seqlens else torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()],
                                               device=dev, dtype=torch.int32)
    h0 = torch.randn(N, H, D, D, device=dev)
    out, ht = flash_kda.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  cu_seqlens=cu, A_log=torch.zeros(H, device=dev),
                                  dt_bias=torch.zeros(H, D, device=dev))
    torch.cuda.synchronize()
    print("ok", tuple(out.shape), bool(torch.isfinite(out).all()), bool(torch.isfinite(ht).all()))
