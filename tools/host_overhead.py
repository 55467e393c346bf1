#!/usr/bin/env python
"""Host (CPU-side) time per call of flash_kda.fwd / chunk_kda: Python front end + launch.

    python tools/host_overhead.py [--device cpu|cuda] [--reps 1000] [--T 16 --H 2 --D 64]

Tiny shapes, so that what is timed is the call, not the work. Each call is timed on its own
(time.perf_counter_ns); printed is the median, in microseconds (the lowest of 5 rounds' medians).

- CUDA: the GPU is kept busy (torch.cuda._sleep) while the calls are timed, so launches only
  queue and the figure is pure host time (as `tools/bench.py` reports it).
- CPU: the kernel runs inside the call, so the full call includes the tiny kernel's work.

Either way each case is also timed with the compiled op replaced by a no-op ("python"): that is
the front end alone (validation, routing, allocation of missing outputs), which is what this
package adds on top of the raw op. The raw op is timed alone first, through torch.ops and through
the library's direct entry (csrc/python_entry.cpp, which the front end uses): with no sequences
(argument handling and checks alone: nothing launches), with the launch, and where the CUDA
two-kernel form runs with a caller-provided workspace (so that the binding's allocation shows).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flash_kda  # noqa: E402
from flash_kda import _ops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(device, dtype, T, H, D, gen):
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    x = dict(q=r(1, T, H, D).to(dtype), k=r(1, T, H, D).to(dtype), v=r(1, T, H, D).to(dtype),
             g=r(1, T, H, D).to(dtype), beta=r(1, T, H).to(dtype),
             A_log=r(H), dt_bias=r(H, D), out=torch.empty(1, T, H, D, dtype=dtype, device=device),
             h0=r(1, H, D, D), ht=torch.empty(1, H, D, D, device=device), h0_2=r(2, H, D, D))
    # varlen: the same [1, S, H, D] tokens as two sequences, cu_seqlens on the device
    x["cu"] = torch.tensor([0, T // 2, T], dtype=torch.int32, device=device)
    return x


def cases(x, D):
    s = D ** -0.5
    return {
        "fwd dense": lambda: flash_kda.fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], s, x["out"],
                                           x["A_log"], x["dt_bias"], -5.0),
        "fwd dense, fp32 states in+out": lambda: flash_kda.fwd(
            x["q"], x["k"], x["v"], x["g"], x["beta"], s, x["out"], x["A_log"], x["dt_bias"], -5.0,
            initial_state=x["h0"], final_state=x["ht"]),
        "fwd dense, state in place": lambda: flash_kda.fwd(
            x["q"], x["k"], x["v"], x["g"], x["beta"], s, x["out"], x["A_log"], x["dt_bias"], -5.0,
            initial_state=x["ht"], final_state=x["ht"]),
        "fwd varlen [1,S,H,D], h0, cu_seqlens on device": lambda: flash_kda.fwd(
            x["q"], x["k"], x["v"], x["g"], x["beta"], s, x["out"], x["A_log"], x["dt_bias"], -5.0,
            initial_state=x["h0_2"], final_state=None, cu_seqlens=x["cu"]),
        "chunk_kda dense, allocates out + final_state": lambda: flash_kda.chunk_kda(
            x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
            output_final_state=True, A_log=x["A_log"], dt_bias=x["dt_bias"]),
        "chunk_kda dense, given output": lambda: flash_kda.chunk_kda(
            x["q"], x["k"], x["v"], x["g"], x["beta"], output=x["out"]),
    }


def raw_op(x, D, workspace=None, entry="op", cu_seqlens=None):
    """The compiled op alone, with the arguments `fwd dense` hands it (and `workspace`: None lets
    the binding allocate the CUDA two-kernel form's scratch itself), through torch.ops (entry
    "op") or the library's direct entry ("direct": csrc/python_entry.cpp, no dispatcher).
    cu_seqlens: a varlen call instead (tensor([0]): no sequences, so only the arguments are
    handled and checked; nothing is launched)."""
    kernel = _ops.kernel_for(x["q"].device, D, x["q"].dtype)
    fn = kernel.op if entry == "op" else kernel.direct
    s = D ** -0.5
    return lambda: fn(x["q"], x["k"], x["v"], x["g"], x["beta"], x["A_log"], x["dt_bias"], None,
                      None, x["out"], cu_seqlens, s, -5.0, True, False, workspace)


def _no_op(*args):
    return None


def _ran(*args):
    return True


@contextlib.contextmanager
def kernel_stubbed(kernel):
    """Within: the memoised `kernel` runs nothing (its op and its direct entry), so a call costs
    only the front end (its lookup of the kernel included)."""
    real_op, real_direct = kernel.op, kernel.direct
    kernel.op = _no_op
    if real_direct is not None:
        kernel.direct = _ran
    try:
        yield
    finally:
        kernel.op, kernel.direct = real_op, real_direct


def median_us(fn, reps: int, cuda: bool, rounds: int = 5, block: int = 100) -> float:
    """Median time of one call over `reps` calls, in us; the lowest of `rounds` such medians, so
    that a burst of load from another process on a shared machine does not decide the figure."""
    for _ in range(200):  # warm-up: kernel lookup, allocator, caches
        fn()
    if cuda:
        torch.cuda.synchronize()
    clock = time.perf_counter_ns
    medians = []
    for _ in range(rounds):
        times = []
        while len(times) < reps:
            if cuda:  # queue work so that our launches never wait for the GPU
                torch.cuda._sleep(int(5e7))
            for _ in range(block):
                t0 = clock()
                fn()
                times.append(clock() - t0)
            if cuda:
                torch.cuda.synchronize()
        medians.append(statistics.median(times))
    return min(medians) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1000, help="calls per round (5 rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU kernel)")
    ap.add_argument("--grad-mode", action="store_true", help="time outside torch.inference_mode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    x = make_inputs(device, DTYPES[args.dtype], args.T, args.H, args.D,
                    torch.Generator().manual_seed(0))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"B=1 T={args.T} H={args.H} D={args.D} {args.dtype}, median of {args.reps} calls "
          f"(best of 5 rounds), {'grad mode' if args.grad_mode else 'inference_mode'}")
    mode = torch.enable_grad() if args.grad_mode else torch.inference_mode()
    with mode:
        kernel = _ops.kernel_for(device, args.D, DTYPES[args.dtype])  # memoised: calls find it
        none = torch.tensor([0], dtype=torch.int32, device=device)  # a batch of no sequences
        entries = ["op"] + (["direct"] if kernel.direct is not None else [])
        ws_bytes = flash_kda.get_workspace_size(args.T, args.H, 1)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=device) if ws_bytes else None
        for entry in entries:
            name, via = (("raw op", "torch.ops: dispatcher") if entry == "op"
                         else ("direct entry", "no dispatcher"))
            label = f"{name} ({via}"
            t = median_us(raw_op(x, args.D, entry=entry, cu_seqlens=none), args.reps, cuda)
            print(f"  {label + ', no sequences)':46s} {t:7.1f} us")
            t = median_us(raw_op(x, args.D, entry=entry), args.reps, cuda)
            print(f"  {label + ' + launch/kernel)':46s} {t:7.1f} us")
            if ws is not None:  # the two-kernel form: the scratch preallocated by the caller
                t = median_us(raw_op(x, args.D, ws, entry=entry), args.reps, cuda)
                print(f"  {name + ', caller workspace (no allocation)':46s} {t:7.1f} us")
        print(f"  {'':46s} {'call':>10s} {'python':>10s}")
        for name, fn in cases(x, args.D).items():
            t = median_us(fn, args.reps, cuda)
            with kernel_stubbed(kernel):
                py = median_us(fn, args.reps, cuda)
            print(f"  {name:46s} {t:7.1f} us {py:7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
