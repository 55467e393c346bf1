#!/usr/bin/env python
"""GPU benchmark: flash_kda.fwd vs fla's Triton chunk_kda, side by side, in one run.

    python tools/bench.py [--reps 30] [--shapes all|quick] [--only T=32768,H=96] [--no-states] [--no-fla]
                          [--shape T:H ...]

bf16, K = V = 128, gate parameters and l2norm on, each shape without states and with fp32
initial + final state. Times are CUDA-event medians over rotating input sets (so L2 does not
flatter small shapes), after warm-up. The floor is the bytes each call must move (inputs read once,
outputs written once) divided by the copy bandwidth measured here.
fla is fla-core (FLA_FLASH_KDA=0 so that it runs its own Triton kernels, not ours).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flash_kda  # noqa: E402

SHAPES = [  # (label, seqlens or None, T, H)
    ("T=8192 H=96", None, 8192, 96),
    ("T=8192 H=64", None, 8192, 64),
    ("varlen 6 seqs H=96", [1300, 547, 2048, 963, 271, 3063], None, 96),
    ("varlen 8x1024 H=96", [1024] * 8, None, 96),
    ("T=32768 H=32", None, 32768, 32),
    ("T=512 H=64", None, 512, 64),
]
D = 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 1 << 28  # 512 MiB of bf16... in elements of 2 bytes
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ms = time_events(lambda: b.copy_(a), 20)
    return 2 * a.numel() * 2 / (ms * 1e-3)


def time_events(fn, reps: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def make_inputs(seqlens, T, H, states: bool, gen):
    S = sum(seqlens) if seqlens else T
    N = len(seqlens) if seqlens else 1
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x = dict(
        q=r(1, S, H, D).bfloat16(), k=r(1, S, H, D).bfloat16(), v=r(1, S, H, D).bfloat16(),
        g=r(1, S, H, D).bfloat16(), beta=r(1, S, H).bfloat16(),
        A_log=torch.rand(H, device="cuda", generator=gen) * 2 - 1, dt_bias=r(H, D) * 0.5,
        out=torch.empty(1, S, H, D, device="cuda", dtype=torch.bfloat16),
        cu=None if not seqlens else torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()],
                                                 device="cuda", dtype=torch.int64),
        h0=r(N, H, D, D) * 0.5 if states else None,
        ht=torch.empty(N, H, D, D, device="cuda") if states else None,
    )
    return x


def bytes_moved(x) -> int:
    n = sum(x[k].numel() * x[k].element_size() for k in ("q", "k", "v", "g", "beta", "out"))
    if x["h0"] is not None:
        n += x["h0"].numel() * 4 + x["ht"].numel() * 4
    return n


def run_ours(x):
    flash_kda.fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], D ** -0.5, x["out"], x["A_log"],
                  x["dt_bias"], -5.0, initial_state=x["h0"], final_state=x["ht"], cu_seqlens=x["cu"])


def run_fla(fla_chunk, x):
    return fla_chunk(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=D ** -0.5,
                     initial_state=x["h0"], output_final_state=x["h0"] is not None,
                     use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                     use_beta_sigmoid_in_kernel=True, safe_gate=True, lower_bound=-5.0,
                     state_v_first=True, cu_seqlens=x["cu"], A_log=x["A_log"],
                     dt_bias=x["dt_bias"].view(-1))


def host_overhead_us(x, reps=200, warmup=20) -> tuple[float, float]:
    """Host time per call (Python + launch) in us, (mean, median) of `reps` calls timed one by one
    with the GPU busy, so that launches only queue. After `warmup` calls, so that what is timed is
    the steady state, not a first call's allocations (until session 22 the mean included them:
    18.8-31.3 us in runs minutes apart, docs/performance.md v22)."""
    for _ in range(warmup):
        run_ours(x)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))  # keep the GPU busy: measure only the CPU side
    clock, times = time.perf_counter_ns, []
    for _ in range(reps):
        t0 = clock()
        run_ours(x)
        times.append(clock() - t0)
    torch.cuda.synchronize()
    return statistics.fmean(times) / 1e3, statistics.median(times) / 1e3


class Stopped(Exception):
    """SIGTERM (e.g. `timeout`) during the timing loop: print the rows timed so far."""


def dense_shape(arg: str):
    """T:H -> a SHAPES entry for one dense sequence of T tokens and H heads."""
    try:
        T, H = (int(x) for x in arg.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{arg!r} is not T:H (two integers)") from None
    if T < 1 or H < 1:
        raise argparse.ArgumentTypeError(f"{arg!r}: T and H must be positive")
    return (f"T={T} H={H}", None, T, H)


def _stop(signum, frame):
    raise Stopped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", choices=["all", "quick"], default="all")
    ap.add_argument("--only", default="",
                    help="comma-separated parts of shape labels: time only shapes whose label contains one")
    ap.add_argument("--no-states", action="store_true", help="skip the fp32-state rows")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--shape", action="append", type=dense_shape, default=[], metavar="T:H",
                    help="a dense shape (B = 1) to time instead of the issue's shapes (repeat)")
    args = ap.parse_args()
    os.environ["FLA_FLASH_KDA"] = "0"
    fla_chunk = None
    if not args.no_fla:
        try:
            from fla.ops.kda import chunk_kda as fla_chunk
        except Exception as e:  # fla missing or broken: still time ours
            print(f"fla unavailable ({type(e).__name__}: {e}); timing flash_kda only")
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"torch {torch.__version__}, flash_kda kernel {os.environ.get('FLASH_KDA_KERNEL', 'fast')}, "
          f"pieces {os.environ.get('FLASH_KDA_CUDA_PIECES') or 'auto (split_plan)'}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = args.shape or (SHAPES if args.shapes == "all" else SHAPES[:1] + SHAPES[-1:])
    if args.only:
        parts = [x.strip() for x in args.only.split(",") if x.strip()]
        shapes = [s for s in shapes if any(x in s[0] for x in parts)]
    rows, host = [], None
    signal.signal(signal.SIGTERM, _stop)
    try:
        _time_shapes(shapes, args, fla_chunk, bw, gen, rows)
        with torch.inference_mode():
            host = host_overhead_us(make_inputs(None, 512, 64, False, gen))
    except Stopped:
        print(f"\nstopped by SIGTERM after {len(rows)} rows; the table holds those")
    print_table(rows)
    if host is not None:
        print(f"\nhost time per fwd call (Python + launch, GPU busy, T=512 H=64): mean {host[0]:.1f} us, "
              f"median {host[1]:.1f} us")
    return 0


def _time_shapes(shapes, args, fla_chunk, bw, gen, rows) -> None:
    """Times each shape (and its fp32-state form) and appends a row per timing to `rows`."""
    with torch.inference_mode():
        for label, seqlens, T, H in shapes:
            for states in (False,) if args.no_states else (False, True):
                probe = make_inputs(seqlens, T, H, states, gen)
                nbytes = bytes_moved(probe)
                nsets = max(2, min(8, int(200e6 // nbytes) + 1))  # > L2 (50 MB) in total
                sets = [probe] + [make_inputs(seqlens, T, H, states, gen) for _ in range(nsets - 1)]
                it = iter(range(1 << 30))
                for _ in range(3):
                    run_ours(sets[0])
                ours = time_events(lambda: run_ours(sets[next(it) % nsets]), args.reps)
                theirs = float("nan")
                if fla_chunk is not None:
                    for _ in range(3):
                        run_fla(fla_chunk, sets[0])
                    theirs = time_events(lambda: run_fla(fla_chunk, sets[next(it) % nsets]), args.reps)
                floor = nbytes / bw * 1e3
                rows.append((label, "fp32 in+out" if states else "none", ours, theirs, nbytes, floor))
                print(f"  {label:22s} states={rows[-1][1]:11s} ours {ours:8.3f} ms  fla {theirs:8.3f} ms",
                      flush=True)
                del sets, probe


def print_table(rows) -> None:
    print("\n| shape | states | flash_kda ms | fla ms | fla / ours | flash_kda GB/s | floor ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, st, ours, theirs, nbytes, floor in rows:
        fla_ms, ratio = (f"{theirs:.3f}", f"{theirs / ours:.2f}") if theirs == theirs else ("-", "-")
        print(f"| {label} | {st} | {ours:.3f} | {fla_ms} | {ratio} | "
              f"{nbytes / ours / 1e6:.0f} | {floor:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
