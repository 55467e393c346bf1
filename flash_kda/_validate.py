"""Argument checks for both entry points. Everything is checked before anything is launched;
nothing here writes to a caller's tensor.

``check_problem`` returns a ``Problem``: the inputs as 4-D token-major views (varlen ``[S, H, D]``
gains a leading batch dim of 1), plus the facts the kernel call needs.

Both entry points run these checks only when the compiled op refuses their arguments or cannot
take them as given (api._run_unchecked): the binding's checks (binding.cpp, check_memory and
checked_params) reject at least everything rejected here, tersely, and these then say what is
wrong; tests/test_validation.py runs every bad case through both entry points with the kernel
loaded. A rule added here must be added there. They are written for host time all the same
(they run on every call of [S, H, K] varlen inputs, and under torch.compile): reading one tensor
attribute costs ~0.1 us, and the whole of them about 10 us (tools/host_overhead.py). Hence:
- each check first tests the good case in one expression; the loop that names the culprit runs
  only when that fails;
- contiguous tensors (the common case) take short paths: no stride walks, one ``nbytes`` span;
- every input's byte span is computed once per call (``Problem.spans``) and reused by the
  aliasing checks of both destinations;
- a ``cu_seqlens`` on the device is copied back to the host (which waits for the queued GPU work)
  only when it is not the tensor checked last, unchanged (``check_offset_values``).
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass

import torch

from .jit.spec import BACKEND_DTYPES, DTYPE_NAMES, HEAD_DIMS

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "musa", "privateuseone")

# Input dtypes each backend compiles, e.g. "cpu" -> [float32, bfloat16, float16].
_ALLOWED_DTYPES = {backend: [d for d, n in DTYPE_NAMES.items() if n in names]
                   for backend, names in BACKEND_DTYPES.items()}
_NO_SPAN = (0, -1)  # the byte span of a tensor that touches no memory


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
    spans: dict   # input name -> byte span, for the destinations' aliasing checks
    device: torch.device  # q's (every tensor's)
    dtype: torch.dtype    # q's (the input dtype)


# ---------------------------------------------------------------------------------------------
# Single tensors: type, layout, byte span
# ---------------------------------------------------------------------------------------------
def _name(t) -> str:
    return f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else \
        f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def require_tensor(x, name: str, optional: bool = False):
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {_name(x)}")


def _require_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.is_contiguous():  # unit last stride, no negative strides
        return
    if t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides "
                         f"{tuple(t.stride())}; call .contiguous() on it")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name}: negative strides are not supported")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address touched by t (empty tensors touch nothing)."""
    start = t.data_ptr()
    if t.is_contiguous():  # one block of nbytes (size-1 dims add nothing, whatever their stride)
        nbytes = t.nbytes
        return (start, start + nbytes - 1) if nbytes else _NO_SPAN
    if t.numel() == 0:
        return _NO_SPAN
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (start, start + (extent + 1) * t.element_size() - 1)


def _checked_span(t: torch.Tensor, name: str) -> tuple[int, int]:
    """_require_last_dim_contiguous, then _span: one is_contiguous() for both in the common case."""
    start = t.data_ptr()
    if t.is_contiguous():
        nbytes = t.nbytes
        return (start, start + nbytes - 1) if nbytes else _NO_SPAN
    _require_last_dim_contiguous(t, name)
    return _span(t)


