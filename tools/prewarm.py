#!/usr/bin/env python
"""Build flash_kda kernels ahead of time (CI images, clusters, containers).

    python tools/prewarm.py                      # what this machine would build on import
    python tools/prewarm.py --head-dims 64,128,256 --dtypes bf16,fp16
    python tools/prewarm.py --backend cuda --arch 9.0a,8.0   # one module per arch
    python tools/prewarm.py --list               # what the cache holds
    python tools/prewarm.py --prune              # remove modules this installation won't load again
    python tools/prewarm.py --clear              # remove every module, unfinished build and log

Uses the same code path as a call (lock, cache, build worker), so a prewarmed cache is exactly
what `import flash_kda` will find. Exits non-zero if any build fails, or if --clear / --prune left
something it meant to remove (a key being built by a live process, a permission error).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLASH_KDA_BUILD_ON_IMPORT", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash_kda import jit  # noqa: E402
from flash_kda.jit import cache, cleanup  # noqa: E402
from flash_kda.jit.backends import get_toolchain  # noqa: E402

ARCH_ENV = {"cuda": "FLASH_KDA_CUDA_ARCH", "musa": "FLASH_KDA_MUSA_ARCH", "cpu": "FLASH_KDA_CPU_ARCH"}


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def show_cache() -> int:
    for root in cache.lookup_roots():
        show_root(root)
    return 0


def show_root(root: Path) -> None:
    rows = cache.list_entries(root)
    print(f"cache: {root}")
    if not rows:
        print("  (empty)")
        return
    print(f"  {'module':44s} {'built':19s} {'build s':>8s} {'MB':>6s}  path")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("created", 0)))
        name = r.get("op_name", "?").rsplit("_", 1)[0]
        print(f"  {name:44s} {created:19s} {r.get('build_seconds', 0):8.1f} {r['size_mb']:6.1f}  {r['path']}")


def human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def clean_cache(prune: bool) -> int:
    """--prune / --clear on every root flash_kda loads from (the fallback too, if it exists)."""
    left = 0
    for root in cache.lookup_roots():
        report = cleanup.prune(root) if prune else cleanup.clear(root)
        print_report(report)
        left += len(report.skipped)
    return 1 if left else 0


def print_report(report: cleanup.Report) -> None:
    print(f"cache: {report.root}")
    for item in report.removed:
        print(f"  removed {human(item.bytes):>9s}  {item.path}  ({item.why})")
    for item in report.kept:
        print(f"  kept    {human(item.bytes):>9s}  {item.path}  ({item.why})")
    for item in report.skipped:
        print(f"  SKIPPED {'':9s}  {item.path}  ({item.why})")
    if not (report.removed or report.kept or report.skipped):
        print("  (nothing to remove)")
    print(f"  freed {human(report.freed)} ({report.freed} bytes): {len(report.removed)} removed, "
          f"{len(report.kept)} kept, {len(report.skipped)} skipped")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["cpu", "cuda", "musa"], default=None,
                    help="default: the backend this machine uses")
    ap.add_argument("--arch", default=None,
                    help="comma-separated archs (cuda '9.0a,8.0'; musa 'mp_31'; cpu an -march); "
                         "default: the present device's")
    ap.add_argument("--head-dims", default="128", help="comma-separated, of 64,128,256 (default 128)")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated, of bf16,fp16,fp32 (default bf16)")
    ap.add_argument("--kernel", choices=["fast", "portable"], default=None,
                    help="GPU kernel variant (default: FLASH_KDA_KERNEL or fast)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="show what the cache holds and exit")
    what.add_argument("--prune", action="store_true",
                      help="remove modules whose key differs from the one this installation "
                           "computes (old sources, compiler, torch, flags), with their logs and "
                           "unfinished builds; keep the current ones; then exit")
    what.add_argument("--clear", action="store_true",
                      help="remove every module, unfinished build and build log, then exit; keys "
                           "that a live process is building are skipped and reported")
    args = ap.parse_args(argv)
    if args.list:
        return show_cache()
    if args.prune or args.clear:
        return clean_cache(prune=args.prune)

    backend = args.backend or jit.default_backend()
    if args.kernel:
        os.environ["FLASH_KDA_KERNEL"] = args.kernel
    toolchain = get_toolchain(backend)
    archs = csv(args.arch) if args.arch else [None]
    specs = []
    try:
        for arch in archs:
            if arch is not None:
                os.environ[ARCH_ENV[backend]] = arch
            tag = toolchain.arch_tag()
            for d in csv(args.head_dims):
                for dt in csv(args.dtypes):
                    variant = "fast" if backend == "cpu" else jit.env.kernel_variant()
                    specs.append(jit.KernelSpec(backend, tag, int(d), dt, variant))
    except (ValueError, jit.UnsupportedToolchainError, jit.CompilerNotFoundError) as e:
        print(f"prewarm: {e}", file=sys.stderr)
        return 2

    print(f"prewarm: {len(specs)} module(s) for {backend} into {jit.env.cache_root()}")
    results = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.name} ...", flush=True)
        if spec.arch != toolchain.arch_tag():
            os.environ[ARCH_ENV[backend]] = spec.arch
        t0 = time.perf_counter()
        try:
            k = jit.build_and_load(spec)
            results.append((spec, "built" if k.built else "cached", time.perf_counter() - t0, ""))
        except Exception as e:  # report every failure, keep going, exit non-zero at the end
            results.append((spec, "FAILED", time.perf_counter() - t0, str(e).splitlines()[0]))
    print(f"\n  {'module':44s} {'status':7s} {'seconds':>8s}")
    for spec, status, secs, err in results:
        print(f"  {spec.name:44s} {status:7s} {secs:8.1f}  {err}")
    failed = sum(r[1] == "FAILED" for r in results)
    print(f"\n{len(results) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
