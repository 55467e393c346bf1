"""Shared helpers for the kernel tests: random problems, poisoning, error metrics, tolerances."""

from __future__ import annotations

import torch

from flash_kda.reference import kda_reference

# Relative L2 tolerances vs the float64 reference, per input dtype. Inputs are rounded to the input
# dtype first and the reference is fed the *same* rounded tensors, so what remains is the kernel's
# fp32 arithmetic plus the final rounding of `out` to the input dtype (bf16 has 8 mantissa bits:
# ~2e-3 rel error per element from rounding alone).
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}
# fp32 state: only arithmetic error; an input-dtype state is additionally rounded (input and output).
STATE_TOL_FP32 = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 3e-3}
STATE_TOL_LOWP = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64; NaN anywhere (or a NaN-free ref vs NaN x) gives inf."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / max(denom, 1e-30)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element the kernel forgets to write fails the check."""
    return t.fill_(float("nan"))


def make_problem(*, B=1, T=64, hqk=2, hv=2, D=64, dtype=torch.float32, device="cpu", seqlens=None,
                 gate=True, state=False, state_dtype=torch.float32, seed=None, gen=None,
                 weak_decay=False):
    """Fresh random inputs (never zeros). With seqlens, a varlen problem [S, H, D] + cu_seqlens.

    The default decays are strong (log-decay about -2.5 per token: the state forgets within a few
    tokens). weak_decay=True makes them -0.002 to -0.02 per token, so that the state carries across
    chunks and the initial state reaches the last tokens: what the cross-chunk paths of a kernel
    need to be tested."""
    g_ = gen or torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    varlen = seqlens is not None
    S = sum(seqlens) if varlen else T
    lead = (S,) if varlen else (B, T)
    N = len(seqlens) if varlen else B

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g_) * scale)

    q = rnd(*lead, hqk, D)
    k = rnd(*lead, hqk, D)
    v = rnd(*lead, hv, D)
    beta = rnd(*lead, hv)
    if gate and weak_decay:
        g = rnd(*lead, hv, D, scale=0.5)
        A_log = torch.rand(hv, generator=g_) * 0.5 + 0.5     # exp(A_log) in (1.6, 2.7)
        dt_bias = rnd(hv, D, scale=0.3) - 4.0                 # sigmoid(~ -8): log-decay ~ -2e-3
    elif gate:
        g = rnd(*lead, hv, D)
        A_log = torch.rand(hv, generator=g_) * 2 - 1          # exp(A_log) in (0.37, 2.7)
        dt_bias = rnd(hv, D, scale=0.5)
    else:
        # a log-decay in (-5, 0], or in (-0.02, 0] when weak
        g = (-0.02 if weak_decay else -5) * torch.rand(*lead, hv, D, generator=g_)
        A_log = dt_bias = None
    h0 = rnd(N, hv, D, D, scale=0.5) if state else None
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()), dtype=torch.int32) \
        if varlen else None

    def to(t, dt):
        return None if t is None else t.to(dtype=dt).to(device)

    return dict(
        q=to(q, dtype), k=to(k, dtype), v=to(v, dtype), g=to(g, dtype), beta=to(beta, dtype),
        A_log=to(A_log, torch.float32), dt_bias=to(dt_bias, torch.float32),
        initial_state=to(h0, state_dtype), cu_seqlens=None if cu is None else cu.to(device),
    )


# fp32 states whose elements cannot move in pairs of channels (the CUDA recurrence's 8-byte path
# needs every stride even and the base 8-byte aligned): one odd stride each, or a base 4 bytes off.
UNPAIRED_STATE_LAYOUTS = ("odd-row-stride", "odd-head-stride", "odd-seq-stride", "off-8-bytes")


def unpaired_state(shape, layout: str, device, fill=lambda t: t, values=None) -> torch.Tensor:
    """An fp32 [N, H, V, K] view laid out as `layout` (UNPAIRED_STATE_LAYOUTS), its whole buffer
    passed through `fill` first (e.g. poison), then `values` (if given) copied into the view."""
    N, H, V, K = shape
    f32 = dict(dtype=torch.float32, device=device)
    if layout == "odd-row-stride":
        t = fill(torch.empty(N, H, V, K + 1, **f32))[..., :K]
    elif layout == "odd-head-stride":
        t = fill(torch.empty(N, H, V * K + 1, **f32))[..., :V * K].view(N, H, V, K)
    elif layout == "odd-seq-stride":
        t = fill(torch.empty(N, H * V * K + 1, **f32))[:, :H * V * K].view(N, H, V, K)
    elif layout == "off-8-bytes":
        t = fill(torch.empty(N * H * V * K + 1, **f32))[1:].view(N, H, V, K)
    else:
        raise ValueError(layout)
    odd = [st for st in t.stride()[:3] if st % 2 == 1]
    assert (odd or t.data_ptr() % 8 != 0) and t.stride(3) == 1, (layout, t.stride())
    if values is not None:
        t.copy_(values)
    return t


def with_fp32_gates(p32: dict, dtype) -> dict:
    """A float32 problem with q, k, v in `dtype` and g, beta left in float32 (values that 16-bit
    types do not hold): the contract allows fp32 g and beta beside 16-bit inputs, and the kernels
    read them by a path of their own."""
    p = dict(p32)
    for name in ("q", "k", "v"):
        p[name] = p32[name].to(dtype)
    return p


def reference_of(p: dict, scale=None, use_qk_l2norm=True, lower_bound=-5.0):
    return kda_reference(p["q"].cpu(), p["k"].cpu(), p["v"].cpu(), p["g"].cpu(), p["beta"].cpu(),
                         scale=scale,
                         initial_state=None if p["initial_state"] is None else p["initial_state"].cpu(),
                         cu_seqlens=None if p["cu_seqlens"] is None else p["cu_seqlens"].cpu(),
                         A_log=None if p["A_log"] is None else p["A_log"].cpu(),
                         dt_bias=None if p["dt_bias"] is None else p["dt_bias"].cpu(),
                         lower_bound=lower_bound, use_qk_l2norm=use_qk_l2norm)


