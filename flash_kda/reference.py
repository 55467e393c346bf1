"""The contract's token-by-token KDA recurrence in plain PyTorch: the oracle of every test.

Written for clarity, not speed: one step per token, vectorised over batch and heads, in whatever
dtype is asked for (float64 in the tests). It follows ``shared/CONTRACT.md`` line by line:

    q̂ = q / sqrt(Σq² + 1e-6), k̂ likewise            (if use_qk_l2norm)
    a  = lower_bound · sigmoid(exp(A_log) · (g + dt_bias))  (gate parameters given)
    a  = g                                            (otherwise: g is already a log-decay)
    b  = sigmoid(beta)
    S  = S · diag(exp(a));  S = S + b (v − S k̂) k̂ᵀ;  o = S (scale · q̂)

States are value-major, ``[N, Hv, V, K]``.
"""

from __future__ import annotations

import torch

__all__ = ["kda_reference", "l2norm", "gate_log_decay"]


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σx² + 1e-6) over the last dim (the contract's normalisation, eps inside the sqrt)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gate_log_decay(g, A_log=None, dt_bias=None, lower_bound=-5.0):
    """Per-channel log-decay a_t; g is [..., Hv, K], A_log [Hv], dt_bias [Hv, K]."""
    if A_log is None:
        return g
    return lower_bound * torch.sigmoid(A_log.exp()[:, None] * (g + dt_bias))


def _recurrence(q, k, v, a, b, scale, S):
    """q, k, a: [B, T, Hv, K]; v: [B, T, Hv, V]; b: [B, T, Hv]; S: [B, Hv, V, K] (updated copy)."""
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        S = S * a[:, t].exp()[:, :, None, :]
        kt = k[:, t]
        pred = torch.einsum("bhvk,bhk->bhv", S, kt)
        S = S + torch.einsum("bhv,bhk->bhvk", b[:, t, :, None] * (v[:, t] - pred), kt)
        out[:, t] = torch.einsum("bhvk,bhk->bhv", S, scale * q[:, t])
    return out, S


def kda_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float = -5.0,
    use_qk_l2norm: bool = True,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, final_state)`` in ``dtype``, on the inputs' device.

    Layouts as in the contract: dense ``[B, T, H, D]``; varlen ``[S, H, D]`` or ``[1, S, H, D]``
    with ``cu_seqlens``. ``final_state`` is ``[N, Hv, V, K]`` (always returned).
    """
    varlen = cu_seqlens is not None
    packed = varlen and q.dim() == 3  # [S, H, D]: give the output back in the same layout
    if packed:
        q, k, v, g, beta = (x.unsqueeze(0) for x in (q, k, v, g, beta))
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    hqk, hv, K, V = q.shape[2], v.shape[2], q.shape[-1], v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    # grouped value heads: value head h reads query/key head h // (hv // hqk)
    q = q.repeat_interleave(hv // hqk, dim=2)
    k = k.repeat_interleave(hv // hqk, dim=2)
    a = gate_log_decay(
        g,
        None if A_log is None else A_log.to(dtype),
        None if dt_bias is None else dt_bias.to(dtype),
        lower_bound,
    )
    b = torch.sigmoid(beta)

    if not varlen:
        B = q.shape[0]
        S0 = (torch.zeros(B, hv, V, K, dtype=dtype, device=q.device) if initial_state is None
              else initial_state.to(dtype))
        return _recurrence(q, k, v, a, b, scale, S0)

    bounds = [int(x) for x in cu_seqlens.tolist()]
    N = len(bounds) - 1
    out = torch.zeros_like(v)
    states = []
    for n in range(N):
        lo, hi = bounds[n], bounds[n + 1]
        S0 = (torch.zeros(1, hv, V, K, dtype=dtype, device=q.device) if initial_state is None
              else initial_state[n : n + 1].to(dtype))
        sl = slice(lo, hi)
        o_n, S_n = _recurrence(q[:, sl], k[:, sl], v[:, sl], a[:, sl], b[:, sl], scale, S0)
        out[:, sl] = o_n
        states.append(S_n)
    final = torch.cat(states) if states else torch.zeros(0, hv, V, K, dtype=dtype, device=q.device)
    return (out[0] if packed else out), final
