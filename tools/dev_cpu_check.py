"""Developer check of the CPU kernel (flash_kda/csrc/cpu/kda_cpu.cpp) against the float64 reference.

Not part of the test suite: it JIT-builds the raw op directly (bypassing flash_kda.jit) so that the
kernel can be checked in isolation, and it has a benchmark mode against fla's naive PyTorch kernels.

    python tools/dev_cpu_check.py check [d128_fp32 d64_bf16 ...]   # correctness, per build
    python tools/dev_cpu_check.py bench                             # B=1 T=4096 H=8 D=128 fp32
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_reference():
    """flash_kda/reference.py on its own: importing the package would JIT-build every kernel."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kda_reference", f"{ROOT}/flash_kda/reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ref = _load_reference()
gate_log_decay, kda_reference, l2norm = _ref.gate_log_decay, _ref.kda_reference, _ref.l2norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MACROS = {"fp32": "FLASH_KDA_DTYPE_FP32", "bf16": "FLASH_KDA_DTYPE_BF16", "fp16": "FLASH_KDA_DTYPE_FP16"}


def build(d: int, dt: str, chunk: int | None = None, poison: bool = False):
    """chunk: override the kernel's chunk length (FLASH_KDA_CPU_CHUNK); None keeps its default.
    poison: fill the kernel's scratch with NaN first, so that reading an unwritten element shows."""
    from torch.utils.cpp_extension import load

    name = f"kda_dev_d{d}_{dt}" + (f"_c{chunk}" if chunk else "") + ("_poison" if poison else "")
    bdir = f"/tmp/kda_cpu_build/{name}"
    os.makedirs(bdir, exist_ok=True)
    flags = ["-O3", "-fopenmp", "-march=x86-64-v3", "-DFLASH_KDA_BACKEND_CPU",
             f"-DFLASH_KDA_HEAD_DIM={d}", f"-D{MACROS[dt]}", f"-DFLASH_KDA_OP_NAME={name}"]
    if chunk:
        flags.append(f"-DFLASH_KDA_CPU_CHUNK={chunk}")
    if poison:
        flags.append("-DFLASH_KDA_CPU_POISON_SCRATCH")
    load(
        name=name,
        sources=[f"{ROOT}/flash_kda/csrc/binding.cpp", f"{ROOT}/flash_kda/csrc/cpu/kda_cpu.cpp"],
        extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=bdir,
        verbose=False,
    )
    return getattr(torch.ops.flash_kda_kernels, name)


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def strided_like(x: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose only contiguous dim is the last (or none for 3-D beta)."""
    if x.dim() == 4:
        big = torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3] * 2, dtype=x.dtype)
        view = big.transpose(1, 2)[..., : x.shape[3]]
    else:
        big = torch.empty(*x.shape, 3, dtype=x.dtype)
        view = big[..., 1]
    view.copy_(x)
    return view


def make_case(d, dt, lens=None, B=2, T=300, hqk=2, hv=8, gate=True, l2=True, g_mode="uniform",
              g_fp32=False, beta_fp32=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dt]
    if lens is not None:
        B, T = 1, sum(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    else:
        cu = None
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k = r(B, T, hqk, d), r(B, T, hqk, d)
    if not l2:  # keep |k| ~ 1 so the recurrence stays stable without normalisation
        q, k = q / math.sqrt(d), k / math.sqrt(d)
    v = r(B, T, hv, d)
    beta = r(B, T, hv)
    if gate:
        g = r(B, T, hv, d)
        A_log = torch.log(torch.rand(hv, generator=gen) * 15 + 1)
        dt_bias = r(hv, d) * 0.5
    else:
        g = -5 * torch.rand(B, T, hv, d, generator=gen)
        if g_mode == "m1000":  # scattered -1000s, and a run of them across chunk boundaries
            g[torch.rand(B, T, hv, d, generator=gen) < 0.05] = -1000.0
            g[:, T // 3 : T // 3 + 40, :, : d // 2] = -1000.0
        A_log = dt_bias = None
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = g.float() if g_fp32 else g.to(dtype)
    beta = beta.float() if beta_fp32 else beta.to(dtype)
    return dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias, cu=cu, l2=l2)


def run_case(op, d, dt, case, state="none", strided=False, scale=None, lower_bound=-5.0, threads=None,
             cu_int64=False):
    """state: none | fp32 | input | inplace_fp32 | inplace_input | alias_fp32 (initial is final)."""
    c = dict(case)
    if cu_int64 and c["cu"] is not None:
        c["cu"] = c["cu"].long()
    dtype = DTYPES[dt]
    N = c["q"].shape[0] if c["cu"] is None else len(c["cu"]) - 1
    hv = c["v"].shape[2]
    scale = d ** -0.5 if scale is None else scale
    sdtype = torch.float32 if state.endswith("fp32") else dtype
    h0 = None if state == "none" else (torch.randn(N, hv, d, d) * 0.5).to(sdtype)
    q, v, beta = c["q"], c["v"], c["beta"]
    if strided:
        q, v, beta = strided_like(q), strided_like(v), strided_like(beta)
    out = torch.full_like(c["v"], float("nan"))
    if state == "none":
        ht, init, in_place = torch.full((N, hv, d, d), float("nan")), None, False
    elif state.startswith("inplace"):
        ht, init, in_place = h0.clone(), None, True
    elif state.startswith("alias"):
        ht = h0.clone()
        init, in_place = ht, False
    else:
        ht, init, in_place = torch.full((N, hv, d, d), float("nan"), dtype=sdtype), h0, False
    saved_threads = torch.get_num_threads()
    if threads:  # more threads than pairs of (sequence, head): the kernel splits V
        torch.set_num_threads(threads)
    try:
        op(q, c["k"], v, c["g"], beta, c["A_log"], c["dt_bias"], init, ht, out, c["cu"], scale,
           lower_bound, c["l2"], in_place)
    finally:
        torch.set_num_threads(saved_threads)
    ref_o, ref_s = kda_reference(c["q"], c["k"], c["v"], c["g"], c["beta"], scale=scale,
                                 initial_state=h0, cu_seqlens=c["cu"], A_log=c["A_log"],
                                 dt_bias=c["dt_bias"], lower_bound=lower_bound, use_qk_l2norm=c["l2"])
    return rel(out, ref_o), rel(ht, ref_s)


def check(builds):
    tol = {"fp32": (2e-5, 2e-5), "bf16": (8e-3, 8e-3), "fp16": (2e-3, 2e-3)}
    worst = 0.0
    for spec in builds:  # d128_fp32; optional suffixes _c64 (chunk length), _poison (NaN scratch)
        parts = spec.split("_")
        d, dt = int(parts[0][1:]), parts[1]
        chunk = next((int(x[1:]) for x in parts[2:] if x.startswith("c")), None)
        op = build(d, dt, chunk, poison="poison" in parts[2:])
        cases = [
            ("dense B2 T300 gate l2", dict(), {}),
            ("dense gate-off l2-off", dict(gate=False, l2=False), {}),
            ("dense gate-off g=-1000", dict(gate=False, g_mode="m1000"), {}),
            ("varlen [0,1,17,130,0,65]", dict(lens=[0, 1, 17, 130, 0, 65]), {"state": "fp32"}),
            ("varlen gate-off", dict(lens=[0, 1, 17, 130, 0, 65], gate=False), {"state": "input"}),
            ("state fp32", dict(), {"state": "fp32"}),
            ("state input dtype", dict(), {"state": "input"}),
            ("in place fp32", dict(), {"state": "inplace_fp32"}),
            ("in place input dtype", dict(), {"state": "inplace_input"}),
            ("initial is final", dict(lens=[5, 70, 33]), {"state": "alias_fp32"}),
            ("strided q/v/beta", dict(), {"strided": True, "state": "fp32"}),
            ("g/beta fp32", dict(g_fp32=True, beta_fp32=True), {"state": "fp32"}),
            ("Hqk=Hv=1 long T=700", dict(B=1, T=700, hqk=1, hv=1), {"state": "fp32"}),
            ("Hqk=1 Hv=3 T=37", dict(B=1, T=37, hqk=1, hv=3, gate=False), {"state": "fp32"}),
            ("V split (5 threads)", dict(B=1, T=200, hqk=1, hv=1), {"state": "fp32", "threads": 5}),
            ("varlen V split (3 thr)", dict(lens=[250, 3, 0, 9], hqk=1, hv=2),
             {"state": "inplace_fp32", "threads": 3}),
            ("cu_seqlens int64", dict(lens=[0, 1, 17, 130, 0, 65]), {"cu_int64": True}),
            ("scale 0.3, lower_bound -2", dict(), {"scale": 0.3, "lower_bound": -2.0}),
        ]
        for label, ck, rk in cases:
            case = make_case(d, dt, **ck)
            eo, es = run_case(op, d, dt, case, **rk)
            to, ts = tol[dt]
            ok = eo < to and es < ts
            worst = max(worst, eo / to, es / ts)
            print(f"{spec:14s} {label:28s} out {eo:.2e}  state {es:.2e}  {'ok' if ok else 'FAIL'}",
                  flush=True)
        nan_check(op, d, dt)
    print("worst error / tolerance:", f"{worst:.2f}")


def nan_check(op, d, dt):
    """A NaN in one token must poison exactly what it poisons in the reference."""
    for where in ("q", "v", "g", "k"):
        case = make_case(d, dt, B=1, T=100, hqk=1, hv=2, gate=(where != "g"))
        case[where] = case[where].clone()
        case[where][0, 57, 0, 3] = float("nan")
        out = torch.full_like(case["v"], float("nan"))
        ht = torch.zeros(1, 2, d, d)
        op(case["q"], case["k"], case["v"], case["g"], case["beta"], case["A_log"], case["dt_bias"],
           None, ht, out, None, d ** -0.5, -5.0, True, False)
        ref_o, ref_s = kda_reference(case["q"], case["k"], case["v"], case["g"], case["beta"],
                                     A_log=case["A_log"], dt_bias=case["dt_bias"])
        same = torch.equal(out.isfinite(), ref_o.isfinite()) and torch.equal(ht.isfinite(), ref_s.isfinite())
        fin = out.isfinite() & ref_o.isfinite()
        print(f"NaN in {where}: finite masks {'match' if same else 'DIFFER'}; "
              f"nonfinite out {int((~out.isfinite()).sum())}/{out.numel()}; "
              f"finite part rel err {rel(out[fin], ref_o[fin]):.1e}")


def bench(reps=5):
    # fla's package __init__ imports triton; its naive.py needs only torch and einops.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fla_kda_naive", "/tmp/fla/src/fla/ops/kda/naive.py")
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    naive_chunk_kda, naive_recurrent_kda = naive.naive_chunk_kda, naive.naive_recurrent_kda

    torch.set_num_threads(os.cpu_count())
    B, T, H, D = 1, 4096, 8, 128
    op = build(D, "fp32")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = torch.randn(B, T, H, D, generator=gen)
    beta = torch.randn(B, T, H, generator=gen)
    A_log = torch.log(torch.rand(H, generator=gen) * 15 + 1)
    dt_bias = torch.randn(H, D, generator=gen) * 0.5
    out = torch.empty_like(v)

    def ours():
        op(q, k, v, g, beta, A_log, dt_bias, None, None, out, None, D ** -0.5, -5.0, True, False)

    # fla's naive kernels take the preprocessed inputs; preprocessing is not counted against them.
    qn, kn = l2norm(q), l2norm(k)
    a = gate_log_decay(g, A_log, dt_bias, -5.0)
    b = torch.sigmoid(beta)

    def timeit(fn, n):
        """(median, min) wall seconds of n calls after one warm-up call."""
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), min(ts)

    (t_ours, m_ours) = timeit(ours, reps * 4)
    (t_rec, m_rec) = timeit(lambda: naive_recurrent_kda(qn, kn, v, a, b, scale=D ** -0.5), reps)
    (t_chk, m_chk) = timeit(lambda: naive_chunk_kda(qn, kn, v, a, b, scale=D ** -0.5), reps)
    ref_o, _ = naive_chunk_kda(qn.double(), kn.double(), v.double(), a.double(), b.double(), scale=D ** -0.5)
    print(f"threads {torch.get_num_threads()}; ours vs fla naive_chunk (fp64) rel err {rel(out, ref_o):.1e}")

    # Machine fp32 FMA rate: a large fp32 GEMM.
    x, y = torch.randn(4096, 4096), torch.randn(4096, 4096)
    t_mm = timeit(lambda: torch.mm(x, y), 5)[1]  # best of 5: the machine's attainable rate
    rate = 2 * 4096 ** 3 / t_mm
    C = 16  # keep in sync with kChunk
    # FMAs per token and head: K̃S0ᵀ, Q̃S0ᵀ, state update (3·K·V); triangular solve and A_qk·U
    # (C/2 · V each); the two score matrices (C/2 · K each).
    per_token = 3 * D * D + C * D + C * D
    flops = 2 * per_token * B * T * H
    print("                     median (ms)   min (ms)")
    print(f"ours                 {t_ours * 1e3:10.2f} {m_ours * 1e3:10.2f}")
    print(f"naive_recurrent_kda  {t_rec * 1e3:10.2f} {m_rec * 1e3:10.2f}   ({t_rec / t_ours:.1f}x ours)")
    print(f"naive_chunk_kda      {t_chk * 1e3:10.2f} {m_chk * 1e3:10.2f}   ({t_chk / t_ours:.1f}x ours)")
    print(f"torch.mm fp32 rate   {rate / 1e9:8.1f} GFLOP/s; algorithm {flops / 1e9:.2f} GFLOP "
          f"-> floor {flops / rate * 1e3:.2f} ms (ours at {flops / t_ours / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    if mode == "check":
        check(sys.argv[2:] or ["d128_fp32"])
    elif mode == "bench":
        bench()
    else:
        raise SystemExit(__doc__)
