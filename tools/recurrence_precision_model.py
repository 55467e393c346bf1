#!/usr/bin/env python
"""What 16-bit operands in the CUDA recurrence would cost in accuracy: a CPU model, no GPU.

    python tools/recurrence_precision_model.py [--T 2048 --H 4 --seed 0]

The CUDA two-kernel form (flash_kda/csrc/cuda/kda_split_recurrence.cuh) runs, per 32-token chunk,

    U = U0 - W S0ᵀ,   O = (Q e^γ) S0ᵀ + A_qk U,   S = S0 diag(e^{γ_last}) + Uᵀ Kl

with TF32 tensor-core products (10-bit mantissa operands, fp32 accumulation). This script runs the
same chunked algorithm in float64 and rounds exactly the operands that the hardware rounds, in
one of these modes:

    tf32         what main does today: every recurrence operand rounded to TF32 (round to
                 nearest, ties away, as cvt.rna.tf32.f32); the reference point
    fp16-scaled  the design of docs/next-fp16-recurrence.md: operands rounded to fp16 after a
                 power-of-two scale (exact) that brings the largest magnitude of each scaled group
                 into [2^14, 2^15): S and U per state row, W, Q e^γ and A_qk per token, Klᵀ
                 per channel; the products are unscaled in fp32 (branch wip/fp16-recurrence)
    fp16-chunk   S and U scaled per state row as in fp16-scaled, but each record array (W,
                 Q e^γ, A_qk, Klᵀ) with one scale for the whole chunk: fewer multiplies in the
                 recurrence (docs/performance.md v8); same errors as fp16-scaled here
    fp16-U0tok   fp16-chunk, and U0 (which main's records keep in fp32: 38 % of a record's bytes)
                 stored as fp16 too, one power-of-two scale per token (a row of U0 [L, V])
    fp16-U0v     the same with one scale per value channel (a column of U0, as U's scales)
    fp16-SU      scales on S and U only (the state-side operands); the records W, Q e^γ, A_qk
                 and Kl rounded to fp16 as they are
    fp16         fp16 operands without scales (shows what the scales are for)
    bf16         bf16 operands without scales (8-bit mantissa)

The preparation (A_kk, A_qk, the triangular solve, U0, W) is modelled the same way in every mode:
float32 arithmetic with TF32-rounded product operands, as the preparation kernel computes it.
Printed: relative L2 error of the output (before and after rounding it to bf16, the output
dtype) and of the fp32 final state, against kda_reference in float64, for a few input families.
The issue's bar (fla-core 0.6.0 on the H100): out 4.0e-3, final state 2.8e-3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flash_kda.reference import gate_log_decay, kda_reference, l2norm  # noqa: E402

C = 32  # tokens per chunk, as in the kernels
MODES = ("tf32", "fp16-scaled", "fp16-chunk", "fp16-U0tok", "fp16-U0v", "fp16-SU", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------
# Roundings (float64 in, float64 out, holding the rounded values)
# ---------------------------------------------------------------------------------------------
def to_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest with ties away from zero."""
    bits = x.float().view(torch.int32)
    bits = (bits + 0x1000) & ~0x1FFF  # sign-magnitude: adding half an ulp rounds the magnitude
    return bits.view(torch.float32).double()


def to_fp16_scaled(x: torch.Tensor, dims) -> torch.Tensor:
    """Scale by a power of two so that the largest |x| over `dims` lies in [2^14, 2^15), round to
    fp16, scale back (both scalings exact). An all-zero group keeps scale 1."""
    m = x.abs().amax(dim=dims, keepdim=True) if dims else x.abs().max()
    # (exponent clamped so that the scale stays a finite fp32: smaller groups round to zero)
    e = torch.where(m > 0, torch.floor(torch.log2(torch.where(m > 0, m, 1.0))), 0.0).clamp(min=-100)
    s = torch.exp2(14.0 - e)
    return (x.float() * s.float()).half().double() / s


