"""Per-kernel GPU time of flash_kda.fwd on bench shapes, from torch.profiler (which kernels a call
launches and how its time splits between them; tools/bench.py gives the whole-call figures).

    python tools/kernel_times.py [T:H ...]      e.g. 8192:96 32768:32 512:64

Inputs as in tools/bench.py (B=1, bf16, D = 128, gate parameters and l2norm on, no state).
"""

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import flash_kda

D = 128
REPS = 10


def shape_times(T: int, H: int) -> dict[str, float]:
    torch.manual_seed(0)
    dev = "cuda"
    q, k, v, g = (torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    beta = torch.randn(1, T, H, device=dev, dtype=torch.bfloat16)
    A_log = torch.randn(H, device=dev) * 0.5
    dt_bias = torch.randn(H, D, device=dev) * 0.1
    out = torch.empty_like(v)

    def call():
        flash_kda.fwd(q, k, v, g, beta, D ** -0.5, out, A_log, dt_bias, -5.0)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            call()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time / REPS / 1000.0  # us -> ms per call
    return per_kernel


def short(name: str) -> str:
    for key in ("kda_prep_kernel", "kda_recurrence_kernel", "kda_tc_kernel", "kda_portable_kernel"):
        if key in name:
            layout = name[name.find("Layout"):].split("EEEE")[0] if "Layout" in name else ""
            return f"{key} {layout}"
    return name[:60]


def main() -> int:
    shapes = [tuple(int(x) for x in a.split(":")) for a in sys.argv[1:]] or [(8192, 96), (32768, 32), (512, 64)]
    print("| shape | kernel | ms per call |\n| --- | --- | ---: |")
    for T, H in shapes:
        times = shape_times(T, H)
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"| T={T} H={H} | {short(name)} | {ms:.3f} |")
        print(f"| T={T} H={H} | all | {sum(times.values()):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
