"""Build worker: ``python -m flash_kda.jit._worker <request.json>``.

Runs one ``load`` call (torch's ``cpp_extension.load`` or torch_musa's twin) in a child process, so
that the parent can capture the whole compiler output into the log, stream it when asked, and
survive (or be killed during) a build without leaving anything half-done in its own process.
"""

from __future__ import annotations

import json
import os
import sys


def load_function(loader: str):
    if loader == "torch":
        from torch.utils.cpp_extension import load
        return load, "extra_cuda_cflags"
    if loader == "torch_musa":
        # torch_musa's build puts `-ccbin $CC` in front of every mcc command when CC is set, and
        # mcc (clang-based) is not known to accept -ccbin; the host compiler it uses is $CXX.
        if os.environ.pop("CC", None) is not None:
            print("flash_kda build worker: CC unset for the MUSA build (torch_musa would pass it "
                  "to mcc as -ccbin); the host compiler is $CXX or c++", flush=True)
        import torch_musa  # noqa: F401  (registers the musa device with torch)
        from torch_musa.utils.musa_extension import load
        return load, "extra_musa_cflags"
    raise ValueError(f"unknown loader {loader!r}")


def main(request_path: str) -> int:
    with open(request_path) as f:
        req = json.load(f)
    plan = req["plan"]
    load, device_flags_kw = load_function(plan["loader"])
    kwargs = dict(
        name=req["name"],
        sources=plan["sources"],
        extra_cflags=plan["extra_cflags"],
        extra_ldflags=plan["extra_ldflags"],
        extra_include_paths=plan["extra_include_paths"],
        build_directory=req["build_directory"],
        verbose=True,
        is_python_module=False,
    )
    if plan["extra_device_cflags"]:
        kwargs[device_flags_kw] = plan["extra_device_cflags"]
    print(f"flash_kda build worker: {plan['loader']} load(name={req['name']!r})", flush=True)
    print(f"compiler: {plan['compiler']}", flush=True)
    load(**kwargs)  # also loads the library once, proving that it links and registers its op
    print("flash_kda build worker: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
