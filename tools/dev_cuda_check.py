#!/usr/bin/env python3
"""Scratch checks for the CUDA kernels (flash_kda/csrc/cuda): build, compare with the float64
reference, time. A developer tool, not part of the package or its tests.

    # here (no GPU needed): compile the ops into .devbuild/*.so, so that no device time goes to
    # compiling. Needs the headers and libraries of the torch the GPU machine runs (2.11.0, CUDA 13):
    #   pip download --no-deps --only-binary=:all: torch==2.11.0 -d /tmp/whl
    #   python3 -m venv /tmp/tenv && /tmp/tenv/bin/pip install --no-deps /tmp/whl/torch-2.11.0-*.whl
    # (it need not import: only include/ and lib/ are used), then
    python3 tools/dev_cuda_check.py prebuild --torch-dir /tmp/tenv/lib/python3.11/site-packages/torch
    # on the GPU machine (carry .devbuild): load .devbuild/*.so, or JIT-build what is missing; check
    python3 tools/dev_cuda_check.py check [--bench] [--specs d128_bf16,...]
    # a tiny case for compute-sanitizer
    compute-sanitizer --tool racecheck python3 tools/dev_cuda_check.py tiny --specs d128_bf16

Each spec is d<head dim>_<dtype>[_portable]; its op is torch.ops.flash_kda_kernels.kda_dev_cuda_<spec>.
The prebuilt objects carry the -D defines of the JIT (binding.cpp and kda_cuda.cu) and nvcc's torch
flags (-D__CUDA_NO_HALF_OPERATORS__ ...), for sm_90a.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "flash_kda" / "csrc"
DEFAULT_LIB = ROOT / ".devbuild"
# KDA_DEV_FAKE=1: no GPU, no build; the "op" is the reference itself on the CPU. Only for dry runs
# of this script's own plumbing (every error should then be ~0).
FAKE = os.environ.get("KDA_DEV_FAKE") == "1"
DEVICE = "cpu" if FAKE else "cuda"
ALL_SPECS = ["d128_bf16", "d128_bf16_portable", "d64_bf16", "d256_bf16", "d128_fp16",
             "d64_bf16_portable", "d256_bf16_portable", "d128_fp16_portable"]
GENCODE = ["-gencode=arch=compute_90a,code=sm_90a"]


def parse_spec(spec: str):
    parts = spec.split("_")
    return int(parts[0][1:]), parts[1], len(parts) > 2 and parts[2] == "portable"


def op_name(spec: str) -> str:
    return f"kda_dev_cuda_{spec}"


def defines(spec: str) -> list[str]:
    d, dtype, portable = parse_spec(spec)
    out = ["-DFLASH_KDA_BACKEND_CUDA", f"-DFLASH_KDA_HEAD_DIM={d}",
           f"-DFLASH_KDA_DTYPE_{dtype.upper()}", f"-DFLASH_KDA_OP_NAME={op_name(spec)}"]
    if portable:
        out.append("-DFLASH_KDA_KERNEL_PORTABLE")
    return out


# ------------------------------------------------------------------------------------------------
# prebuild: the same flags as torch.utils.cpp_extension.load, without importing torch
# ------------------------------------------------------------------------------------------------
def prebuild(args):
    tdir = Path(args.torch_dir or Path(importlib.util.find_spec("torch").origin).parent)
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    inc = ["-isystem", str(tdir / "include"), "-isystem", str(tdir / "include/torch/csrc/api/include"),
           "-isystem", str(cuda / "include")]
    out = Path(args.lib)
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "obj"
    obj.mkdir(exist_ok=True)
    nvcc_common = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                   "--expt-relaxed-constexpr", "--compiler-options", "-fPIC", "-O3", "-std=c++17"]
    jobs = []
    for spec in args.specs.split(","):
        name = op_name(spec)
        bo, ko = obj / f"{name}_binding.o", obj / f"{name}_cuda.o"
        jobs.append((spec, [
            ["g++", "-c", str(CSRC / "binding.cpp"), "-o", str(bo), "-fPIC", "-std=c++17", "-O3",
             f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H", *inc,
             *defines(spec)],
            ["nvcc", "-c", str(CSRC / "cuda" / "kda_cuda.cu"), "-o", str(ko), *nvcc_common,
             *GENCODE, *defines(spec), "-Xptxas", "-v"],
        ], ["g++", "-shared", str(bo), str(ko), "-o", str(out / f"{name}.so"), f"-L{tdir / 'lib'}",
            "-lc10", "-lc10_cuda", "-ltorch_cpu", "-ltorch_cuda", "-ltorch", f"-L{cuda / 'lib64'}",
            "-lcudart"]))

    def run(cmd):
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
        return r.stderr, time.time() - t

    with ThreadPoolExecutor(args.jobs) as pool:
        compiled = {spec: [pool.submit(run, c) for c in cmds] for spec, cmds, _ in jobs}
        for spec, _, link in jobs:
            for f in compiled[spec]:
                log, secs = f.result()
                for line in log.splitlines():
                    if "registers" in line or "spill" in line:
                        print(f"  {spec}: {line.strip()}")
            run(link)
            print(f"built {spec}")


# ------------------------------------------------------------------------------------------------
# device side
# ------------------------------------------------------------------------------------------------
def fake_op(q, k, v, g, beta, A_log, dt_bias, h0, ht, out, cu, scale, lb, l2, in_place):
    """Stand-in with the op's signature, computed by the reference (KDA_DEV_FAKE=1)."""
    o, s = reference(dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias,
                          h0=ht.clone() if in_place else h0, cu=cu, scale=scale, l2=l2))
    out.copy_(o)
    if ht is not None:
        ht.copy_(s)