def _spans_meet(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and _spans_meet(_span(a), _span(b))


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """True if two elements of t share memory (e.g. expand()ed views): unsafe to write."""
    if t.is_contiguous():
        return False
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * size
    return False


# ---------------------------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------------------------
def check_output(out: torch.Tensor, name: str, shape, dtype, device, spans: dict) -> None:
    """`out`: a destination of `shape`/`dtype` on `device` sharing no memory with any of `spans`
    (name -> byte span of a tensor on `device`)."""
    require_tensor(out, name)
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{name} must be on {device}, got {out.device}")
    mine = _checked_span(out, name)
    if _has_internal_overlap(out):
        raise ValueError(f"{name} has overlapping elements (an expanded or strided view); pass a "
                         "tensor whose elements are distinct")
    _reject_aliasing(mine, name, spans)


def _reject_aliasing(mine: tuple[int, int], name: str, spans: dict) -> None:
    """An output (byte span `mine`) must not share memory with any input (`spans`: name -> byte
    span; all on the output's device, as check_problem puts every input on one device)."""
    first, last = mine
    for other_name, (other_first, other_last) in spans.items():
        if first <= other_last and other_first <= last:
            raise ValueError(f"{name} overlaps {other_name} in memory; outputs must not alias inputs")


def check_destinations(p: Problem, final_state, out, out_name: str) -> bool:
    """final_state, then `out` (None: allocated later), against the inputs and each other.

    Returns whether final_state is initial_state itself (an in-place state update)."""
    in_place, state_spans = False, {}
    if final_state is not None:
        state_spans, in_place = _check_final_state(final_state, p)
    if out is not None:
        if final_state is None and p.initial_state is not None:
            state_spans = {"initial_state": _span(p.initial_state)}
        # `out` must not overlap the inputs nor the states
        check_output(out, out_name, p.v.shape if not p.packed else p.v.shape[1:], p.dtype,
                     p.device, {**p.spans, **state_spans})
    return in_place


def _check_final_state(final_state, p: Problem) -> tuple[dict, bool]:
    """final_state: a destination of [N, Hv, V, K]; may be the initial_state tensor itself.
    Returns the states' byte spans (name -> span) and whether final_state is initial_state."""
    hv, K = p.v.shape[2], p.head_dim
    check_state(final_state, "final_state", (p.num_seqs, hv, K, K), p.dtype, p.device)
    mine = _span(final_state)
    spans = {}
    h0 = p.initial_state
    in_place = h0 is not None and same_view(final_state, h0)
    if h0 is not None:
        if final_state.dtype != h0.dtype:
            raise TypeError(f"initial_state and final_state dtypes differ: {h0.dtype} "
                            f"vs {final_state.dtype}")
        spans["initial_state"] = mine if in_place else _span(h0)
        if not in_place and _spans_meet(mine, spans["initial_state"]):
            raise ValueError("final_state partly overlaps initial_state; pass the same tensor (in-place "
                             "update) or non-overlapping tensors")
    spans["final_state"] = mine
    if _has_internal_overlap(final_state):
        raise ValueError("final_state has overlapping elements (an expanded view)")
    _reject_aliasing(mine, "final_state", p.spans)
    return spans, in_place


def check_state(s, name: str, shape, input_dtype, device) -> None:
    require_tensor(s, name, optional=True)
    if s is None:
        return
    if s.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ([N, Hv, V, K]), got {list(s.shape)}")
    if s.dtype != torch.float32 and s.dtype != input_dtype:
        raise TypeError(f"{name} must be float32 or {input_dtype} (the input dtype), got {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name} must be on {device}, got {s.device}")
    _require_last_dim_contiguous(s, name)


def check_workspace(workspace: torch.Tensor, p: Problem, out, final_state) -> None:
    """fwd's optional scratch (already known to be a tensor): on q's device and sharing no memory
    with any argument, since the kernels overwrite it. Size, layout and alignment are the binding's
    business (an unsuitable workspace is not used; fwd then allocates its own)."""
    if workspace.device != p.device:
        raise ValueError(f"workspace must be on {p.device} (q's device), got {workspace.device}")
    others = dict(p.spans)
    others["out"] = _span(out)
    if final_state is not None:
        others["final_state"] = _span(final_state)
    if p.initial_state is not None:
        others["initial_state"] = _span(p.initial_state)
    _reject_aliasing(_span(workspace), "workspace", others)


# ---------------------------------------------------------------------------------------------
# cu_seqlens
# ---------------------------------------------------------------------------------------------
def check_cu_seqlens(cu_seqlens, total: int, device) -> torch.Tensor:
    require_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with at least one element [N + 1], got shape "
                         f"{tuple(cu_seqlens.shape)}")
    on_device = cu_seqlens.device == device
    if not on_device and not cu_seqlens.is_cpu:
        raise ValueError(f"cu_seqlens must be on {device} (or the CPU), got {cu_seqlens.device}")
    check_offset_values(cu_seqlens, total, device)
    if not on_device:
        cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    if not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.contiguous()
    return cu_seqlens


