"""Property tests: problems drawn by hypothesis from every option at once, against the float64
reference.

test_correctness.py checks each option on its own (varlen, grouped heads, states, strided views,
fp32 gates, no gate, no l2norm ...). Here hypothesis combines them: a varlen batch with empty
sequences, grouped heads, an fp16 state and padded views in one call, and so on. Each example
checks what every kernel test checks (relative L2 against the float64 token-by-token reference
within the stated tolerances, outputs poisoned with NaN first) and also that the caller's inputs
are bit-for-bit unchanged. The final state is returned, written into a tensor the caller gives,
written over the initial state, not asked for, or (fp32) read and written in layouts whose elements
cannot move in pairs. Where the example fits the FlashKDA surface (gate on, l2norm on), `fwd` must
write exactly what `chunk_kda` returned.

The tensors' values come from a seed that hypothesis draws, so a failure prints everything needed
to replay it. The head dims are those the other tests build (64, 128, 256), so in a full run no
new kernel is compiled.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install '.[test]' brings it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import flash_kda  # noqa: E402
from conftest import DEVICES  # noqa: E402
from drawn_problems import build, lengths, problems, state_shape  # noqa: E402
from kda_testing import (OUT_TOL, STATE_TOL_FP32, STATE_TOL_LOWP, make_problem, poison, reference_of, rel_l2,
                         snapshot, unchanged, unpaired_state)  # noqa: E402

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GPU_DTYPES = (torch.bfloat16, torch.float16)


def spares_intact(view) -> bool:
    """The elements of view's buffer outside the view are all still NaN, and the view holds none:
    nothing written beside an unpaired state, every element of it written."""
    base = view._base
    return int(torch.isnan(base).sum()) == base.numel() - view.numel() and not bool(torch.isnan(view).any())


def final_destination(p, case, mode, device):
    """(p with the initial state as `mode` lays it out, the final_state argument, output_final_state)
    for a FINAL_MODES mode or "unpaired <layout>" (tests/drawn_problems.py)."""
    h0 = p["initial_state"]
    if mode == "returned":
        return p, None, True
    if mode == "dropped":
        return p, None, False
    if mode == "given":
        dtype = torch.float32 if h0 is None else h0.dtype
        return p, poison(torch.empty(state_shape(case), dtype=dtype, device=device)), True
    if mode == "in-place":
        return p, h0, True
    layout = mode.split(" ", 1)[1]  # "unpaired <layout>": both states laid out so
    initial = unpaired_state(state_shape(case), layout, device, fill=poison, values=h0)
    return dict(p, initial_state=initial), unpaired_state(state_shape(case), layout, device, fill=poison), True


def run_case(device, case, options):
    p = build(device, case, options)
    dtype = case["dtype"]
    lower_bound = options["lower_bound"]
    ref_out, ref_final = reference_of(p, scale=options["scale"], use_qk_l2norm=options["l2norm"],
                                      lower_bound=lower_bound)
    p, final_arg, want_final = final_destination(p, case, options["final"], device)
    in_place = options["final"] == "in-place"
    layout = options["final"].split(" ", 1)[1] if options["final"].startswith("unpaired") else None
    before = snapshot(p)
    inputs = {k: v for k, v in before.items() if not (in_place and k == "initial_state")}
    out = poison(torch.empty(p["v"].shape, dtype=p["v"].dtype, device=device))
    res = flash_kda.chunk_kda(
        p["q"], p["k"], p["v"], p["g"], p["beta"], scale=options["scale"], initial_state=p["initial_state"],
        output_final_state=want_final, cu_seqlens=p["cu_seqlens"], A_log=p["A_log"], dt_bias=p["dt_bias"],
        lower_bound=lower_bound, use_qk_l2norm_in_kernel=options["l2norm"], output=out, final_state=final_arg)
    got, final = res if want_final else (res, None)
    assert got.data_ptr() == out.data_ptr()
    assert unchanged(inputs, p) == [], "chunk_kda changed an input"
    if final is not None:
        h0 = p["initial_state"]
        want_dtype = final_arg.dtype if final_arg is not None else torch.float32 if h0 is None else h0.dtype
        assert final.dtype == want_dtype and tuple(final.shape) == state_shape(case), (final.dtype, final.shape)
    if final_arg is not None:
        assert final.data_ptr() == final_arg.data_ptr(), "final_state not written where it was given"
    if layout is not None:
        assert spares_intact(p["initial_state"]) and spares_intact(final), "beside an unpaired state"

    e_out = rel_l2(out, ref_out)
    assert e_out <= OUT_TOL[dtype], f"out rel-L2 {e_out:.3e} > {OUT_TOL[dtype]}"
    if final is not None:
        tol = STATE_TOL_FP32[dtype] if final.dtype == torch.float32 else STATE_TOL_LOWP[dtype]
        e_state = rel_l2(final, ref_final)
        assert e_state <= tol, f"final_state ({final.dtype}) rel-L2 {e_state:.3e} > {tol}"

    if case["gate"] and options["l2norm"]:  # the FlashKDA surface: same bits as chunk_kda
        if in_place:  # chunk_kda's result aside, the initial state back
            final = final.clone()
            p["initial_state"].copy_(before["initial_state"])
        out2 = poison(torch.empty_like(out))
        if final is None:
            final2 = None
        elif in_place:
            final2 = p["initial_state"]
        elif layout is not None:
            final2 = unpaired_state(state_shape(case), layout, device, fill=poison)
        else:
            final2 = poison(torch.empty_like(final))
        scale = options["scale"] if options["scale"] is not None else case["D"] ** -0.5
        ret = flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], scale, out2, p["A_log"], p["dt_bias"],
                            lower_bound, initial_state=p["initial_state"], final_state=final2,
                            cu_seqlens=p["cu_seqlens"])
        assert ret is None
        assert torch.equal(out2, out), "fwd and chunk_kda differ (out)"
        assert final is None or torch.equal(final2, final), "fwd and chunk_kda differ (final state)"
        assert unchanged(inputs, p) == [], "fwd changed an input"
        if layout is not None:
            assert spares_intact(final2), "fwd wrote beside an unpaired final state"


@pytest.mark.parametrize("device", DEVICES)
def test_combined_options_match_the_reference(device):
    dtypes = ALL_DTYPES if device == "cpu" else GPU_DTYPES

    # (deadline: the first examples may load kernels)
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems(dtypes, head_dims=(64, 128, 256)))
    def check(drawn):
        case, options = drawn
        run_case(device, case, options)

    check()


@st.composite
def offsets(draw):
    """(total tokens S, a cu_seqlens value list): valid ones (0, cut points, S) and corrupted ones
    (any integers, a huge or negative boundary, two boundaries swapped)."""
    S = draw(lengths(1))
    cuts = sorted(draw(st.lists(st.integers(0, S), min_size=0, max_size=3)))
    values = [0, *cuts, S]
    how = draw(st.sampled_from(["valid", "any", "huge", "swap"]))
    if how == "any":
        values = draw(st.lists(st.integers(-3, S + 3), min_size=2, max_size=5))
    elif how == "huge":
        i = draw(st.integers(0, len(values) - 1))
        values[i] = draw(st.sampled_from([-2**40, -2**31, -1, S + 1, 2**31 - 1, 2**31, 2**40]))
    elif how == "swap" and len(values) > 2:
        i = draw(st.integers(0, len(values) - 2))
        values[i], values[i + 1] = values[i + 1], values[i]
    return S, values


def well_formed(values, S) -> bool:
    return values[0] == 0 and values[-1] == S and all(a <= b for a, b in zip(values, values[1:]))


def call_entry(entry, p, cu, out, final):
    if entry == "chunk_kda":
        flash_kda.chunk_kda(p["q"], p["k"], p["v"], p["g"], p["beta"], initial_state=p["initial_state"],
                            output_final_state=True, cu_seqlens=cu, A_log=p["A_log"], dt_bias=p["dt_bias"],
                            output=out, final_state=final)
    else:
        flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 64 ** -0.5, out, p["A_log"], p["dt_bias"], -5.0,
                      initial_state=p["initial_state"], final_state=final, cu_seqlens=cu)


def refused_untouched(entry, p, cu, out, final):
    """The call raises ValueError and leaves every tensor, out and final_state included, as it was."""
    tensors = dict(p, cu=cu, out=out, final=final)
    before = snapshot(tensors)
    with pytest.raises(ValueError, match="cu_seqlens"):
        call_entry(entry, p, cu, out, final)
    assert unchanged(before, tensors) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["chunk_kda", "fwd"])
def test_any_cu_seqlens_is_refused_or_correct(device, entry):
    """Whatever integers cu_seqlens holds: a ValueError with nothing written, or (well formed) the
    reference's result. Then the same tensor, changed in place to end one token late, is refused
    too: on a GPU the last device cu_seqlens that passed is remembered (a read waits for the
    stream), and an in-place write must make the next call read it again."""

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(offsets(), st.integers(0, 2**31 - 1), st.booleans())
    def check(drawn, seed, batched):
        S, values = drawn
        fits32 = all(-2**31 <= x < 2**31 for x in values)
        cu = torch.tensor(values, dtype=torch.int32 if fits32 else torch.int64, device=device)
        N = len(values) - 1
        p = make_problem(seqlens=[S], hqk=1, hv=2, D=64, dtype=torch.bfloat16, device=device, state=True,
                         seed=seed)  # S tokens; cu (below) cuts them into N sequences
        p["initial_state"] = p["initial_state"].expand(N, -1, -1, -1).contiguous()
        p["cu_seqlens"] = cu
        if batched:  # [1, S, H, D], the layout fwd's unchecked path takes
            p.update({n: p[n].unsqueeze(0) for n in ("q", "k", "v", "g", "beta")})
        out = torch.full_like(p["v"], 7.0)
        final = torch.full_like(p["initial_state"], 3.0)
        if not well_formed(values, S):
            refused_untouched(entry, p, cu, out, final)
            return
        poison(out), poison(final)
        call_entry(entry, p, cu, out, final)
        ref_out, ref_final = reference_of(p)
        assert rel_l2(out, ref_out) <= OUT_TOL[torch.bfloat16]
        assert rel_l2(final, ref_final) <= STATE_TOL_FP32[torch.bfloat16]
        cu[-1] += 1  # an in-place write: one token past the end
        refused_untouched(entry, p, cu, out, final)

    check()
