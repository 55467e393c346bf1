"""Version of the simulated torch_musa (FAKE_TORCH_MUSA_VERSION, default 2.7.1)."""
import os

__version__ = os.environ.get("FAKE_TORCH_MUSA_VERSION", "2.7.1")
