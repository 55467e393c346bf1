"""Per-kernel GPU time of flash_kda.fwd on bench shapes, from torch.profiler (which kernels a call
launches and how its time splits between them; tools/bench.py gives the whole-call figures).

    python tools/kernel_times.py [T:H ...]      e.g. 8192:96 32768:32 512:64

Inputs and call are tools/bench.py's (B=1, bf16, D = 128, gate parameters and l2norm on, no state).
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_inputs, run_ours  # noqa: E402  (the benchmark's inputs and call)

REPS = 10


def shape_times(T: int, H: int) -> dict[str, float]:
    x = make_inputs(None, T, H, states=False, gen=torch.Generator("cuda").manual_seed(0))

    def call():
        run_ours(x)

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
