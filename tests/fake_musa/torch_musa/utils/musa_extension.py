"""Fake torch_musa.utils.musa_extension: a ``load`` that records and simulates a MUSA JIT build.

Behaviour modelled on what torch_musa 2.7's JIT ``load`` is documented to do (facts only, written
from scratch for these tests):

* ``load`` exists only from torch_musa 2.7.0; older versions have ``load_inline`` only.
* ``.mu``/``.muh`` sources go to mcc as ``$mcc -MD -MF <obj>.d <musa flags> -c <src> -o <obj>``
  with object ``<stem>.musa.o``; other sources go to the host compiler (``$CXX`` or ``c++``).
* mcc is ``$PYTORCH_MCC`` if set, else ``$MUSA_HOME/bin/mcc``; MUSA_HOME comes from MUSA_HOME /
  MUSA_PATH, the directory above the mcc on PATH, or /usr/local/musa.
* musa flags = extension-name defines, ``-I`` user includes, ``-isystem`` system includes, ``-fPIC``,
  the caller's ``extra_musa_cflags``, and ``-std=c++17`` unless a ``-std=`` is already there;
  ``-ccbin $CC`` is put in front when CC is set. No arch flag is added.

Simulation: every mcc command is really run (the fake mcc, which preprocesses the translation
unit); the host compile and the link are only recorded; the "library" written at the end is a
placeholder, which the caller cannot load. With ``is_python_module=False`` the real ``load`` would
load it; this fake returns its path instead, so the simulation ends where a real library is needed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sysconfig

import torch_musa

MUSA_EXTENSIONS = (".mu", ".muh")


def _version(text):
    parts = []
    for p in str(text).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _find_musa_home():
    home = os.environ.get("MUSA_HOME") or os.environ.get("MUSA_PATH")
    if home:
        return home
    mcc = shutil.which("mcc")
    if mcc:
        return os.path.dirname(os.path.dirname(mcc))
    return "/usr/local/musa" if os.path.exists("/usr/local/musa") else None


def _is_musa_file(path):
    return os.path.splitext(path)[1] in MUSA_EXTENSIONS


def _record(entry):
    path = os.environ.get("FAKE_MUSA_LOAD_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _commands(name, sources, extra_cflags, extra_musa_cflags, extra_ldflags, extra_include_paths,
              build_directory, with_musa):
    musa_home = _find_musa_home()
    if musa_home is None:
        raise OSError("fake torch_musa: MUSA_HOME is not set and no MUSA SDK was found")
    system_includes = [os.path.join(musa_home, "include"), sysconfig.get_path("include")]
    common = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    common += [f"-I{os.path.abspath(p)}" for p in extra_include_paths]
    for inc in system_includes:
        common += ["-isystem", inc]
    cxx = os.environ.get("CXX", "c++")
    host_flags = common + ["-fPIC", "-std=c++17"] + list(extra_cflags)
    mcc = shlex.split(os.environ["PYTORCH_MCC"]) if os.environ.get("PYTORCH_MCC") else \
        [os.path.join(musa_home, "bin", "mcc")]
    musa_flags = common + ["-fPIC"] + list(extra_musa_cflags)
    if not any(f.startswith("-std=") for f in musa_flags):
        musa_flags.append("-std=c++17")
    if os.environ.get("CC"):
        musa_flags = ["-ccbin", os.environ["CC"]] + musa_flags

    steps = []
    objects = []
    for src in sources:
        src = os.path.abspath(src)
        stem = os.path.splitext(os.path.basename(src))[0]
        if with_musa and _is_musa_file(src):
            obj = os.path.join(build_directory, f"{stem}.musa.o")
            argv = [*mcc, "-MD", "-MF", f"{obj}.d", *musa_flags, "-c", src, "-o", obj]
            steps.append({"kind": "mcc", "object": os.path.basename(obj), "argv": argv, "run": True})
        else:
            obj = os.path.join(build_directory, f"{stem}.o")
            argv = [cxx, "-MMD", "-MF", f"{obj}.d", *host_flags, "-c", src, "-o", obj]
            steps.append({"kind": "cxx", "object": os.path.basename(obj), "argv": argv, "run": False})
        objects.append(obj)
    library = os.path.join(build_directory, f"{name}.so")
    steps.append({"kind": "link", "object": os.path.basename(library),
                  "argv": [cxx, *objects, "-shared", *extra_ldflags, "-o", library], "run": False})
    return musa_home, steps, library


def _load(name, sources, extra_cflags=None, extra_musa_cflags=None, extra_sycl_cflags=None,
          extra_ldflags=None, extra_include_paths=None, build_directory=None, verbose=False,
          with_musa=None, with_sycl=None, is_python_module=True, is_standalone=False,
          keep_intermediates=True):
    sources = [sources] if isinstance(sources, str) else list(sources)
    kwargs = dict(name=name, sources=sources, extra_cflags=extra_cflags,
                  extra_musa_cflags=extra_musa_cflags, extra_ldflags=extra_ldflags,
                  extra_include_paths=extra_include_paths, build_directory=build_directory,
                  verbose=verbose, with_musa=with_musa, is_python_module=is_python_module)
    if build_directory is None:
        raise ValueError("fake torch_musa: flash_kda always passes build_directory")
    if with_musa is None:
        with_musa = any(_is_musa_file(s) for s in sources)
    musa_home, steps, library = _commands(name, sources, extra_cflags or [], extra_musa_cflags or [],
                                          extra_ldflags or [], extra_include_paths or [],
                                          build_directory, with_musa)
    _record({"torch_musa": torch_musa.__version__, "kwargs": kwargs, "musa_home": musa_home,
             "steps": steps})
    os.makedirs(build_directory, exist_ok=True)
    with open(os.path.join(build_directory, "build.ninja"), "w") as f:
        f.write("# fake torch_musa build (simulated; only the mcc steps were run)\n")
        for step in steps:
            f.write(f"build {step['object']}: {step['kind']}\n  command = {shlex.join(step['argv'])}\n")
    n = len(steps)
    for i, step in enumerate(steps, 1):
        tag = "" if step["run"] else "  (simulated, not run)"
        print(f"[{i}/{n}] {shlex.join(step['argv'])}{tag}", flush=True)
        if not step["run"]:
            continue
        res = subprocess.run(step["argv"], capture_output=True, text=True, cwd=build_directory)
        output = (res.stdout + res.stderr).rstrip()
        if res.returncode != 0:  # as ninja reports it: the failed target, its command, its output
            print(f"FAILED: {step['object']}", flush=True)
            print(shlex.join(step["argv"]), flush=True)
            if output:
                print(output, flush=True)
            print("ninja: build stopped: subcommand failed.", flush=True)
            raise RuntimeError(f"Error building extension '{name}'")
        if output:
            print(output, flush=True)
    with open(library, "wb") as f:
        f.write(b"placeholder written by the fake torch_musa; not a shared library\n")
    if verbose:
        print(f"fake torch_musa: wrote placeholder {library} (not loaded)", flush=True)
    return library


def _load_inline(name, cpp_sources, musa_sources=None, functions=None, **kwargs):
    raise RuntimeError("fake torch_musa: load_inline is not simulated")


load_inline = _load_inline
# torch_musa gained the JIT `load` in 2.7.0; older releases only had load_inline.
if _version(torch_musa.__version__) >= (2, 7, 0):
    load = _load
