#!/usr/bin/env python
"""A lane-by-lane numpy model of the fp16 recurrence chunk (kda_chunk_split.cuh), no GPU.

    python tools/fp16_fragment_model.py [--D 128 --seed 0]

It follows recurrence_chunk's code per lane: the accumulator layouts, pack_a, the fragment order
that to_f16_rows writes and ld_frag reads, pow2_scale's exponent arithmetic, the m16n8k16
fragments as the PTX ISA defines them, and the unscaling. One warp (16 state rows), one chunk of
32 tokens, random fp32 operands with rows of very different magnitudes; the result (O, U, the new
S) is compared with float64 products. An index or ordering mistake shows as an O(1) error; the
fp16 roundings alone give ~1e-3.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

C = 32
LANES = [(lane // 4, lane % 4) for lane in range(32)]  # (g, t)


def pow2_scale(m: np.float32):
    """pow2_scale: (s, inv) from the exponent field of m."""
    e = (int(np.float32(m).view(np.int32)) >> 23) & 0xFF
    n = min(max(268 - e, 1), 253)
    return (np.int32(n << 23).view(np.float32), np.int32((254 - n) << 23).view(np.float32))


def f16(x):
    return np.float32(np.float16(np.float32(x)))  # cvt.rn to fp16 and back (exact)


def to_f16_rows(src: np.ndarray):
    """src [ROWS, COLS] fp32 -> (fragment-ordered fp16 rows as float32 values, inv, scale)."""
    rows, cols = src.shape
    dst = np.zeros_like(src)
    inv, scale = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    for r in range(rows):
        s, i = pow2_scale(np.abs(src[r]).max())
        for q in range(cols // 4):
            G, t = q // 4, q % 4
            for j, c in enumerate((2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)):
                dst[r, 4 * q + j] = f16(src[r, 16 * G + c] * s)
        inv[r], scale[r] = i, s
    return dst, inv, scale


def mma16(acc, a, b):
    """acc[lane][4] += A B: a[lane] = 8 halves (a0..a7 of the PTX A fragment), b[lane] = 4 halves
    (b0..b3). Builds the 16x16 and 16x8 matrices from the fragments, multiplies, scatters back."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane, (g, t) in enumerate(LANES):
        for i in range(8):
            row = g + (8 if i in (2, 3, 6, 7) else 0)
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[lane][i]
        for i in range(4):
            B[2 * t + (i & 1) + (8 if i >= 2 else 0), g] = b[lane][i]
    D = A @ B
    for lane, (g, t) in enumerate(LANES):
        for e in range(4):
            acc[lane][e] = np.float32(acc[lane][e] + D[g + (8 if e >= 2 else 0), 2 * t + (e & 1)])


def pack_a(c0, c1, s0, s1):
    """pack_a for one lane: registers a[0..3] as 8 halves in fragment order."""
    return [f16(c0[0] * s0), f16(c0[1] * s0), f16(c0[2] * s1), f16(c0[3] * s1),
            f16(c1[0] * s0), f16(c1[1] * s0), f16(c1[2] * s1), f16(c1[3] * s1)]


def ld_frag(arr, row, group, t):
    return list(arr[row, 16 * group + 4 * t: 16 * group + 4 * t + 4])


