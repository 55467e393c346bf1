"""Per-kernel A/B of kernel source trees: interleaved rounds in one run, one table.

    python tools/ab_kernels.py --side main= --side fold=.ab/o34/flash_kda/csrc \\
        [--rounds 3] [--kernel kda_prep_kernel ...] [--pieces 1] [--timeout 120] [SHAPE:H ...]

Each --side is NAME=DIR: DIR is a copy of flash_kda/csrc (FLASH_KDA_CSRC_DIR), or empty for the
package's own sources. Every round runs tools/kernel_times.py once per side, in a fresh process
(each side builds and caches its own module on its first run), with the sides in turn, so that a
drift of the GPU's clocks over the run falls on every side alike. SHAPE:H as in kernel_times.py
(e.g. 8192:96, 1300,547,2048:96; none: its default shapes). --kernel (repeatable; default kda_prep_kernel and
kda_recurrence_kernel) names part of the kernels to time. A table per --kernel gives, per shape and
side, the mean over the rounds of the matching kernels' time per call (their sum, where several
names match), the rounds' spread (max - min) and the change against the first side. A side's
change is only worth reading where it is larger than the spreads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

KERNEL_TIMES = Path(__file__).resolve().parent / "kernel_times.py"


def parse_rows(text: str, kernel: str) -> dict[str, float]:
    """kernel_times.py's table -> {shape label: summed ms of the kernels whose name holds `kernel`}."""
    times: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[1] == "all" or kernel not in cells[1]:
            continue
        try:
            times[cells[0]] += float(cells[2])
        except ValueError:
            continue  # not a figure
    return dict(times)


def run_side(csrc: str, shapes: list[str], env_extra: dict[str, str], timeout: float) -> str:
    """One kernel_times.py run with the side's sources; its stdout. Raises RuntimeError on failure."""
    env = dict(os.environ, **env_extra)
    if csrc:
        env["FLASH_KDA_CSRC_DIR"] = str(Path(csrc).resolve())
    else:
        env.pop("FLASH_KDA_CSRC_DIR", None)
    try:
        done = subprocess.run([sys.executable, str(KERNEL_TIMES), *shapes], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"kernel_times.py ran past {timeout:.0f} s") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-12:])
        raise RuntimeError(f"kernel_times.py exited {done.returncode}:\n{tail}")
    return done.stdout


def summarise(samples: dict[str, dict[str, list[float]]], sides: list[str]) -> list[tuple]:
    """{side: {shape: [ms per round]}} -> rows (shape, side, mean, spread, change against sides[0])."""
    rows = []
    shapes = list(dict.fromkeys(s for side in sides for s in samples[side]))
    for shape in shapes:
        base = samples[sides[0]].get(shape)
        base_mean = sum(base) / len(base) if base else None
        for side in sides:
            ms = samples[side].get(shape)
            if not ms:
                rows.append((shape, side, None, None, None))
                continue
            mean = sum(ms) / len(ms)
            change = None if base_mean is None or side == sides[0] else mean / base_mean - 1.0
            rows.append((shape, side, mean, max(ms) - min(ms), change))
    return rows


def format_table(rows: list[tuple], rounds: int) -> str:
    out = [f"| shape | side | ms, mean of {rounds} | spread | change |", "| --- | --- | ---: | ---: | ---: |"]
    for shape, side, mean, spread, change in rows:
        if mean is None:
            out.append(f"| {shape} | {side} | (no matching kernel) | | |")
            continue
        ch = "" if change is None else f"{100 * change:+.1f} %"
        out.append(f"| {shape} | {side} | {mean:.3f} | {spread:.3f} | {ch} |")
    return "\n".join(out)


def parse_side(arg: str) -> tuple[str, str]:
    name, sep, path = arg.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{arg!r} is not NAME=DIR (DIR empty for the package's sources)")
    if path and not (Path(path) / "cuda").is_dir():
        raise argparse.ArgumentTypeError(f"{path!r} holds no cuda/ folder: not a copy of flash_kda/csrc")
    return name, path


def main(argv: list[str] | None = None, runner=run_side) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", action="append", type=parse_side, required=True, help="NAME=DIR (repeat)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernel", action="append", help="part of the kernel names to time (repeat)")
    ap.add_argument("--pieces", default=None, help="FLASH_KDA_CUDA_PIECES for every run")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per kernel_times.py run")
    ap.add_argument("shapes", nargs="*", metavar="SHAPE:H", help="default: kernel_times.py's shapes")
    a = ap.parse_args(argv)
    kernels = a.kernel or ["kda_prep_kernel", "kda_recurrence_kernel"]
    names = [n for n, _ in a.side]
    if len(set(names)) != len(names):
        ap.error(f"side names repeat: {names}")
    if a.rounds < 1:
        ap.error("--rounds must be 1 or more")
    env_extra = {} if a.pieces is None else {"FLASH_KDA_CUDA_PIECES": str(a.pieces)}
    # samples[kernel][side][shape]: ms per round
    samples = {k: {n: defaultdict(list) for n in names} for k in kernels}
    for r in range(a.rounds):
        for name, csrc in a.side:
            try:
                text = runner(csrc, a.shapes, env_extra, a.timeout)
            except RuntimeError as e:
                print(f"ab_kernels.py: side {name}, round {r + 1}: {e}", file=sys.stderr)
                return 1
            for k in kernels:
                found = parse_rows(text, k)
                for shape, ms in found.items():
                    samples[k][name][shape].append(ms)
                print(f"round {r + 1} {name} {k}: " + ", ".join(f"{s} {ms:.3f}" for s, ms in found.items()), flush=True)
    for k in kernels:
        print(f"\n{k}:")
        print(format_table(summarise(samples[k], names), a.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