def snapshot(tensors: dict) -> dict:
    """Bitwise copies (NaN-safe comparison via the raw bytes)."""
    return {k: v.detach().clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def unchanged(before: dict, tensors: dict) -> list[str]:
    changed = []
    for k, old in before.items():
        new = tensors[k]
        a = old.contiguous().view(torch.uint8) if old.numel() else old
        b = new.detach().contiguous().view(torch.uint8) if new.numel() else new
        if not torch.equal(a, b):
            changed.append(k)
    return changed


def zero_channels(p):
    """Exact zeros where a kernel that scales rows or channels by their largest magnitude has a
    zero to scale: value channel 5 in every token (a zero row of U and of the new state), key
    channel 7 over tokens 32..63 (a whole chunk of a CUDA kernel: a zero channel of K e^{γ_last-γ}
    while the state's channel 7, from the initial state, is not zero)."""
    v, k = p["v"].clone(), p["k"].clone()
    v[..., 5] = 0
    k[:, 32:64, :, 7] = 0
    p["v"], p["k"] = v, k
    return p


MAGNITUDE_CASES = ["values x1e6", "values x1e-6", "queries x1e-5, no l2norm", "near-parallel keys, beta~1"]


def far_from_one(p, case):
    """Inputs whose products leave the range of 16-bit operands (fp16: max 65504, subnormal below
    2^-14) unless a kernel scales them; returns (p, use_qk_l2norm). "values x<f>" scales v and the
    initial state by f (MAGNITUDE_CASES has 1e6 and 1e-6; any float parses); "queries x1e-5, no
    l2norm" runs raw q and k (q tiny, |k| ~ 0.1 so that the delta rule stays stable); "near-parallel
    keys, beta~1" puts every key near the first one with beta's logits raised by 4."""
    if case.startswith("values x"):
        f = float(case[len("values x"):])
        p["v"], p["initial_state"] = p["v"] * f, p["initial_state"] * f
        return p, True
    if case == "queries x1e-5, no l2norm":
        p["q"], p["k"] = p["q"] * 1e-5, p["k"] * 0.1
        return p, False
    if case == "near-parallel keys, beta~1":
        k = p["k"].float()
        p["k"] = (k[:, :1] + 0.05 * k).to(p["k"].dtype)
        p["beta"] = p["beta"] + 4.0
        return p, True
    raise ValueError(f"unknown magnitude case {case!r}")


def stepped_values(p, block=32, step=10):
    """Value channels whose magnitudes jump from block to block of `block` tokens, in four kinds
    (channel j's kind is j % 4): steady; up by 2^step in odd blocks; down by 2^step in odd blocks;
    2^-step, 1, 2^step in turn. The CUDA recurrence scales each state row into fp16 anew every
    chunk; a kernel that kept a row's scale across chunks (docs/branches/stable-units/) would have to
    change it in both directions and in some rows of a warp only. Within a block the channels stay
    within 2^(2 step) of each other, which a 16-bit operand scaled per chunk still holds (2^20 under
    fp16's 2^29 of normal range)."""
    T, D = p["v"].shape[-3], p["v"].shape[-1]
    b = (torch.arange(T) // block).to(torch.float64)[:, None]           # [T, 1]
    kind = (torch.arange(D) % 4)[None, :]                               # [1, D]
    odd = b % 2
    e = torch.where(kind == 1, step * odd, torch.where(kind == 2, -step * odd,
                    torch.where(kind == 3, step * (b % 3 - 1), torch.zeros_like(b))))
    f = torch.pow(2.0, e)[:, None, :]                                   # [T, 1, D]
    p["v"] = (p["v"].double() * f.to(p["v"].device)).to(p["v"].dtype)
    return p


def check_blocks(p, out, final, *, block=32, what):
    """out against the float64 reference by rel-L2 of each (token block, channel kind) part of the
    [B, T, H, D] output, so that a part far smaller than the rest is checked too (a whole-tensor
    rel-L2 sees only the largest parts), at twice OUT_TOL; and the fp32 final state as a whole.
    Returns (worst part's error, state's error)."""
    ref_out, ref_final = reference_of(p)
    dtype = p["v"].dtype
    tol = 2 * OUT_TOL[dtype]
    T, D = ref_out.shape[1], ref_out.shape[-1]
    worst = 0.0
    for b0 in range(0, T, block):
        for kind in range(4):
            part = (slice(None), slice(b0, b0 + block), slice(None), slice(kind, D, 4))
            e = rel_l2(out[part], ref_out[part])
            assert e <= tol, f"{what}: tokens {b0}.., channel kind {kind}: rel-L2 {e:.3e} > {tol}"
            worst = max(worst, e)
    e_st = rel_l2(final, ref_final)
    assert e_st <= STATE_TOL_FP32[dtype], f"{what}: final_state rel-L2 {e_st:.3e} > {STATE_TOL_FP32[dtype]}"
    return worst, e_st


def huge_state_channel(p):
    """An initial state of 1e30 in key channel 3 (every value row), and keys that are zero in that
    channel throughout: the state dwarfs its updates by ~2^100, so a kernel that scales the state by
    the reciprocal size of the update (to put the update in a 16-bit format's range) overflows."""
    h0, k = p["initial_state"].clone(), p["k"].clone()
    h0[..., 3] = 1e30
    k[..., 3] = 0
    p["initial_state"], p["k"] = h0, k
    return p
