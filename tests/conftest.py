"""Test session setup: one shared kernel cache for every test that is not about the cache itself.

Compiling is the slow part on a 2-core CI machine, so the correctness and API tests share one
session-wide cache directory (FLASH_KDA_CACHE_DIR if you set it, else a directory under the
repository that a fresh clone does not have). JIT tests make their own throwaway caches, with a
stand-in kernel that builds in seconds (the fixtures at the end; helpers in jit_testing.py).
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLASH_KDA_CACHE_DIR", str(REPO / ".cache" / "pytest-kernels"))

import pytest  # noqa: E402
import torch  # noqa: E402

import flash_kda  # noqa: E402  (builds or loads the default specialisation once for the session)


def cuda_ok() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


def pytest_report_header(config):
    from flash_kda import jit
    return [f"flash_kda {flash_kda.__version__}: default backend {jit.default_backend()}, "
            f"cache {jit.env.cache_root()}, torch {torch.__version__}, cuda available {cuda_ok()}"]


def musa_ok() -> bool:
    from flash_kda.jit.select import musa_present
    return musa_present()


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not cuda_ok(), reason="no CUDA device on this machine (CPU-only CI)")]),
    pytest.param("musa", id="musa", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not musa_ok(), reason="no MUSA device (torch_musa) on this machine")]),
]


@pytest.fixture
def stub_csrc(tmp_path):
    """A fresh copy of the JIT tests' stand-in sources."""
    from jit_testing import make_stub_csrc
    return make_stub_csrc(tmp_path / "csrc")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One cold build of the JIT tests' stand-in kernel, shared by the tests that start from a
    populated cache (each copies it)."""
    from jit_testing import build_stub_cache
    return build_stub_cache(tmp_path_factory.mktemp("jit-built"))
