"""Per-kernel GPU time of flash_kda.fwd on bench shapes, from torch.profiler (which kernels a call
launches and how its time splits between them; tools/bench.py gives the whole-call figures).

    python tools/kernel_times.py [--states] [SHAPE:H ...]   e.g. 8192:96 32768:32 512:64 1300,547,2048:96

SHAPE is T (dense, B=1) or comma-separated sequence lengths (varlen: two or more, or one with a
trailing comma, e.g. 32768,). Inputs and call are tools/bench.py's (bf16, D = 128, gate parameters
and l2norm on; no state, or with --states fp32 initial and final states, so that the states' cost
shows per kernel). The kernels of one call run on two streams when it is cut into pieces
(FLASH_KDA_CUDA_PIECES, the split_plan rule): their times then overlap, and "all" is their sum,
not the call's time.
"""

import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # before flash_kda builds on import
    print(__doc__)
    sys.exit(0)

from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_inputs, run_ours  # noqa: E402  (the benchmark's inputs and call)

REPS = 10


def shape_times(seqlens: list[int] | None, T: int, H: int, states: bool = False) -> dict[str, float]:
    x = make_inputs(seqlens, T, H, states=states, gen=torch.Generator("cuda").manual_seed(0))

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


def parse_shape(arg: str) -> tuple[list[int] | None, int, int, str]:
    """SHAPE:H -> (seqlens or None, T, H, label)."""
    try:
        shape, heads = arg.rsplit(":", 1)
        H = int(heads)
        if "," in shape:
            seqlens = [int(x) for x in shape.split(",") if x]
            return seqlens, sum(seqlens), H, f"varlen {shape.rstrip(',')} H={H}"
        return None, int(shape), H, f"T={shape} H={H}"
    except ValueError:
        sys.exit(f"kernel_times.py: {arg!r} is not SHAPE:H (e.g. 8192:96 or 1300,547:96)")


def main() -> int:
    args = sys.argv[1:]
    states = "--states" in args
    args = [a for a in args if a != "--states"]
    shapes = [parse_shape(a) for a in args or ("8192:96", "32768:32", "512:64")]
    if not torch.cuda.is_available():
        sys.exit("kernel_times.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
    print("| shape | kernel | ms per call |\n| --- | --- | ---: |")
    for seqlens, T, H, label in shapes:
        label += " fp32 states" if states else ""
        times = shape_times(seqlens, T, H, states)
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {short(name)} | {ms:.3f} |")
        print(f"| {label} | all | {sum(times.values()):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