def operand(x: torch.Tensor, mode: str, dims=None, record=False) -> torch.Tensor:
    """x as the tensor core sees it in `mode` (dims: the scaled groups' reduced dims; record: one
    of the preparation's arrays rather than S or U)."""
    if mode == "fp16-SU":
        mode = "fp16" if record else "fp16-scaled"
    if mode in ("fp16-chunk", "fp16-U0tok", "fp16-U0v"):
        return to_fp16_scaled(x.float().double(), None if record else dims)
    if mode == "tf32":
        return to_tf32(x)
    if mode == "fp16-scaled":
        return to_fp16_scaled(x.float().double(), dims)
    if mode == "fp16":
        return x.float().half().double()
    if mode == "bf16":
        return x.float().bfloat16().double()
    raise ValueError(mode)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product of already-rounded operands accumulated in fp32 (modelled: float64 sum, then
    one rounding to fp32; the hardware's fp32 accumulation error is far below the operands')."""
    return to_fp32(a @ b)


# ---------------------------------------------------------------------------------------------
# The chunked algorithm of the two-kernel form
# ---------------------------------------------------------------------------------------------
def prepare(q, k, v, a, b, scale):
    """One chunk's record as the preparation kernel forms it (float32, TF32 product operands).
    q, k, a: [L, K]; v: [L, V]; b: [L]; L <= C. Returns W, Qe, Kl, U0, Aqk, eg_last."""
    L = q.shape[0]
    gam = torch.cumsum(a, 0)  # inclusive: γ_i
    ke = k * gam.exp()
    qe = scale * q * gam.exp()
    kl = k * (gam[-1] - gam).exp()
    # A entries from the decay differences themselves (the kernels factor e^{γ_i - γ_j} around
    # reference tokens so that nothing overflows; tools/decay_reference_model.py checks that)
    decay = (gam[:, None, :] - gam[None, :, :]).clamp(max=0).exp()  # [i, j, K], i >= j used
    kt, qt = to_tf32(k), to_tf32(scale * q)
    tri = torch.tril(torch.ones(L, L, dtype=torch.float64), -1)
    akk = to_fp32(torch.einsum("ic,jc,ijc->ij", kt, kt, decay)) * tri
    aqk = to_fp32(torch.einsum("ic,jc,ijc->ij", qt, kt, decay)) * torch.tril(
        torch.ones(L, L, dtype=torch.float64))
    # T = (I + diag(b) Akk)^{-1} diag(b), by forward substitution in float32
    m = to_fp32(torch.eye(L, dtype=torch.float64) + b[:, None] * akk)
    t = to_fp32(torch.linalg.solve_triangular(m.float(), torch.diag(b).float(), upper=False).double())
    u0 = mm(to_tf32(t), to_tf32(v))
    w = mm(to_tf32(t), to_tf32(ke))
    return to_fp32(w), to_fp32(qe), to_fp32(kl), u0, aqk, to_fp32(gam[-1].exp())


def recurrence_chunk(S, rec, mode):
    """One chunk of the recurrence kernel for one head: S [V, K] fp32 values (float64 storage)."""
    w, qe, kl, u0, aqk, eg = rec
    s_op = operand(S, mode, dims=(1,))             # A operand: per state row
    x = mm(operand(w, mode, (1,), True), s_op.T)   # [L, V]: W S0ᵀ, W scaled per token
    o = mm(operand(qe, mode, (1,), True), s_op.T)  # Q e^γ scaled per token
    if mode in ("fp16-U0tok", "fp16-U0v"):         # U0 as the record would hold it
        u0 = to_fp16_scaled(u0, (1,) if mode == "fp16-U0tok" else (0,))
    u = to_fp32(u0 - x)                            # [L, V]
    u_op = operand(u, mode, dims=(0,))             # per state row v (column of this [L, V] array)
    o = to_fp32(o + mm(operand(aqk, mode, (1,), True), u_op))
    S = to_fp32(S * eg[None, :] + mm(u_op.T, operand(kl, mode, (0,), True)))  # Klᵀ per channel
    return o, S


def chunked_forward(q, k, v, a, b, scale, mode, prep=None):
    """[T, H, D] single sequence, zero initial state. Returns out [T, H, V] and S [H, V, K].
    prep(q, k, v, a, b, scale) forms a chunk's record (default: prepare above)."""
    T, H, D = q.shape
    out = torch.zeros_like(v)
    states = []
    for h in range(H):
        S = torch.zeros(D, D, dtype=torch.float64)
        for t0 in range(0, T, C):
            sl = slice(t0, min(t0 + C, T))
            rec = (prep or prepare)(q[sl, h], k[sl, h], v[sl, h], a[sl, h], b[sl, h], scale)
            o, S = recurrence_chunk(S, rec, mode)
            out[sl, h] = o
        states.append(S)
    return out, torch.stack(states)