def load_ops(specs, lib: Path):
    import torch
    if FAKE:
        return {s: fake_op for s in specs}
    for spec in specs:
        so = lib / f"{op_name(spec)}.so"
        if so.exists():
            torch.ops.load_library(str(so))
            continue
        from torch.utils.cpp_extension import load
        d = Path(os.environ.get("TMPDIR", "/tmp")) / "kda_dev_build" / spec
        d.mkdir(parents=True, exist_ok=True)
        t = time.time()
        load(name=op_name(spec), sources=[str(CSRC / "binding.cpp"), str(CSRC / "cuda" / "kda_cuda.cu")],
             extra_cflags=["-O3", *defines(spec)],
             extra_cuda_cflags=["-O3", *GENCODE, *defines(spec)], is_python_module=False,
             build_directory=str(d), verbose=False)
        print(f"jit-built {spec} in {time.time() - t:.0f}s")
    return {s: getattr(torch.ops.flash_kda_kernels, op_name(s)) for s in specs}


def make_inputs(D, dtype, *, B=1, T=64, hqk=2, hv=2, cu=None, cu64=False, gate=True, l2=True,
                h0=None, ht=None, inplace=False, g_fp32=False, beta_fp32=False, g1000=False,
                strided=False, seed=0):
    """Random inputs of one case. h0/ht: None, 'fp32' or 'in' (input dtype)."""
    import torch
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(seed)
    if cu is not None:
        B, T = 1, cu[-1]
    N = len(cu) - 1 if cu is not None else B

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, device=dev) * s

    qk_scale = 1.0 if l2 else D ** -0.5  # without l2norm keep ||k|| ~ 1 so the recurrence is stable
    if strided:  # q: token-major view of a head-major tensor; v, beta: slices of wider tensors
        q = randn(B, hqk, T, D, s=qk_scale).to(dtype).transpose(1, 2)
        v = randn(B, T, hv, 2 * D).to(dtype)[..., D:]
        beta = randn(B, T, hv, 3).to(torch.float32 if beta_fp32 else dtype)[..., 1]
    else:
        q = randn(B, T, hqk, D, s=qk_scale).to(dtype)
        v = randn(B, T, hv, D).to(dtype)
        beta = randn(B, T, hv).to(torch.float32 if beta_fp32 else dtype)
    k = randn(B, T, hqk, D, s=qk_scale).to(dtype)
    if gate:
        g = randn(B, T, hv, D)
        A_log = (torch.rand(hv, generator=gen, device=dev) * 2.0).float()
        dt_bias = randn(hv, D, s=0.5).float()
    else:
        g = -5.0 * torch.rand(B, T, hv, D, generator=gen, device=dev) - 1e-3
        A_log = dt_bias = None
        if g1000:
            g[:, T // 3, :, : D // 2] = -1000.0
            g[:, (2 * T) // 3, 0, :] = -1000.0
    g = g.to(torch.float32 if g_fp32 else dtype)
    sdt = {"fp32": torch.float32, "in": dtype, None: None}
    h0_t = randn(N, hv, D, D, s=0.5).to(sdt[h0]) if h0 else None
    ht_t = torch.full((N, hv, D, D), float("nan"), device=dev, dtype=sdt[ht]) if ht else None
    cu_t = None
    if cu is not None:
        cu_t = torch.tensor(cu, device=dev, dtype=torch.int64 if cu64 else torch.int32)
    return dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias, h0=h0_t, ht=ht_t,
                cu=cu_t, scale=D ** -0.5, l2=l2, inplace=inplace)


def call_op(op, x):
    import torch
    out = torch.full(x["v"].shape, float("nan"), device=x["v"].device, dtype=x["v"].dtype)
    ht = x["ht"]
    if x["inplace"]:
        ht = x["h0"].clone()
        op(x["q"], x["k"], x["v"], x["g"], x["beta"], x["A_log"], x["dt_bias"], None, ht, out,
           x["cu"], x["scale"], -5.0, x["l2"], True)
    else:
        op(x["q"], x["k"], x["v"], x["g"], x["beta"], x["A_log"], x["dt_bias"], x["h0"], ht, out,
           x["cu"], x["scale"], -5.0, x["l2"], False)
    return out, ht


def rel_l2(a, b):
    import torch
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _reference_fn():
    """flash_kda/reference.py loaded by path: importing the package would build kernels on import."""
    spec = importlib.util.spec_from_file_location("_kda_reference", ROOT / "flash_kda" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.kda_reference


def reference(x):
    kda_reference = _reference_fn()
    return kda_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=x["scale"],
                         initial_state=x["h0"], cu_seqlens=x["cu"], A_log=x["A_log"],
                         dt_bias=x["dt_bias"], lower_bound=-5.0, use_qk_l2norm=x["l2"])


def cases_for(D):
    """(name, kwargs) of every check of one head dim."""
    full = D == 128
    vl = [0, 1, 18, 318, 1342, 1342, 1855]  # lengths 1, 17, 300, 1024, 0, 513
    # enough sequences x heads that the launcher picks the wide V slice (few heads pick the narrow)
    many = {64: dict(B=8, T=100, hqk=8, hv=64), 128: dict(B=2, T=200, hqk=4, hv=60),
            256: dict(B=2, T=100, hqk=4, hv=48)}[D]
    c = [("dense B2 T1000 H4 ht32", dict(B=2, T=1000, hqk=4, hv=4, ht="fp32")),
         ("many heads (wide slice) h0/ht32", dict(many, h0="fp32", ht="fp32")),
         ("varlen i32 H8 h0/ht fp32", dict(cu=vl, hqk=8, hv=8, h0="fp32", ht="fp32")),
         ("varlen i64 H8 h0/ht bf16|fp16", dict(cu=vl, cu64=True, hqk=8, hv=8, h0="in", ht="in"))]
    if full:
        c += [
            ("varlen no h0, ht fp32", dict(cu=vl, hqk=8, hv=8, ht="fp32")),
            ("grouped hqk2 hv8 h0/ht32", dict(B=2, T=300, hqk=2, hv=8, h0="fp32", ht="fp32")),
            ("in place fp32", dict(cu=vl, hqk=4, hv=4, h0="fp32", inplace=True)),
            ("in place bf16|fp16", dict(B=2, T=333, hqk=4, hv=4, h0="in", inplace=True)),
            ("gate off g in [-5,0)", dict(B=2, T=500, hqk=4, hv=4, gate=False, h0="fp32", ht="fp32")),
            ("gate off, g=-1000 tokens", dict(B=2, T=500, hqk=4, hv=4, gate=False, g1000=True,
                                              h0="fp32", ht="fp32")),
            ("l2norm off", dict(B=2, T=500, hqk=4, hv=4, l2=False, h0="fp32", ht="fp32")),
            ("g, beta fp32", dict(B=2, T=500, hqk=4, hv=4, g_fp32=True, beta_fp32=True, ht="fp32")),
            ("strided q/v/beta views", dict(B=2, T=500, hqk=2, hv=4, strided=True, h0="fp32",
                                            ht="fp32")),
            ("T=0 dense, h0->ht", dict(B=2, T=0, hqk=2, hv=2, h0="fp32", ht="fp32")),
        ]
    return c


def check(args):
    import torch
    specs = args.specs.split(",")
    ops = load_ops(specs, Path(args.lib))
    rows = []
    for spec in specs:
        D, dt, portable = parse_spec(spec)
        dtype = torch.bfloat16 if dt == "bf16" else torch.float16
        for i, (name, kw) in enumerate(cases_for(D)):
            x = make_inputs(D, dtype, seed=1000 * D + i, **kw)
            out, ht = call_op(ops[spec], x)
            if not FAKE:
                torch.cuda.synchronize()
            ro, rs = reference(x)
            eo = rel_l2(out, ro) if out.numel() else 0.0
            nan_o = int(out.isnan().sum() - ro.isnan().sum())
            es = rel_l2(ht, rs) if ht is not None else float("nan")
            nan_s = int(ht.isnan().sum() - rs.isnan().sum()) if ht is not None else 0
            rows.append((spec, name, eo, nan_o, es, nan_s))
            print(f"{spec:20s} {name:32s} out {eo:.2e} nan {nan_o:<4d} state {es:.2e} nan {nan_s}",
                  flush=True)
        # a second run on the same inputs must be bit-identical (a race shows up here)
        x = make_inputs(D, dtype, seed=7, cu=[0, 100, 900, 1000], hqk=4, hv=4, h0="fp32", ht="fp32")
        o1, s1 = call_op(ops[spec], x)
        o2, s2 = call_op(ops[spec], x)
        same = bool(torch.equal(o1, o2) and torch.equal(s1, s2))
        print(f"{spec:20s} {'repeat bit-identical':32s} {same}", flush=True)
        rows.append((spec, "repeat bit-identical", 0.0 if same else 1.0, 0, float("nan"), 0))
    if args.bench:
        bench(ops, specs)
    bad = [r for r in rows if not (r[2] < 5e-3 and r[3] == 0 and r[5] == 0 and
                                   (math.isnan(r[4]) or r[4] < 5e-3))]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")


def bench(ops, specs):
    import torch
    for spec in specs:
        D, dt, _ = parse_spec(spec)
        if D != 128 or dt != "bf16":
            continue
        x = make_inputs(D, torch.bfloat16, B=1, T=8192, hqk=96, hv=96, seed=3)
        out = torch.empty_like(x["v"])
        args = (x["q"], x["k"], x["v"], x["g"], x["beta"], x["A_log"], x["dt_bias"], None, None, out,
                None, x["scale"], -5.0, True, False)
        for _ in range(3):
            ops[spec](*args)
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            ops[spec](*args)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        print(f"BENCH {spec}: B=1 T=8192 H=96 K=V=128 bf16 gates+l2norm, no state: median "
              f"{statistics.median(times):.3f} ms (min {min(times):.3f}, max {max(times):.3f})",
              flush=True)


def tiny(args):
    """Small dense and varlen calls, for compute-sanitizer."""
    import torch
    specs = args.specs.split(",")
    ops = load_ops(specs, Path(args.lib))
    for spec in specs:
        D, dt, _ = parse_spec(spec)
        dtype = torch.bfloat16 if dt == "bf16" else torch.float16
        for kw in (dict(B=1, T=70, hqk=1, hv=2, h0="fp32", ht="fp32"),
                   dict(cu=[0, 5, 40, 40, 100], hqk=1, hv=1, h0="in", inplace=True)):
            x = make_inputs(D, dtype, **kw)
            out, ht = call_op(ops[spec], x)
            if not FAKE:
                torch.cuda.synchronize()
            ro, rs = reference(x)
            print(f"tiny {spec} out {rel_l2(out, ro):.2e} state {rel_l2(ht, rs):.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prebuild", "check", "tiny"])
    ap.add_argument("--specs", default=",".join(ALL_SPECS))
    ap.add_argument("--lib", default=str(DEFAULT_LIB))
    ap.add_argument("--torch-dir", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--bench", action="store_true")
    args = ap.parse_args()
    {"prebuild": prebuild, "check": check, "tiny": tiny}[args.mode](args)


if __name__ == "__main__":
    main()
