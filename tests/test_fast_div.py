"""flash_kda/csrc/fast_div.h (the kernels' division by a launch-time divisor) against `/`.

tests/cpp/fast_div_check.cpp runs ~2.3 million (dividend, divisor) pairs: every divisor up to 4096,
powers of two and their neighbours up to 2^31 - 1, 20,000 pseudo-random divisors, each with edge
and pseudo-random dividends in [0, 2^31). Built with the host C++ compiler (the one the CPU backend
uses), so this runs on any machine the test suite runs on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_fast_div_matches_integer_division(tmp_path):
    from flash_kda.jit.backends import get_toolchain
    from flash_kda.jit.backends.base import CompilerNotFoundError
    try:
        cxx = get_toolchain("cpu").compiler_path()  # $CXX or c++, as the CPU backend finds it
    except CompilerNotFoundError:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "fast_div_check"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{REPO / 'flash_kda' / 'csrc'}",
                    str(REPO / "tests" / "cpp" / "fast_div_check.cpp"), "-o", str(exe)], check=True)
    done = subprocess.run([str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("pairs ok") and int(done.stdout.split()[0]) > 2_000_000
