"""``python -m flash_kda``: the first thing to run on a new machine.

Reports backend, device, compiler and cache; builds the default kernel if needed (that happens on
import); runs ``chunk_kda`` on a realistic shape; checks it against the float64 reference; prints
time and throughput. Exits non-zero if the result is wrong.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "musa":
        torch.musa.synchronize(device)


def _time_ms(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flash_kda", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="sequence length T (default: per backend)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    import flash_kda  # (already imported by `python -m`, which built or loaded the kernel)
    from flash_kda import jit
    from flash_kda.reference import kda_reference

    backend = jit.default_backend()
    spec = jit.default_spec(backend)
    kernel = jit.build_and_load(spec)
    plan = jit.build.resolve(spec)[0]
    if backend == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    elif backend == "musa":
        device = torch.device("musa", torch.musa.current_device())
        device_name = torch.musa.get_device_name(device)
    else:
        device = torch.device("cpu")
        device_name = f"CPU, {torch.get_num_threads()} threads"
    dtype = torch.bfloat16
    T = args.tokens or (8192 if backend != "cpu" else 2048)
    H = args.heads or (32 if backend != "cpu" else 8)
    D = args.head_dim

    print(f"flash_kda {flash_kda.__version__}  (torch {torch.__version__})")
    print(f"  backend   {backend} ({spec.name}); device {device_name}")
    print(f"  compiler  {plan.compiler_summary()}")
    print(f"  cache     {kernel.entry.dir}")  # where it was found or built (maybe a fallback)
    print(f"  kernel    {'built' if kernel.built else 'loaded from cache'} in {kernel.seconds:.2f} s; "
          f"called {'through its direct entry' if kernel.direct is not None else 'through its torch op'}")

    gen = torch.Generator().manual_seed(int(time.time()))
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v, g = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
    beta = rnd(1, T, H)
    A_log, dt_bias = torch.rand(H, generator=gen) * 2 - 1, rnd(H, D) * 0.5
    h0 = rnd(1, H, D, D) * 0.5
    inputs = [x.to(dtype).to(device) for x in (q, k, v, g, beta)]
    gate = [A_log.to(device), dt_bias.to(device)]
    state = h0.to(device)

    def run():
        return flash_kda.chunk_kda(*inputs, initial_state=state, output_final_state=True,
                                   A_log=gate[0], dt_bias=gate[1])

    out, final = run()
    ref_dev = device if backend != "cpu" else torch.device("cpu")
    ref_out, ref_final = kda_reference(*(x.to(ref_dev) for x in inputs), initial_state=state.to(ref_dev),
                                       A_log=gate[0].to(ref_dev), dt_bias=gate[1].to(ref_dev))
    err = lambda x, r: ((x.double() - r).norm() / r.norm()).item()  # noqa: E731
    e_out, e_state = err(out.to(ref_dev), ref_out), err(final.to(ref_dev), ref_final)
    ms = _time_ms(run, device, args.reps)
    nbytes = sum(x.numel() * x.element_size() for x in (*inputs, out, state, final))
    print(f"  problem   chunk_kda B=1 T={T} H={H} D={D} bf16, gate+l2norm, fp32 state in/out")
    print(f"  accuracy  rel-L2 vs float64 reference: out {e_out:.2e}, final_state {e_state:.2e}")
    print(f"  speed     {ms:.3f} ms median of {args.reps}; {T / ms / 1e3:.2f} M tokens/s; "
          f"{nbytes / ms / 1e6:.1f} GB/s effective")
    ok = e_out < 1e-2 and e_state < 1e-2
    print("  result    " + ("OK" if ok else "WRONG: error above 1e-2"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
