"""The public entry points: ``fwd`` and ``get_workspace_size`` (the FlashKDA surface) and
``chunk_kda`` (the operator surface of the MUSA documents). See shared/CONTRACT.md."""

from __future__ import annotations

import torch

from . import _ops
from ._validate import (check_destinations, check_offset_values, check_problem, check_workspace,
                        require_tensor, same_view)
from ._workspace import carry_bytes, split_possible, split_scratch_bytes, split_selected, varlen_slots


def get_workspace_size(T_total: int, H: int, N: int) -> int:
    """Bytes of workspace ``fwd`` may use for T_total tokens, H (value) heads and N sequences.

    The scratch of the CUDA two-kernel form (the default on sm_80+), for head dim 128 (FlashKDA's
    only one), sized for the varlen slot bound ``T_total // 32 + N``, which also covers N dense
    sequences of T_total / N tokens: one record of 34,688 bytes per 32-token chunk and head (fp16
    operands), about 1.06x the bytes of q, k, v and g (bf16) together. A workspace of at least this many
    bytes (on q's device, contiguous, 16-byte aligned; any dtype) passed to ``fwd`` is used
    instead of an internal allocation. For other head dims, or a workspace that is too small or unsuitable,
    ``fwd`` allocates what it needs itself (not an error; if that allocation fails, the fused
    kernel runs, which needs none). 0 where nothing will use it: no CUDA device, the portable
    kernels (``FLASH_KDA_KERNEL=portable``), or the fused form selected
    (``FLASH_KDA_CUDA_SPLIT=0``). It also counts the fp32 state carried between the stretches of
    a call cut into pieces (long calls, dense or varlen; docs/cuda.md), N x H x 128 x 128 x 4 bytes (64 KB per
    sequence and head: under 1 % of the records for sequences of 4096 tokens or more).
    """
    for name, x in (("T_total", T_total), ("H", H), ("N", N)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    if not (split_selected() and split_possible()):
        return 0
    return split_scratch_bytes(varlen_slots(T_total, N), H, 128) + carry_bytes(N, H, 128)


def _run(p, out4, final_state, in_place: bool, use_qk_l2norm: bool, workspace=None) -> None:
    """Launch; with in_place, final_state holds the initial state (it is the same tensor)."""
    _ops.call((p.q, p.k, p.v, p.g, p.beta, p.A_log, p.dt_bias,
               None if in_place else p.initial_state, final_state, out4, p.cu_seqlens,
               p.scale, p.lower_bound, use_qk_l2norm, in_place, workspace),
              p.device, p.head_dim, p.dtype)


def _as4d(t: torch.Tensor, packed: bool) -> torch.Tensor:
    return t.unsqueeze(0) if packed else t


def fwd(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound,
        initial_state=None, final_state=None, cu_seqlens=None, workspace=None) -> None:
    """KDA forward with FlashKDA's signature; writes ``out`` (and ``final_state``) in place.

    Args:
        q, k: ``[B, T, H, K]`` (varlen: ``[1, S, H, K]`` or ``[S, H, K]``), bf16 or fp16.
        v: ``[B, T, Hv, V]``; g: like v (raw gate input); beta: ``[B, T, Hv]`` logits.
        scale: float (None: K ** -0.5). out: preallocated like v.
        A_log: fp32 ``[Hv]``; dt_bias: fp32 ``[Hv, K]``; lower_bound: float (FlashKDA uses -5.0).
        initial_state / final_state: ``[N, Hv, V, K]`` fp32 or the input dtype; may be one tensor.
        cu_seqlens: int32 or int64 ``[N + 1]`` (varlen, B == 1).
        workspace: optional scratch on q's device, ``get_workspace_size(T_total, Hv, N)`` bytes
            (any dtype, contiguous, 16-byte aligned). The CUDA two-kernel path uses it instead of
            allocating; its contents are overwritten. Too small or unsuitable: fwd allocates its
            own (no error). Unused on CPU/portable builds. It must not share memory with the
            other arguments (checked), and must not be used by other work until this call's
            kernels finish (it is used on the current stream).

    q/k are L2-normalised in the kernel, the gate uses A_log/dt_bias, beta goes through sigmoid.
    """
    if isinstance(A_log, torch.Tensor) and isinstance(dt_bias, torch.Tensor) and _run_unchecked(
            q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state,
            cu_seqlens, workspace, use_qk_l2norm=True):
        return
    # FlashKDA's surface always has the gate parameters and `out`. One expression for the good
    # case; require_tensor names what is wrong.
    T = torch.Tensor
    if not (isinstance(A_log, T) and isinstance(dt_bias, T) and isinstance(out, T)
            and (workspace is None or isinstance(workspace, T))):
        require_tensor(A_log, "A_log")
        require_tensor(dt_bias, "dt_bias")
        require_tensor(workspace, "workspace", optional=True)
        require_tensor(out, "out")
    p = check_problem(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, lower_bound)
    in_place = check_destinations(p, final_state, out, "out")
    if workspace is not None:
        check_workspace(workspace, p, out, final_state)
    _run(p, _as4d(out, p.packed), final_state, in_place, use_qk_l2norm=True, workspace=workspace)


# The prefix of the compiled op's argument errors (binding.cpp, kInvalid).
_INVALID = "flash_kda: invalid arguments: "
_OFFSET_DTYPES = (torch.int32, torch.int64)
_REALS = (float, int)  # exactly these types (not bool): the op's float arguments


def _run_unchecked(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state,
                   final_state, cu_seqlens, workspace, use_qk_l2norm: bool) -> bool:
    """The entry points' fast path: the compiled op with the arguments as given, its own checks
    (binding.cpp: every argument, device, stride and overlap rule of _validate.py, tersely)
    standing in for the Python ones, which cost more host time than launching the kernels. It is
    called through the library's direct entry (csrc/python_entry.cpp), which skips torch's
    dispatcher and checks the arguments' types itself. True if it ran. False — nothing run,
    nothing written — where it does not apply (not yet loaded, tracing, [S, H, K] inputs,
    cu_seqlens elsewhere than q's device, arguments of unexpected types, calls the direct entry
    declines: tensor subclasses, dispatch modes, autograd recording) or where the op rejected the
    arguments: then the checked path runs and names the problem."""
    T = torch.Tensor
    if not (isinstance(q, T) and q.dim() == 4) or torch.compiler.is_compiling():
        return False
    device = q.device
    head_dim = q.shape[3]
    kernel = _ops.loaded_kernel(device, head_dim, q.dtype)
    if kernel is None:
        return False
    direct = kernel.direct
    if direct is None and not _schema_types(k, v, g, beta, out, A_log, dt_bias, initial_state,
                                            final_state, workspace, scale, lower_bound):
        return False  # (the op would raise TypeError; the checked path names the argument)
    if cu_seqlens is not None:
        if not (isinstance(cu_seqlens, T) and cu_seqlens.dtype in _OFFSET_DTYPES
                and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 1
                and cu_seqlens.device == device):
            return False
        try:
            check_offset_values(cu_seqlens, q.shape[1], device)
        except ValueError:
            return False  # the checked path reports it (after any earlier problem)
    in_place = (isinstance(initial_state, T) and isinstance(final_state, T)
                and same_view(final_state, initial_state))
    args = (q, k, v, g, beta, A_log, dt_bias, None if in_place else initial_state, final_state,
            out, cu_seqlens, head_dim ** -0.5 if scale is None else scale, lower_bound,
            use_qk_l2norm, in_place, workspace)
    try:
        if direct is not None:
            return direct(*args)
        kernel.op(*args)
    except ValueError as e:
        if str(e).startswith(_INVALID):
            return False
        raise
    except NotImplementedError:
        return False  # a tensor on a device whose dispatch key has no kernel (meta, ...)
    return True


def _schema_types(k, v, g, beta, out, A_log, dt_bias, initial_state, final_state, workspace, scale,
                  lower_bound) -> bool:
    """The arguments (q aside) have the op's schema types: what torch.ops would otherwise refuse
    with a TypeError. For libraries without the direct entry, which checks this itself."""
    T = torch.Tensor
    return (isinstance(k, T) and isinstance(v, T) and isinstance(g, T) and isinstance(beta, T)
            and isinstance(out, T)
            and (A_log is None or isinstance(A_log, T)) and (dt_bias is None or isinstance(dt_bias, T))
            and (initial_state is None or isinstance(initial_state, T))
            and (final_state is None or isinstance(final_state, T))
            and (workspace is None or isinstance(workspace, T))
            and (scale is None or type(scale) in _REALS) and type(lower_bound) in _REALS)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, A_log=None, dt_bias=None, lower_bound=-5.0,
              use_qk_l2norm_in_kernel=True, output=None, final_state=None):
    """Chunked KDA forward (operator surface). Returns ``output``, or ``(output, final_state)``
    when ``output_final_state``.

    Args:
        q, k: ``[B, T, Hqk, K]`` dense, or ``[S, Hqk, K]`` / ``[1, S, Hqk, K]`` with cu_seqlens.
        v, g: ``[B, T, Hv, V]`` (or varlen equivalents); Hv divisible by Hqk; K == V.
        beta: ``[B, T, Hv]`` logits (sigmoid is applied in the kernel).
        scale: defaults to K ** -0.5.
        initial_state: ``[N, Hv, V, K]`` (value-major), fp32 or the input dtype.
        output_final_state: return the final state (allocated as fp32, or as initial_state's
            dtype, unless ``final_state`` is given).
        cu_seqlens: int32/int64 ``[N + 1]`` for varlen.
        A_log ``[Hv]`` fp32 and dt_bias ``[Hv, K]`` fp32: gate parameters (both or neither);
            without them g is used as the log-decay directly.
        lower_bound: gate lower bound when gate parameters are given.
        use_qk_l2norm_in_kernel: L2-normalise q and k in the kernel.
        output, final_state: optional destinations; when given they are written and returned
            (a given final_state is always written).
    """
    if not isinstance(output_final_state, bool) or not isinstance(use_qk_l2norm_in_kernel, bool):
        raise TypeError("output_final_state and use_qk_l2norm_in_kernel must be bool")
    fast = _chunk_kda_unchecked(q, k, v, g, beta, scale, initial_state, output_final_state,
                                cu_seqlens, A_log, dt_bias, lower_bound, use_qk_l2norm_in_kernel,
                                output, final_state)
    if fast is not None:
        return fast
    p = check_problem(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias, lower_bound)
    in_place = check_destinations(p, final_state, output, "output")
    if output is None:
        output = torch.empty_like(v, memory_format=torch.contiguous_format)
    if final_state is None and output_final_state:
        hv, K = p.v.shape[2], p.head_dim
        state_dtype = p.initial_state.dtype if p.initial_state is not None else torch.float32
        final_state = torch.empty(p.num_seqs, hv, K, K, dtype=state_dtype, device=v.device)
    _run(p, _as4d(output, p.packed), final_state, in_place, use_qk_l2norm=use_qk_l2norm_in_kernel,
         workspace=None)
    return (output, final_state) if output_final_state else output


def _chunk_kda_unchecked(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                         A_log, dt_bias, lower_bound, use_qk_l2norm, output, final_state):
    """chunk_kda through _run_unchecked, its missing destinations allocated first (shapes read off
    the arguments as given; if the op then refuses them, they are dropped). Its result, or None
    where the checked path must run."""
    # (what the allocations below read; _run_unchecked checks the rest)
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(v, T) and q.dim() == 4 and v.dim() == 4
            and (initial_state is None or isinstance(initial_state, T))
            and (cu_seqlens is None or isinstance(cu_seqlens, T) and cu_seqlens.dim() == 1)):
        return None
    if output is None:
        output = torch.empty_like(v, memory_format=torch.contiguous_format)
    if final_state is None and output_final_state:
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if n < 0:
            return None
        state_dtype = initial_state.dtype if initial_state is not None else torch.float32
        final_state = torch.empty(n, v.shape[2], q.shape[3], q.shape[3], dtype=state_dtype,
                                  device=v.device)
    if not _run_unchecked(q, k, v, g, beta, scale, output, A_log, dt_bias, lower_bound,
                          initial_state, final_state, cu_seqlens, None, use_qk_l2norm):
        return None
    return (output, final_state) if output_final_state else output