# The last device-resident cu_seqlens whose values passed the checks: (weak reference to the
# tensor, its _offsets_state then, its last value). Reading a device tensor's values is a
# device-to-host copy that waits for all the work queued on the stream; a model passes the same
# cu_seqlens to every KDA layer of a step, so only the first layer pays for it.
_checked_offsets = None


def _offsets_state(cu: torch.Tensor) -> tuple:
    """What changes when a tensor's values may have: PyTorch bumps `_version` on every in-place
    write (copy_, fill_, out=, indexing assignment, custom ops that declare the mutation); the
    data pointer, shape, stride and dtype catch a tensor object re-pointed at other memory."""
    return (cu._version, cu.data_ptr(), cu.shape, cu.stride(), cu.dtype)


def check_offset_values(cu: torch.Tensor, total: int, device) -> None:
    """cu_seqlens starts at 0, is non-decreasing and ends at `total`.

    A host tensor is always read (no synchronisation). A device tensor is read unless it is the
    one checked last and unchanged since (same object, same _offsets_state); an inference tensor
    (made under torch.inference_mode) has no version counter, so it is read every time.
    Writes that bypass PyTorch (a raw kernel writing through data_ptr()) are not seen by that
    test, and while a CUDA graph is captured a device tensor cannot be read at all (then nothing
    is checked or remembered); in both cases the kernels still clamp every offset into
    [0, total], so malformed values cannot make them touch memory outside the tensors.
    """
    global _checked_offsets
    costly = _read_is_costly(cu)
    remember = costly and not cu.is_inference()
    if remember:
        memo = _checked_offsets
        if memo is not None and memo[0]() is cu and memo[1] == _offsets_state(cu):
            _check_offsets_end(memo[2], total)
            return
        state = _offsets_state(cu)  # taken before the read: a write after it makes a mismatch
    if costly and _capturing(device):
        return
    values = _read_offsets(cu)
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    _check_offsets_end(values[-1], total)
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if remember:
        _checked_offsets = (weakref.ref(cu), state, values[-1])


def _read_is_costly(cu: torch.Tensor) -> bool:
    """Reading a CPU tensor is free; any other device's needs a copy that waits for its stream."""
    return not cu.is_cpu


def _read_offsets(cu: torch.Tensor) -> list:
    return cu.tolist()


def _check_offsets_end(last: int, total: int) -> None:
    if last != total:
        raise ValueError(f"cu_seqlens must end at the total token count {total}, got {last}")


def forget_checked_offsets() -> None:
    """Make the next call read its device cu_seqlens again (tests)."""
    global _checked_offsets
    _checked_offsets = None


