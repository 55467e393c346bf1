"""A fake ``torch_musa`` for flash_kda's CPU-only tests (see ../README.md). Not Moore Threads' code.

Like the real package it makes ``torch.musa`` refer to this module and sets ``torch.version.musa``.
It does not rename torch's PrivateUse1 backend or register anything with torch, so a test can undo
its import completely (remove ``torch_musa*`` from sys.modules, restore the two attributes).
"""

import os
import sys

import torch

from .version import __version__  # noqa: F401


def device_count() -> int:
    return int(os.environ.get("FAKE_MUSA_DEVICE_COUNT", "1"))


def is_available() -> bool:
    return device_count() > 0


def current_device() -> int:
    if not is_available():
        raise RuntimeError("fake torch_musa: no MUSA device")
    return 0


def get_device_capability(device=None):
    if not is_available():
        raise RuntimeError("fake torch_musa: no MUSA device")
    major, minor = os.environ.get("FAKE_MUSA_CAPABILITY", "3.1").split(".")
    return int(major), int(minor)


def get_arch_list():
    return ["21", "22", "31"]


torch.version.musa = os.environ.get("FAKE_MUSA_RUNTIME_VERSION", "5.1.0")
torch.musa = sys.modules[__name__]

from .utils import musa_extension  # noqa: E402,F401  (the real package imports it too)
