"""The torch.library operator ``flash_kda::kda_fwd`` and its routing to compiled kernels.

One custom op for every device: its implementation looks up (building on first use) the
specialisation for the tensors' backend, device arch, head dim and dtype, and calls that module's
raw op. ``out``, ``final_state`` and ``workspace`` (scratch) are declared as mutated, and a fake implementation is
registered, so torch.compile can trace through calls without running them.
"""

from __future__ import annotations

import os
import threading

import torch

from . import jit

# (device, head_dim, dtype, FLASH_KDA_KERNEL as set, None on the CPU) -> loaded kernel
_kernels: dict[tuple, "jit.LoadedKernel"] = {}
_kernels_lock = threading.Lock()
_CPU = torch.device("cpu")


def kernel_for(device: torch.device, head_dim: int, dtype: torch.dtype) -> "jit.LoadedKernel":
    """The loaded kernel for this device/head dim/dtype (memoised: the hot path is one dict get).

    FLASH_KDA_KERNEL is read on every GPU call (a running process may switch variants); the key
    holds its raw value, which jit.env.kernel_variant() parses and validates on a miss. The CPU
    module has a single variant, so CPU calls skip the environment read (~1 us).
    """
    key = _key(device, head_dim, dtype)
    kernel = _kernels.get(key)
    if kernel is None:
        with _kernels_lock:
            kernel = _kernels.get(key)
            if kernel is None:
                jit.env.kernel_variant()  # a bad FLASH_KDA_KERNEL is an error on every backend
                kernel = jit.build_and_load(jit.spec_for(device, head_dim, dtype))
                _kernels[key] = kernel
    return kernel


def loaded_kernel(device: torch.device, head_dim: int, dtype: torch.dtype):
    """The kernel for this device/head dim/dtype if this process has loaded it, else None (never
    builds: the caller takes its checked path, which builds, on None)."""
    return _kernels.get(_key(device, head_dim, dtype))


def _key(device: torch.device, head_dim: int, dtype: torch.dtype) -> tuple:
    variant = None if device == _CPU else os.environ.get("FLASH_KDA_KERNEL")
    return (device, head_dim, dtype, variant)


def forget_kernels() -> None:
    """Drop memoised kernels (tests that change the cache or environment)."""
    with _kernels_lock:
        _kernels.clear()
    jit.clear_memo()


@torch.library.custom_op("flash_kda::kda_fwd", mutates_args=("final_state", "out", "workspace"))
def kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    out: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    lower_bound: float,
    use_qk_l2norm: bool,
    state_in_place: bool,
    workspace: torch.Tensor | None,
) -> None:
    """4-D token-major inputs (already validated). With state_in_place, final_state holds the
    initial state on entry and initial_state is None. workspace: optional caller scratch (used
    when big and suitable enough, else the binding allocates its own)."""
    run_kernel(q, k, v, g, beta, A_log, dt_bias, initial_state, final_state, out, cu_seqlens,
               scale, lower_bound, use_qk_l2norm, state_in_place, workspace)


@kda_fwd.register_fake
def _kda_fwd_fake(q, k, v, g, beta, A_log, dt_bias, initial_state, final_state, out, cu_seqlens,
                  scale, lower_bound, use_qk_l2norm, state_in_place, workspace) -> None:
    return None


def run_kernel(q, k, v, g, beta, A_log, dt_bias, initial_state, final_state, out, cu_seqlens,
               scale, lower_bound, use_qk_l2norm, state_in_place, workspace) -> None:
    launch(kernel_for(q.device, q.shape[-1], q.dtype),
           (q, k, v, g, beta, A_log, dt_bias, initial_state, final_state, out, cu_seqlens, scale,
            lower_bound, use_qk_l2norm, state_in_place, workspace))


def launch(kernel: "jit.LoadedKernel", args: tuple) -> None:
    """kda_fwd's `args` through the library's direct entry (csrc/python_entry.cpp: no dispatcher),
    or through its op where the entry declines the call or the library has none."""
    if kernel.direct is None or not kernel.direct(*args):
        kernel.op(*args)


def call(args: tuple, device: torch.device, head_dim: int, dtype: torch.dtype) -> None:
    """Run the op on `args` (kda_fwd's, in order) of q's device, head dim and dtype: through the
    custom op when tracing (torch.compile sees it), directly otherwise (the custom-op wrapper
    costs tens of microseconds of host time per call; launch skips the dispatcher too)."""
    if torch.compiler.is_compiling():
        torch.ops.flash_kda.kda_fwd(*args)
    else:
        launch(kernel_for(device, head_dim, dtype), args)
