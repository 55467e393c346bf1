"""Where the host time of one flash_kda.fwd call goes (issue target: Python + launch <= 20 us).

    python tools/host_time.py [T H]        default 512 64 (bf16, D = 128, gate + l2norm, no state)

On a GPU the device is kept busy (torch.cuda._sleep) so that launches only queue and the figures
are CPU time. Each row is a median over rounds of many calls:

    fwd                    the whole public call
    front end only         validation and argument packing, with the compiled op replaced by a no-op
    op, own workspace      the compiled op called directly (dispatcher, binding, allocation, launches)
    op, caller workspace   the same with a preallocated workspace (no allocation in the binding)
    torch baseline         one small in-place torch op on the same device (dispatcher + one launch)

On a CPU-only machine the same rows are printed for a tiny fp32 problem (there the op rows include
the CPU kernel's run time, so only the front-end row is comparable with a GPU's).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import flash_kda
from flash_kda import _ops

ROUNDS, CALLS = 7, 200


def per_call_us(fn, busy) -> float:
    samples = []
    for _ in range(ROUNDS):
        busy()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter() - t0) / CALLS * 1e6)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return statistics.median(samples)


def main() -> int:
    cuda = torch.cuda.is_available()
    T = int(sys.argv[1]) if len(sys.argv) > 1 else (512 if cuda else 16)
    H = int(sys.argv[2]) if len(sys.argv) > 2 else (64 if cuda else 2)
    device, dtype, D = ("cuda", torch.bfloat16, 128) if cuda else ("cpu", torch.float32, 64)
    gen = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    q, k, v, g = (r(1, T, H, D).to(dtype) for _ in range(4))
    beta = r(1, T, H).to(dtype)
    A_log, dt_bias = torch.rand(H, device=device, generator=gen) - 0.5, r(H, D) * 0.5
    out = torch.empty(1, T, H, D, device=device, dtype=dtype)
    ws_bytes = flash_kda.get_workspace_size(T, H, 1)
    workspace = torch.empty(max(ws_bytes, 16), device=device, dtype=torch.uint8)
    kernel = _ops.kernel_for(q.device, D, dtype)
    args = (q, k, v, g, beta, A_log, dt_bias, None, None, out, None, D ** -0.5, -5.0, True, False)
    small = torch.zeros(16, device=device)

    # ~5 ms of queued GPU work per round keeps every launch asynchronous.
    busy = (lambda: torch.cuda._sleep(int(1e7))) if cuda else (lambda: None)

    def fwd():
        flash_kda.fwd(q, k, v, g, beta, D ** -0.5, out, A_log, dt_bias, -5.0)

    real_call = _ops.call
    rows = []
    with torch.inference_mode():
        for _ in range(20):  # build or load, allocate, warm the caches
            fwd()
        rows.append(("fwd", per_call_us(fwd, busy)))
        _ops.call = lambda *a, **kw: None
        try:
            rows.append(("front end only", per_call_us(fwd, busy)))
        finally:
            _ops.call = real_call
        rows.append(("op, own workspace", per_call_us(lambda: kernel.op(*args, None), busy)))
        rows.append(("op, caller workspace", per_call_us(lambda: kernel.op(*args, workspace), busy)))
        rows.append(("torch baseline (small add_)", per_call_us(lambda: small.add_(1.0), busy)))
    print(f"{'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"T={T} H={H} D={D} {dtype}, workspace {ws_bytes / 2**20:.0f} MiB")
    print("\n| part | us per call |\n| --- | ---: |")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
