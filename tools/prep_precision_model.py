#!/usr/bin/env python
"""What 16-bit operands in the CUDA preparation would cost in accuracy: a CPU model, no GPU.

    python tools/prep_precision_model.py [--T 1024 --H 2 --seed 0 --modes tf32,bf16,fp16-row]

Why this model exists (docs/performance.md v21). The preparation kernel (kda_split_prep.cuh,
prep_block) keeps a chunk's K, Q, K e^γ and V in fp32 shared memory, 89 KB a block, so an SM holds
two blocks, and it runs its products on TF32 operands. A preparation that staged those arrays in 16
bits would need about half the shared memory, so twice the blocks per SM to hide its latencies. This
script answers the question to settle before building one: what would 16-bit product operands do to
the output and the final state?

The preparation's products, as the kernel forms them (sub-blocks of 16 tokens; "Decays in A" in
kda_chunk_tc.cuh):
    A[i, j] = sum_c  R[i, c] * (B[j, c] * M[I, J, c])       i in sub-block I, j in J <= I
        R = k_i e^{γ_i - γ_r(I)} (or q_i for A_qk), B = k_j e^{γ_e(J) - γ_j}, M = e^{γ_r(I) - γ_e(J)}
    T = (I + diag(β) A_kk)^{-1} diag(β)   (fp32 substitution; A_kk's entries TF32, as today)
    U0 = T V,  W = T (K e^γ)
Modes: how the operands of A (R and B·M) and of apply_T (T, V, K e^γ) reach the tensor cores,
as "<A's>/<apply_T's>" (one name: both); everything else as main:
    tf32      main as of v21: R, T, K e^γ rounded to TF32 (to nearest, ties away), B·M truncated
              to TF32 (the kernel passes its fp32 bits), V exact (bf16 input). (Since v36 the
              kernel rounds K e^{γ-γ_r} instead and applies e^{γ_r(I)} to W's accumulators in
              fp32, one rounding fewer; this model keeps the v21 form.)
    bf16      rounded to bf16 (8-bit mantissa, fp32's exponent range: no scales)
    fp16-row  fp16 after an exact power-of-two scale per row of the contraction (R per token i,
              B·M per token j, T per row, V and K e^γ per channel), largest magnitude in
              [2^14, 2^15); the scales factor out of each sum and are undone in fp32. For A this
              fails: a channel's R and B·M span up to 2^±96 (the decays), and one scale per row
              flushes the channels whose factor is small beside the row's largest
The recurrence runs as main runs it (fp16 records with one scale per chunk, S and U scaled per
row: mode "fp16-chunk" of tools/recurrence_precision_model.py). Printed: relative L2 error of the
output (fp32 and rounded to bf16) and of the fp32 final state against the float64 kda_reference,
for that model's input families. The issue's bar (fla-core 0.6.0 on the H100): out 4.0e-3, final
state 2.8e-3.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recurrence_precision_model import (  # noqa: E402  (the same roundings, families, recurrence)
    C, NAMES, chunked_forward, mm, model_args, print_errors, to_fp16_scaled, to_fp32, to_tf32)

ROUNDINGS = ("tf32", "bf16", "fp16-row", "exact")  # exact: float64 operands (tests the factoring)
MODES = ("tf32", "bf16", "bf16/tf32", "tf32/bf16", "tf32/fp16-row", "bf16/fp16-row", "fp16-row")
BS = 16                          # sub-block: the mma's M
MAX_SPAN = 96.0 * math.log(2.0)  # kMaxSpan (log2 units in the kernel), here in natural-log units
REF = 7                          # the middle reference token's offset in a sub-block (kRef)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    """TF32 by truncation: what the tensor cores make of fp32 bits passed as they are."""
    bits = x.float().view(torch.int32) & ~0x1FFF
    return bits.view(torch.float32).double()


def split_mode(mode: str) -> tuple[str, str]:
    """'<A's rounding>/<apply_T's>' (or one name for both) -> the two roundings."""
    a, _, t = mode.partition("/")
    return a, t or a


def rounded(x: torch.Tensor, mode: str, dims, truncate: bool = False) -> torch.Tensor:
    """x as the tensor cores would read it with rounding `mode` (one of ROUNDINGS); dims: the
    dims each power-of-two scale covers in fp16-row (the rest index the scaled rows)."""
    if mode == "tf32":
        return trunc_tf32(x) if truncate else to_tf32(x)
    if mode == "bf16":
        return x.float().bfloat16().double()
    if mode == "fp16-row":
        return to_fp16_scaled(x.float().double(), dims)
    if mode == "exact":
        return x
    raise ValueError(mode)


def a_products(rows: torch.Tensor, k: torch.Tensor, gam: torch.Tensor, mode: str, strict: bool):
    """A_kk (rows = k, strictly causal) or A_qk (rows = scale·q, causal) from the kernel's
    factored operands. rows, k, gam: [L, K] with L a multiple of 16 (the chunk, zero-padded)."""
    L = rows.shape[0]
    nb = L // BS
    gb = [torch.zeros_like(gam[0])] + [gam[BS * (m + 1) - 1] for m in range(nb)]  # γ before / at ends
    out = torch.zeros(L, L, dtype=torch.float64)
    for I in range(nb):
        gm = gam[BS * I + REF]
        mid = (gb[I] - gm <= MAX_SPAN) & (gm - gb[I + 1] <= MAX_SPAN)  # per channel (gam decreases)
        assert bool(((gb[I] - gb[I + 1] <= MAX_SPAN) | mid).all()), "a fallback tile: not modelled"
        ref = torch.where(mid, gm, gb[I])
        ri = slice(BS * I, BS * I + BS)
        R = rounded(to_fp32(rows[ri] * (gam[ri] - ref).exp()), mode, (1,))
        for J in range(I + 1):
            rj = slice(BS * J, BS * J + BS)
            Bm = to_fp32(to_fp32(k[rj] * (gb[J + 1] - gam[rj]).exp()) * to_fp32((ref - gb[J + 1]).exp()))
            out[ri, rj] = mm(R, rounded(Bm, mode, (1,), truncate=True).T)
    mask = torch.tril(torch.ones(L, L, dtype=torch.float64), -1 if strict else 0)
    return (out if mode == "exact" else to_tf32(out)) * mask  # compute_A stores its tiles as TF32


def prepare(q, k, v, a, b, scale, mode):
    """One chunk's record (W, Q e^γ, Kl, U0, A_qk, e^{γ_last}) with the preparation's product
    operands rounded as `mode` says. q, k, a: [L, K]; v: [L, V]; b: [L]; L <= C."""
    L = q.shape[0]
    mode_a, mode_t = split_mode(mode)
    pad = (-L) % BS  # the kernel zero-pads a short chunk (gates 0: γ stays at the last token's)
    z = lambda x: torch.cat([x, x.new_zeros(pad, *x.shape[1:])])  # noqa: E731
    gam = torch.cumsum(z(a), 0)
    qs, ks = z(scale * q), z(k)
    akk = a_products(ks, ks, gam, mode_a, strict=True)[:L, :L]
    aqk = a_products(qs, ks, gam, mode_a, strict=False)[:L, :L]
    gam = gam[:L]
    ke = to_fp32(k * gam.exp())
    m = to_fp32(torch.eye(L, dtype=torch.float64) + b[:, None] * akk)
    t = to_fp32(torch.linalg.solve_triangular(m.float(), torch.diag(b).float(), upper=False).double())
    t_op = rounded(t, mode_t, (1,))
    u0 = mm(t_op, rounded(v, mode_t, (0,)))
    w = mm(t_op, rounded(ke, mode_t, (0,)))
    return w, to_fp32(scale * q * gam.exp()), to_fp32(k * (gam[-1] - gam).exp()), u0, aqk, \
        to_fp32(gam[-1].exp())


def forward(q, k, v, a, b, scale, mode):
    """[T, H, D] single sequence, zero initial state: out [T, H, V] and S [H, V, K], the
    preparation's operands rounded as `mode` says, the recurrence as main runs it."""
    return chunked_forward(q, k, v, a, b, scale, "fp16-chunk",
                           prep=lambda *x: prepare(*x, mode))


def main(argv=None) -> int:
    ap = model_args(__doc__)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--families", type=int, default=len(NAMES), help="the first N input families")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if any(r not in ROUNDINGS for r in split_mode(m)):
            ap.error(f"unknown mode {m!r}: one of {', '.join(ROUNDINGS)}, or two joined by '/'")
    print(f"T={args.T} H={args.H} D={args.D}, chunk {C}; rel-L2 vs float64 kda_reference "
          "(out fp32 | out bf16 | final state fp32); recurrence as main (fp16-chunk)")
    print_errors(modes, forward, args.T, args.H, args.D, args.seed, NAMES[:args.families])
    return 0


if __name__ == "__main__":
    sys.exit(main())
