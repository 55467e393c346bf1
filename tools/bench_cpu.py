#!/usr/bin/env python
"""CPU benchmark: flash_kda's CPU kernel vs fla's pure-PyTorch naive KDA, side by side, one process.

    pip install ".[bench]"        # fla-core 0.6.0 (only its naive.py is used) + einops
    python tools/bench_cpu.py [--T 4096] [--H 8] [--D 128] [--reps 5]

fla's `naive_recurrent_kda` and `naive_chunk_kda` get the same already-normalised q/k, the
log-decay g (the gate applied) and sigmoid(beta); flash_kda gets the raw inputs and does those in
the kernel (its time includes them). All fp32. Also prints the floor: the kernel's FLOPs divided by
this machine's measured fp32 FMA rate (a large torch.mm), and the error of each against the float64
reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flash_kda  # noqa: E402
from flash_kda.reference import gate_log_decay, kda_reference, l2norm  # noqa: E402


def load_fla_naive():
    """fla/ops/kda/naive.py alone: importing the fla package would pull in triton."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fla-core is not installed: pip install '.[bench]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "kda" / "naive.py"
    mod_spec = importlib.util.spec_from_file_location("fla_kda_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.naive_recurrent_kda, mod.naive_chunk_kda


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fma_rate(reps: int = 5) -> float:
    """fp32 FLOP/s of a large matrix product (the machine's practical FMA ceiling)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_s(lambda: a @ b, reps)


def kernel_flops(T: int, H: int, D: int, C: int = 16) -> float:
    """FLOPs of the chunked algorithm (K = V = D, chunk C; a multiply-add counts 2). Per chunk and
    head, in multiply-adds: A_kk and A_qk (C²D/2 each), the triangular solve (C³/6), U = T·V and
    W = T·K̃ (C²D/2 each), A_qk·U' (C²D/2), and W·S0ᵀ, Q̃·S0ᵀ, U'ᵀ·K̃ (C·D² each).
    C defaults to the CPU kernel's chunk (FLASH_KDA_CPU_CHUNK in csrc/cpu/kda_cpu.cpp)."""
    macs_per_chunk = 5 * C * C * D / 2 + C ** 3 / 6 + 3 * C * D * D
    return 2 * macs_per_chunk * (T / C) * H


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    T, H, D = args.T, args.H, args.D
    naive_recurrent_kda, naive_chunk_kda = load_fla_naive()

    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v, g, beta = r(1, T, H, D), r(1, T, H, D), r(1, T, H, D), r(1, T, H, D), r(1, T, H)
    A_log, dt_bias = torch.rand(H, generator=gen) * 2 - 1, r(H, D) * 0.5
    out = torch.empty_like(v)
    scale = D ** -0.5

    def ours():
        flash_kda.chunk_kda(q, k, v, g, beta, scale=scale, A_log=A_log, dt_bias=dt_bias, output=out)

    # fla's naive functions take preprocessed inputs; preparing them is not counted against them.
    qn, kn = l2norm(q), l2norm(k)
    a = gate_log_decay(g, A_log, dt_bias, -5.0)
    b = torch.sigmoid(beta)

    t_ours = median_s(ours, args.reps)
    t_rec = median_s(lambda: naive_recurrent_kda(qn, kn, v, a, b, scale=scale), max(1, args.reps // 2))
    t_chk = median_s(lambda: naive_chunk_kda(qn, kn, v, a, b, scale=scale), max(1, args.reps // 2))

    ref, _ = kda_reference(q, k, v, g, beta, scale=scale, A_log=A_log, dt_bias=dt_bias)
    err = lambda x: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    o_rec, _ = naive_recurrent_kda(qn, kn, v, a, b, scale=scale)
    o_chk, _ = naive_chunk_kda(qn, kn, v, a, b, scale=scale)
    rate = fma_rate()
    floor = kernel_flops(T, H, D) / rate
    best_fla = min(t_rec, t_chk)

    print(f"B=1 T={T} H={H} D={D} fp32, gate + l2norm; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured fp32 matmul rate {rate / 1e9:.1f} GFLOP/s")
    print(f"\n| kernel | ms | vs flash_kda | rel-L2 vs float64 |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| flash_kda chunk_kda (CPU backend) | {t_ours * 1e3:.1f} | 1.00 | {err(out):.1e} |")
    print(f"| fla naive_recurrent_kda | {t_rec * 1e3:.1f} | {t_rec / t_ours:.1f}x slower | {err(o_rec):.1e} |")
    print(f"| fla naive_chunk_kda | {t_chk * 1e3:.1f} | {t_chk / t_ours:.1f}x slower | {err(o_chk):.1e} |")
    print(f"| floor (FLOPs / matmul rate) | {floor * 1e3:.1f} | | |")
    print(f"\nspeed-up over the faster fla naive kernel: {best_fla / t_ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