def quad_max(vals):  # per lane: max over the lane's quad
    return [max(vals[(lane // 4) * 4 + j] for j in range(4)) for lane in range(32)]


def row_scales(x):
    m0 = [max(max(abs(x[lane][it][0]), abs(x[lane][it][1])) for it in range(len(x[lane])))
          for lane in range(32)]
    m1 = [max(max(abs(x[lane][it][2]), abs(x[lane][it][3])) for it in range(len(x[lane])))
          for lane in range(32)]
    return [pow2_scale(m) for m in quad_max(m0)], [pow2_scale(m) for m in quad_max(m1)]


def chunk(S, W, Q, U0, Aqk, KlT, eg):
    """recurrence_chunk for one warp. S [16, D], W/Q [C, D], U0 [C, 16], Aqk [C, C], KlT [D, C],
    eg [D]. Returns O [16, C] (Oᵀ, rows v), U [16, C], S_new [16, D]."""
    D = S.shape[1]
    NT, KB, JB = C // 8, D // 16, C // 16
    Wh, wInv, _ = to_f16_rows(W)
    Qh, qInv, _ = to_f16_rows(Q)
    Ah, aInv, _ = to_f16_rows(Aqk)
    Kh, kInv, kSc = to_f16_rows(KlT)
    s = [[[np.float32(S[g + (8 if e >= 2 else 0), nt * 8 + 2 * t + (e & 1)]) for e in range(4)]
          for nt in range(D // 8)] for (g, t) in LANES]
    x = [[[np.float32(0)] * 4 for _ in range(NT)] for _ in range(32)]
    o = [[[np.float32(0)] * 4 for _ in range(NT)] for _ in range(32)]
    r0, r1 = row_scales(s)
    for kb in range(KB):
        a = [pack_a(s[ln][2 * kb], s[ln][2 * kb + 1], r0[ln][0], r1[ln][0]) for ln in range(32)]
        for it in range(NT):
            mma16([x[ln][it] for ln in range(32)], a,
                  [ld_frag(Wh, it * 8 + g, kb, t) for (g, t) in LANES])
            mma16([o[ln][it] for ln in range(32)], a,
                  [ld_frag(Qh, it * 8 + g, kb, t) for (g, t) in LANES])
    for ln, (g, t) in enumerate(LANES):
        for it in range(NT):
            i = it * 8 + 2 * t
            for e in range(4):
                rinv = r1[ln][1] if e >= 2 else r0[ln][1]
                x[ln][it][e] = np.float32(U0[i + (e & 1), g + (8 if e >= 2 else 0)]
                                          - x[ln][it][e] * rinv * wInv[i + (e & 1)])
                o[ln][it][e] = np.float32(o[ln][it][e] * rinv * qInv[i + (e & 1)])
    u0, u1 = row_scales(x)
    ua = [[pack_a(x[ln][2 * jb], x[ln][2 * jb + 1], u0[ln][0], u1[ln][0]) for ln in range(32)]
          for jb in range(JB)]
    for it in range(NT):
        o2 = [[np.float32(0)] * 4 for _ in range(32)]
        for jb in range(it // 2 + 1):
            mma16(o2, ua[jb], [ld_frag(Ah, it * 8 + g, jb, t) for (g, t) in LANES])
        for ln, (g, t) in enumerate(LANES):
            i = it * 8 + 2 * t
            for e in range(4):
                uinv = u1[ln][1] if e >= 2 else u0[ln][1]
                o[ln][it][e] = np.float32(o[ln][it][e] + o2[ln][e] * uinv * aInv[i + (e & 1)])
    for nt in range(D // 8):
        for ln, (g, t) in enumerate(LANES):
            c = nt * 8 + 2 * t
            fx, fy = eg[c] * kSc[c], eg[c + 1] * kSc[c + 1]
            f = (fx * u0[ln][0], fy * u0[ln][0], fx * u1[ln][0], fy * u1[ln][0])
            s[ln][nt] = [np.float32(s[ln][nt][e] * f[e]) for e in range(4)]
        for jb in range(JB):
            mma16([s[ln][nt] for ln in range(32)], ua[jb],
                  [ld_frag(Kh, nt * 8 + g, jb, t) for (g, t) in LANES])
        for ln, (g, t) in enumerate(LANES):
            c = nt * 8 + 2 * t
            f = (kInv[c] * u0[ln][1], kInv[c + 1] * u0[ln][1], kInv[c] * u1[ln][1],
                 kInv[c + 1] * u1[ln][1])
            s[ln][nt] = [np.float32(s[ln][nt][e] * f[e]) for e in range(4)]
    # gather
    O = np.zeros((16, C)); U = np.zeros((16, C)); Sn = np.zeros((16, D))
    for ln, (g, t) in enumerate(LANES):
        for e in range(4):
            r = g + (8 if e >= 2 else 0)
            for it in range(NT):
                O[r, it * 8 + 2 * t + (e & 1)] = o[ln][it][e]
                U[r, it * 8 + 2 * t + (e & 1)] = x[ln][it][e]
            for nt in range(D // 8):
                Sn[r, nt * 8 + 2 * t + (e & 1)] = s[ln][nt][e]
    return O, U, Sn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    D = args.D
    rng = np.random.default_rng(args.seed)
    mag = lambda n: np.float32(10.0) ** rng.uniform(-6, 6, (n, 1))  # noqa: E731  (row magnitudes)
    S = (rng.standard_normal((16, D)) * mag(16)).astype(np.float32)
    W = (rng.standard_normal((C, D)) * mag(C)).astype(np.float32)
    Q = (rng.standard_normal((C, D)) * mag(C)).astype(np.float32)
    U0 = (rng.standard_normal((C, 16)) * 1e3).astype(np.float32)
    Aqk = np.tril(rng.standard_normal((C, C)) * mag(C)).astype(np.float32)
    KlT = (rng.standard_normal((D, C)) * mag(D)).astype(np.float32)
    eg = rng.uniform(0.1, 1.0, D).astype(np.float32)
    O, U, Sn = chunk(S, W, Q, U0, Aqk, KlT, eg)
    S64 = S.astype(np.float64)
    U_ref = U0.T.astype(np.float64) - S64 @ W.T.astype(np.float64)
    O_ref = S64 @ Q.T.astype(np.float64) + U_ref @ Aqk.T.astype(np.float64)
    S_ref = S64 * eg[None, :] + U_ref @ KlT.T.astype(np.float64)
    worst = 0.0
    for name, got, ref in (("U", U, U_ref), ("O", O, O_ref), ("S", Sn, S_ref)):
        # per row (rows carry very different magnitudes on purpose)
        err = max(np.linalg.norm(got[r] - ref[r]) / np.linalg.norm(ref[r]) for r in range(16))
        worst = max(worst, err)
        print(f"{name}: worst per-row rel-L2 {err:.2e}")
    ok = np.isfinite(worst) and worst < 1e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
