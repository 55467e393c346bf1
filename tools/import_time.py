#!/usr/bin/env python
"""Measure what a warm `import flash_kda` adds over `import torch` (fresh processes, medians).

    python tools/import_time.py [--reps 7]

Run it after one `python -m flash_kda` so the default kernel is cached; it fails if the import
compiles anything.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(code: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if res.returncode != 0 or "compiling" in res.stderr:
            sys.exit(f"`{code}` did not run from a warm cache:\n{res.stderr}")
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-c", "import flash_kda"], check=True)  # warm the OS file cache
    t_torch = median_seconds("import torch", args.reps)
    t_fk = median_seconds("import flash_kda", args.reps)
    print(f"import torch      {t_torch * 1e3:7.0f} ms (median of {args.reps} fresh processes)")
    print(f"import flash_kda  {t_fk * 1e3:7.0f} ms (includes torch and loading the cached kernel)")
    print(f"flash_kda adds    {(t_fk - t_torch) * 1e3:7.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
