"""Hypothesis strategies for whole KDA problems, shared by tests/test_properties.py (the built
kernels) and tests/test_simt.py (the CUDA bodies in the emulator). Import it only after
pytest.importorskip("hypothesis")."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from kda_testing import UNPAIRED_STATE_LAYOUTS, make_problem


def state_shape(case):
    """[N, Hv, V, K] of a drawn case's states (N: its batch or its number of sequences)."""
    return (case["B"] if "B" in case else len(case["seqlens"]), case["hv"], case["D"], case["D"])


def lengths(least):
    """Token counts up to 70, with the chunk edges of both backends (CPU 16 tokens, CUDA 32) drawn
    as often as the rest: left to themselves, hypothesis's integers favour the smallest values."""
    edges = [n for n in (15, 16, 17, 31, 32, 33, 47, 63, 64, 65) if n >= least]
    return st.one_of(st.integers(least, 70), st.sampled_from(edges))


# Where the final state goes (test_properties.run_case): returned by chunk_kda, into a tensor the
# caller gives, into the initial state itself, not asked for; with an fp32 initial state also both
# states in one of the layouts whose elements cannot move in pairs (kda_testing.UNPAIRED_STATE_LAYOUTS).
FINAL_MODES = ("returned", "given", "in-place", "dropped")


@st.composite
def problems(draw, dtypes, head_dims=(64, 128), call_options=True):
    """(case, options): keyword arguments for make_problem, and the call's own options. Without
    call_options, scale stays None (D^-1/2), lower_bound -5 and varlen inputs [S, H, D] (what the
    emulator's runner passes), and the final state is returned in a fresh tensor."""
    dtype = draw(st.sampled_from(dtypes))
    varlen = draw(st.booleans())
    hqk = draw(st.integers(1, 3))
    case = dict(
        dtype=dtype,
        D=draw(st.sampled_from(head_dims)),
        hqk=hqk,
        hv=hqk * draw(st.integers(1, 3)),  # grouped value heads
        gate=draw(st.booleans()),
        weak_decay=draw(st.booleans()),
        state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if varlen:  # empty sequences allowed, at least one token in all
        case["seqlens"] = draw(st.lists(lengths(0), min_size=1, max_size=4).filter(lambda s: sum(s) > 0))
    else:
        case["B"] = draw(st.integers(1, 3))
        case["T"] = draw(lengths(1))
    if case["state"] and dtype != torch.float32:
        case["state_dtype"] = draw(st.sampled_from([torch.float32, dtype]))
    options = dict(
        l2norm=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))) if call_options else None,
        lower_bound=draw(st.sampled_from([-5.0, -1.0, -12.0])) if call_options else -5.0,
        fp32_gates=dtype != torch.float32 and draw(st.booleans()),  # g and beta in fp32 beside 16-bit q, k, v
        padded=draw(st.booleans()),  # q, k, v, g as views into buffers with spare heads
        cu_int64=varlen and draw(st.booleans()),
        batched=varlen and call_options and draw(st.booleans()),  # varlen inputs as [1, S, H, D], not [S, H, D]
        final="returned",
    )
    if call_options:
        modes = FINAL_MODES if case["state"] else tuple(m for m in FINAL_MODES if m != "in-place")
        if case["state"] and case.get("state_dtype", torch.float32) == torch.float32:
            # (an odd head or sequence stride needs two heads or sequences to be one)
            unused = {"odd-head-stride"} if case["hv"] == 1 else set()
            unused |= {"odd-seq-stride"} if state_shape(case)[0] == 1 else set()
            modes += tuple(f"unpaired {layout}" for layout in UNPAIRED_STATE_LAYOUTS if layout not in unused)
        options["final"] = draw(st.sampled_from(modes))
    return case, options


def padded_view(t: torch.Tensor, spare: int = 3) -> torch.Tensor:
    """t's values in a view whose head axis (the one before the last) is padded by `spare` heads: only
    the last dim stays contiguous. The padding is NaN, so that a read of it shows in the results."""
    shape = list(t.shape)
    shape[-2] += spare
    big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
    view = big.narrow(-2, 1, t.shape[-2])
    view.copy_(t)
    return view


def build(device, case, options) -> dict:
    """The problem (as make_problem returns it) that a drawn (case, options) describes."""
    p = make_problem(device=device, **case)
    if options["fp32_gates"]:
        p = dict(p, g=p["g"].float(), beta=p["beta"].float())
    if not options["l2norm"]:  # |k|² ~ 1 keeps the delta rule stable without normalisation (|k|² ~ D diverges)
        p = dict(p, q=p["q"] / case["D"] ** 0.5, k=p["k"] / case["D"] ** 0.5)
    if options["padded"]:
        p = dict(p, **{n: padded_view(p[n]) for n in ("q", "k", "v", "g")})
    if options["cu_int64"]:
        p = dict(p, cu_seqlens=p["cu_seqlens"].to(torch.int64))
    if options["batched"]:
        p = dict(p, **{n: p[n].unsqueeze(0) for n in ("q", "k", "v", "g", "beta")})
    return p