# ---------------------------------------------------------------------------------------------
# Input families
# ---------------------------------------------------------------------------------------------
def family(name, T, H, D, gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, g, beta = r(T, H, D), r(T, H, D), r(T, H, D), r(T, H, D), r(T, H)
    A_log, dt_bias, l2 = r(H), r(H, D), True
    if name == "values x1e6":         # the state beyond fp16's 65504
        v = v * 1e6
    elif name == "values x1e-6":      # the state among fp16's subnormals
        v = v * 1e-6
    elif name == "no l2norm, |k|~4":  # raw keys: W and Kl leave [-1, 1] (much larger keys make
        # the delta rule itself unstable: β|k|² > 2)
        l2 = False
        q, k = q * 0.3, k * 0.3
    elif name == "no l2norm, q x1e-5":  # small queries: Q e^γ and A_qk among fp16's subnormals
        l2 = False
        q, k = q * 1e-5, k * 0.1
    elif name == "strong decay":      # gates near the lower bound: e^γ down to ~e^-150
        dt_bias = dt_bias + 6.0
    elif name == "near-parallel keys, beta~1":  # large entries in T
        k = k[:1].expand(T, H, D) + 0.05 * k
        beta = beta + 4.0
    elif name == "v = k M + 1 % noise":  # values the state learns to predict: U = U0 - W S0ᵀ is a
        # small residual of two larger terms (cancellation), where U0's own rounding shows most
        m = r(H, D, D) / D ** 0.5
        kn = k / k.norm(dim=-1, keepdim=True)
        v = torch.einsum("thk,hkv->thv", kn, m) + 0.01 * v
        beta = beta + 4.0  # beta ~ 1: the delta rule writes each value in almost fully
        dt_bias = dt_bias - 8.0  # weak decay: the state keeps what it learnt
    # bf16 inputs, as the kernels get them
    q, k, v, g, beta = (x.bfloat16().double() for x in (q, k, v, g, beta))
    return q, k, v, g, beta, A_log.float().double(), dt_bias.float().double(), l2


def rel(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


NAMES = ("randn (main job)", "values x1e6", "values x1e-6", "no l2norm, |k|~4", "no l2norm, q x1e-5",
         "strong decay", "near-parallel keys, beta~1", "v = k M + 1 % noise")


def print_errors(modes, forward, T, H, D, seed, names=NAMES) -> None:
    """For each input family, one row: per mode, forward(q, k, v, a, b, scale, mode)'s relative L2
    errors against the float64 kda_reference (out fp32, out rounded to bf16, final state)."""
    scale = D ** -0.5
    print(f"{'inputs':28s}" + "".join(f"{m:>24s}" for m in modes))
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed * 100 + i)
        q, k, v, g, beta, A_log, dt_bias, l2 = family(name, T, H, D, gen)
        ref_out, ref_S = kda_reference(q[None], k[None], v[None], g[None], beta[None], scale,
                                       A_log=A_log, dt_bias=dt_bias, use_qk_l2norm=l2)
        qq, kk = (l2norm(q), l2norm(k)) if l2 else (q, k)
        a = gate_log_decay(g, A_log, dt_bias, -5.0)
        b = torch.sigmoid(beta)
        row = f"{name:28s}"
        for mode in modes:
            out, S = forward(qq, kk, v, a, b, scale, mode)
            cell = f"{rel(out, ref_out[0]):.1e} {rel(out.bfloat16().double(), ref_out[0]):.1e} {rel(S, ref_S[0]):.1e}"
            row += f"{cell:>24s}"
        print(row, flush=True)


def model_args(doc: str) -> argparse.ArgumentParser:
    """The options both precision models take: problem size and seed."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = model_args(__doc__).parse_args(argv)
    print(f"T={args.T} H={args.H} D={args.D}, chunk {C}; rel-L2 vs float64 kda_reference "
          "(out fp32 | out bf16 | final state fp32)")
    print_errors(MODES, chunked_forward, args.T, args.H, args.D, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