def _capturing(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------
# torch.device -> backend name ("cpu", "cuda", "musa"), since reading device.type costs ~0.4 us.
_backend_of_device: dict = {}


def _backend_of(device: torch.device) -> str:
    backend = _backend_of_device.get(device)
    if backend is None:
        if device.type not in SUPPORTED_DEVICE_TYPES:
            raise ValueError(f"flash_kda runs on CPU, CUDA and MUSA tensors; q is on {device}")
        backend = "musa" if device.type in ("musa", "privateuseone") else device.type
        _backend_of_device[device] = backend
    return backend


def _check_types_and_devices(q, k, v, g, beta, A_log, dt_bias, initial_state):
    """Tensors where tensors belong, all on q's device, input dtypes compiled for its backend.
    Returns q's device and dtype."""
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(k, T) and isinstance(v, T) and isinstance(g, T)
            and isinstance(beta, T) and (A_log is None or isinstance(A_log, T))
            and (dt_bias is None or isinstance(dt_bias, T))):
        for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
            require_tensor(t, name)
        require_tensor(A_log, "A_log", optional=True)
        require_tensor(dt_bias, "dt_bias", optional=True)
    device = q.device
    backend = _backend_of(device)
    if not (k.device == device and v.device == device and g.device == device
            and beta.device == device and (A_log is None or A_log.device == device)
            and (dt_bias is None or dt_bias.device == device)
            and (initial_state is None or not isinstance(initial_state, T)
                 or initial_state.device == device)):
        for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta), ("A_log", A_log),
                        ("dt_bias", dt_bias), ("initial_state", initial_state)):
            if isinstance(t, T) and t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}; put all tensors "
                                 "on one device")

    dtype = q.dtype
    allowed = _ALLOWED_DTYPES[backend]
    if dtype not in allowed:
        raise TypeError(f"q must be one of {allowed} on {backend}, got {dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have q's dtype {dtype}, got {t.dtype}")
    for name, t in (("g", g), ("beta", beta)):
        if t.dtype != dtype and t.dtype != torch.float32:
            raise TypeError(f"{name} must be {dtype} or float32, got {t.dtype}")
    return device, dtype


def _check_shapes(q, k, v, g, beta, varlen: bool) -> tuple[int, int, int]:
    """Token-major layouts that agree with each other (the contract's layout table).
    Returns q's number of dims, the value heads and the head dim."""
    qs, vs = q.shape, v.shape
    nd = len(qs)
    # The good case in one expression (equal shapes imply equal dims); the checks below it name
    # what is wrong when it fails.
    if not ((nd == 4 and (not varlen or qs[0] == 1) or nd == 3 and varlen)
            and len(vs) == nd and k.shape == qs and g.shape == vs and beta.shape == vs[:-1]
            and vs[:-2] == qs[:-2]):
        _explain_shapes(q, k, v, g, beta, varlen)
    hqk, K = qs[-2], qs[-1]
    hv, V = vs[-2], vs[-1]
    if hqk == 0 or hv % hqk != 0:
        raise ValueError(f"value heads ({hv}) must be a positive multiple of query/key heads ({hqk})")
    if K != V:
        raise ValueError(f"key and value head dims must be equal (K == V), got K={K}, V={V}")
    if K not in HEAD_DIMS:
        raise ValueError(f"head dim {K} is not supported; flash_kda is specialised for {HEAD_DIMS}")
    return nd, hv, K


def _explain_shapes(q, k, v, g, beta, varlen: bool) -> None:
    """Raise the error that says which shape is wrong (_check_shapes found one)."""
    qs, vs = q.shape, v.shape
    nd = len(qs)
    if varlen:
        if nd == 4 and qs[0] != 1:
            raise ValueError(f"with cu_seqlens, q must be [S, H, K] or [1, S, H, K]; got batch "
                             f"size {qs[0]}")
        if nd not in (3, 4):
            raise ValueError(f"with cu_seqlens, q must be [S, H, K] or [1, S, H, K], got {tuple(qs)}")
    elif nd != 4:
        raise ValueError(f"q must be [B, T, H, K] (or pass cu_seqlens for [S, H, K]), got {tuple(qs)}")
    for name, t in (("v", v), ("g", g)):
        if t.dim() != nd:
            raise ValueError(f"{name} must have {nd} dims like q, got shape {tuple(t.shape)}")
    if beta.dim() != nd - 1:
        raise ValueError(f"beta must have {nd - 1} dims ([.., T, Hv]), got shape {tuple(beta.shape)}")
    if k.shape != qs:
        raise ValueError(f"k.shape must equal q.shape {tuple(qs)}, got {tuple(k.shape)}")
    if g.shape != vs:
        raise ValueError(f"g.shape must equal v.shape {tuple(vs)}, got {tuple(g.shape)}")
    if beta.shape != vs[:-1]:
        raise ValueError(f"beta.shape must be v.shape[:-1] = {tuple(vs[:-1])}, got {tuple(beta.shape)}")
    if vs[:-2] != qs[:-2]:
        raise ValueError(f"v's batch/token dims {tuple(vs[:-2])} differ from q's {tuple(qs[:-2])}")
    raise AssertionError("_check_shapes rejected shapes that _explain_shapes accepts")


