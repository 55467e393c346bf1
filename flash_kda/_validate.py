"""Argument checks for both entry points. Everything is checked before anything is launched;
nothing here writes to a caller's tensor.

``check_problem`` returns a ``Problem``: the inputs as 4-D token-major views (varlen ``[S, H, D]``
gains a leading batch dim of 1), plus the facts the kernel call needs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .jit.spec import BACKEND_DTYPES, DTYPE_NAMES, HEAD_DIMS

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "musa", "privateuseone")


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    A_log: torch.Tensor | None
    dt_bias: torch.Tensor | None
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    num_seqs: int
    head_dim: int
    scale: float
    lower_bound: float
    packed: bool  # varlen given as [S, H, D] (no batch dim)


def _name(t) -> str:
    return f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else \
        f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def require_tensor(x, name: str, optional: bool = False):
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {_name(x)}")


def _require_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides "
                         f"{tuple(t.stride())}; call .contiguous() on it")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name}: negative strides are not supported")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address touched by t (empty tensors touch nothing)."""
    if t.numel() == 0:
        return (0, -1)
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (start, start + (extent + 1) * t.element_size() - 1)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 <= b1 and b0 <= a1


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """True if two elements of t share memory (e.g. expand()ed views): unsafe to write."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * size
    return False


def check_output(out: torch.Tensor, name: str, shape, dtype, device, inputs: dict) -> None:
    require_tensor(out, name)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{name} must be on {device}, got {out.device}")
    _require_last_dim_contiguous(out, name)
    if _has_internal_overlap(out):
        raise ValueError(f"{name} has overlapping elements (an expanded or strided view); pass a "
                         "tensor whose elements are distinct")
    reject_aliasing(out, name, inputs)


def reject_aliasing(out: torch.Tensor, name: str, inputs: dict) -> None:
    """An output must not share memory with any of `inputs` (name -> tensor or None)."""
    for other_name, other in inputs.items():
        if other is not None and overlaps(out, other):
            raise ValueError(f"{name} overlaps {other_name} in memory; outputs must not alias inputs")


def check_cu_seqlens(cu_seqlens, total: int, device) -> torch.Tensor:
    require_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with at least one element [N + 1], got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device and cu_seqlens.device.type != "cpu":
        raise ValueError(f"cu_seqlens must be on {device} (or the CPU), got {cu_seqlens.device}")
    if not _capturing(device):
        # One small device-to-host copy; skipped while a CUDA graph is being captured (the kernel
        # clamps every offset into range, so malformed values still cannot touch foreign memory).
        values = cu_seqlens.tolist()
        if values[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
        if values[-1] != total:
            raise ValueError(f"cu_seqlens must end at the total token count {total}, got {values[-1]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
    if cu_seqlens.device != device:
        cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    if not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.contiguous()
    return cu_seqlens


def _capturing(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        return False


def check_state(s, name: str, shape, input_dtype, device) -> None:
    require_tensor(s, name, optional=True)
    if s is None:
        return
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} ([N, Hv, V, K]), got {list(s.shape)}")
    if s.dtype not in (torch.float32, input_dtype):
        raise TypeError(f"{name} must be float32 or {input_dtype} (the input dtype), got {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name} must be on {device}, got {s.device}")
    _require_last_dim_contiguous(s, name)


def check_problem(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias,
                  lower_bound) -> Problem:
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        require_tensor(t, name)
    require_tensor(A_log, "A_log", optional=True)
    require_tensor(dt_bias, "dt_bias", optional=True)
    device = q.device
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"flash_kda runs on CPU, CUDA and MUSA tensors; q is on {device}")
    for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta), ("A_log", A_log),
                    ("dt_bias", dt_bias), ("initial_state", initial_state)):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; put all tensors on one device")

    dtype = q.dtype
    backend = "musa" if device.type in ("musa", "privateuseone") else device.type
    allowed = [d for d, n in DTYPE_NAMES.items() if n in BACKEND_DTYPES[backend]]
    if dtype not in allowed:
        raise TypeError(f"q must be one of {allowed} on {backend}, got {dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have q's dtype {dtype}, got {t.dtype}")
    for name, t in (("g", g), ("beta", beta)):
        if t.dtype not in (dtype, torch.float32):
            raise TypeError(f"{name} must be {dtype} or float32, got {t.dtype}")

    varlen = cu_seqlens is not None
    packed = varlen and q.dim() == 3
    if varlen:
        if q.dim() == 4 and q.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, q must be [S, H, K] or [1, S, H, K]; got batch "
                             f"size {q.shape[0]}")
        if q.dim() not in (3, 4):
            raise ValueError(f"with cu_seqlens, q must be [S, H, K] or [1, S, H, K], got {tuple(q.shape)}")
    elif q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K] (or pass cu_seqlens for [S, H, K]), got {tuple(q.shape)}")
    nd = q.dim()
    for name, t in (("v", v), ("g", g)):
        if t.dim() != nd:
            raise ValueError(f"{name} must have {nd} dims like q, got shape {tuple(t.shape)}")
    if beta.dim() != nd - 1:
        raise ValueError(f"beta must have {nd - 1} dims ([.., T, Hv]), got shape {tuple(beta.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k.shape must equal q.shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if g.shape != v.shape:
        raise ValueError(f"g.shape must equal v.shape {tuple(v.shape)}, got {tuple(g.shape)}")
    if beta.shape != v.shape[:-1]:
        raise ValueError(f"beta.shape must be v.shape[:-1] = {tuple(v.shape[:-1])}, got {tuple(beta.shape)}")
    if v.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"v's batch/token dims {tuple(v.shape[:-2])} differ from q's {tuple(q.shape[:-2])}")
    hqk, K = q.shape[-2], q.shape[-1]
    hv, V = v.shape[-2], v.shape[-1]
    if hqk == 0 or hv % hqk != 0:
        raise ValueError(f"value heads ({hv}) must be a positive multiple of query/key heads ({hqk})")
    if K != V:
        raise ValueError(f"key and value head dims must be equal (K == V), got K={K}, V={V}")
    if K not in HEAD_DIMS:
        raise ValueError(f"head dim {K} is not supported; flash_kda is specialised for {HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _require_last_dim_contiguous(t, name)

    if scale is None:
        scale = K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real) \
            or not math.isfinite(lower_bound):
        raise TypeError(f"lower_bound must be a finite float, got {lower_bound!r}")

    if (A_log is None) != (dt_bias is None):
        raise ValueError("A_log and dt_bias come together: pass both or neither")
    if A_log is not None:
        if A_log.dtype != torch.float32 or dt_bias.dtype != torch.float32:
            raise TypeError(f"A_log and dt_bias must be float32, got {A_log.dtype} and {dt_bias.dtype}")
        if tuple(A_log.shape) != (hv,):
            raise ValueError(f"A_log must be [Hv] = [{hv}], got {list(A_log.shape)}")
        if tuple(dt_bias.shape) != (hv, K):
            raise ValueError(f"dt_bias must be [Hv, K] = [{hv}, {K}], got {list(dt_bias.shape)}")
        _require_last_dim_contiguous(A_log, "A_log")
        _require_last_dim_contiguous(dt_bias, "dt_bias")

    if packed:
        q, k, v, g, beta = (t.unsqueeze(0) for t in (q, k, v, g, beta))
    B, T = q.shape[0], q.shape[1]
    if varlen:
        cu_seqlens = check_cu_seqlens(cu_seqlens, T, device)
        num_seqs = cu_seqlens.numel() - 1
    else:
        num_seqs = B
    check_state(initial_state, "initial_state", (num_seqs, hv, V, K), dtype, device)
    return Problem(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, num_seqs, K,
                   float(scale), float(lower_bound), packed)


def check_final_state(final_state, p: Problem) -> None:
    """final_state: a destination of [N, Hv, V, K]; may be the initial_state tensor itself."""
    if final_state is None:
        return
    hv, K = p.v.shape[2], p.head_dim
    check_state(final_state, "final_state", (p.num_seqs, hv, K, K), p.v.dtype, p.q.device)
    if p.initial_state is not None:
        if final_state.dtype != p.initial_state.dtype:
            raise TypeError(f"initial_state and final_state dtypes differ: {p.initial_state.dtype} "
                            f"vs {final_state.dtype}")
        if not same_view(final_state, p.initial_state) and overlaps(final_state, p.initial_state):
            raise ValueError("final_state partly overlaps initial_state; pass the same tensor (in-place "
                             "update) or non-overlapping tensors")
    if _has_internal_overlap(final_state):
        raise ValueError("final_state has overlapping elements (an expanded view)")
    reject_aliasing(final_state, "final_state", p_inputs(p))


def p_inputs(p: Problem) -> dict:
    return {"q": p.q, "k": p.k, "v": p.v, "g": p.g, "beta": p.beta, "A_log": p.A_log,
            "dt_bias": p.dt_bias, "cu_seqlens": p.cu_seqlens}
