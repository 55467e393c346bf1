"""A float32 numpy model of how the tensor-core bodies factor the decays of A (kda_chunk_tc.cuh,
"Decays in A"), to check the choice of reference token without a GPU.

    python tools/decay_reference_model.py            # the kernels' rule: every case must pass
    python tools/decay_reference_model.py --rule mid # always the middle token: fails on huge decays
    python tools/decay_reference_model.py --rule start  # the token before the sub-block (before v5):
                                                        # correct, but gates at -5 need the fallback

For one 32-token chunk it forms, as the kernels do, the row operand k_i e^{γ_i - γ_r}, the column
operand k_j e^{γ_e(J) - γ_j} e^{γ_r(I) - γ_e(J)} and the state-side scaling k e^{γ - γ_r} e^{γ_r}, in
float32 (exp2 overflows to inf as the GPU's does), and checks that every operand is finite and that
every A entry outside a fallback tile matches the float64 product. It reports the fallback flags:
gates with KDA's lower bound of -5 must need none.
"""

import argparse

import numpy as np

C, BS, NB, MAX_SPAN, REF = 32, 16, 2, 96.0, 7  # chunk, sub-block, sub-blocks, kMaxSpan, kRef
LOG2E = 1.4426950408889634


def choose_reference(gam, gb, rule):
    """Per (sub-block, channel) reference γ_r and the fallback flags, as cumsum_and_boundaries."""
    flags, ref = 0, np.zeros((NB, gam.shape[1]), np.float32)
    for I in range(NB):
        gm = gam[I * BS + REF]
        if rule in ("mid", "start"):
            mid = np.full(gm.shape, rule == "mid")
        else:
            mid = (gb[I] - gm <= MAX_SPAN) & (gm - gb[I + 1] <= MAX_SPAN)
        ref[I] = np.where(mid, gm, gb[I])
        full = gb[I] - gb[I + 1] > MAX_SPAN
        half = (gb[I] - gm > MAX_SPAN) | (gm - gb[I + 1] > MAX_SPAN)
        if np.any(np.where(mid, half, full)):
            flags |= 1 << I
    return ref, flags


def check(a, rule, rng):
    """a: [C, D] per-token log2 decays. Returns (flags, problems)."""
    D = a.shape[1]
    gam = np.cumsum(a, 0, dtype=np.float32)
    gb = np.zeros((NB + 1, D), np.float32)
    gb[1:] = gam[BS - 1 :: BS]
    k = (rng.standard_normal((C, D)) / np.sqrt(D)).astype(np.float32)
    ref, flags = choose_reference(gam, gb, rule)
    problems = []
    with np.errstate(all="ignore"):
        for i in range(C):
            I = i // BS
            row = k[i] * np.exp2(gam[i] - ref[I])
            if not np.all(np.isfinite(row * np.exp2(ref[I]))):
                problems.append(f"token {i}: row or state-side operand not finite")
                continue
            for j in range(i + 1):
                J = j // BS
                if I == J and (flags >> I) & 1:
                    continue  # compute_diag_fallback's tile
                col = k[j] * np.exp2(gb[J + 1] - gam[j]) * np.exp2(ref[I] - gb[J + 1])
                got = np.dot(row.astype(np.float64), col.astype(np.float64))
                want = np.dot(k[i].astype(np.float64) * k[j], np.exp2((gam[i] - gam[j]).astype(np.float64)))
                if not np.isfinite(got) or abs(got - want) > 1e-5 * (1 + abs(want)):
                    problems.append(f"A[{i},{j}] = {got:.3g}, want {want:.3g}")
    return flags, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", choices=["kernel", "mid", "start"], default="kernel")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    D = 64
    base = (-np.abs(rng.standard_normal((C, D))) * 0.5).astype(np.float32)
    cases = {}
    huge = base.copy()
    huge[10:12] = -1000 * LOG2E  # the tests' g = -1000, every channel
    cases["g=-1000 at tokens 10-11"] = huge
    part = base.copy()
    part[18, :7] = -1000 * LOG2E  # some channels, second sub-block
    cases["g=-1000 at token 18, 7 channels"] = part
    for g in (-5.0, -9.0, -13.0):
        cases[f"every token at {g} (natural log)"] = np.full((C, D), g * LOG2E, np.float32)
    bounded = (-5.0 * LOG2E * rng.random((C, D))).astype(np.float32)
    cases["random in [-5, 0] (natural log)"] = bounded
    failed = False
    for name, a in cases.items():
        flags, problems = check(a, args.rule, rng)
        status = "ok" if not problems else f"FAIL ({len(problems)}: {problems[0]})"
        print(f"{name:36s} fallback flags {flags:02b}  {status}")
        failed |= bool(problems)
        if "-5" in name and flags and args.rule != "start":
            print("  a gate bounded by -5 should need no fallback tile")
            failed = True
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