# Magnitudes below this round to a finite fp32 (the largest fp32 plus half its last place; the
# binding tests the same thing by converting).
_FP32_LIMIT = 2.0**128 - 2.0**103


def _finite_real(x) -> bool:
    """A real number (not a bool) that stays finite as the kernels' fp32."""
    if type(x) is float:  # the common case, without the slower ABC check
        return abs(x) < _FP32_LIMIT
    return not isinstance(x, bool) and isinstance(x, numbers.Real) and abs(float(x)) < _FP32_LIMIT


def _check_gate_params(A_log, dt_bias, hv: int, K: int) -> None:
    if (A_log is None) != (dt_bias is None):
        raise ValueError("A_log and dt_bias come together: pass both or neither")
    if A_log is None:
        return
    if A_log.dtype != torch.float32 or dt_bias.dtype != torch.float32:
        raise TypeError(f"A_log and dt_bias must be float32, got {A_log.dtype} and {dt_bias.dtype}")
    if A_log.shape != (hv,):
        raise ValueError(f"A_log must be [Hv] = [{hv}], got {list(A_log.shape)}")
    if dt_bias.shape != (hv, K):
        raise ValueError(f"dt_bias must be [Hv, K] = [{hv}, {K}], got {list(dt_bias.shape)}")


def check_problem(q, k, v, g, beta, scale, initial_state, cu_seqlens, A_log, dt_bias,
                  lower_bound) -> Problem:
    device, dtype = _check_types_and_devices(q, k, v, g, beta, A_log, dt_bias, initial_state)
    varlen = cu_seqlens is not None
    nd, hv, K = _check_shapes(q, k, v, g, beta, varlen)
    # The last-dim checks, with the byte spans the destinations are checked against.
    spans = {"q": _checked_span(q, "q"), "k": _checked_span(k, "k"), "v": _checked_span(v, "v"),
             "g": _checked_span(g, "g"), "beta": _checked_span(beta, "beta")}
    packed = varlen and nd == 3

    if scale is None:
        scale = K ** -0.5
    if not _finite_real(scale):
        raise TypeError(f"scale must be a float, finite in fp32, or None; got {scale!r}")
    if not _finite_real(lower_bound):
        raise TypeError(f"lower_bound must be a float, finite in fp32; got {lower_bound!r}")
    _check_gate_params(A_log, dt_bias, hv, K)
    if A_log is not None:
        spans["A_log"] = _checked_span(A_log, "A_log")
        spans["dt_bias"] = _checked_span(dt_bias, "dt_bias")

    if packed:
        q, k, v, g, beta = (t.unsqueeze(0) for t in (q, k, v, g, beta))
    B, T = q.shape[0], q.shape[1]
    if varlen:
        cu_seqlens = check_cu_seqlens(cu_seqlens, T, device)
        num_seqs = cu_seqlens.numel() - 1
        spans["cu_seqlens"] = _span(cu_seqlens)
    else:
        num_seqs = B
    check_state(initial_state, "initial_state", (num_seqs, hv, K, K), dtype, device)
    return Problem(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, num_seqs, K,
                   float(scale), float(lower_bound), packed, spans, device, dtype)
