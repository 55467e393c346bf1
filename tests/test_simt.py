"""The CUDA kernels' device code, run on the CPU by a SIMT emulator (tests/simt).

The three CUDA bodies — the two-kernel form (kda_chunk_split.cuh: preparation and recurrence), the
fused tensor-core body (kda_chunk_tc.cuh) and the portable body (kda_chunk_portable.cuh, also the
MUSA one) — are compiled by the host C++ compiler against tests/simt/simt.h, which stands in for port.cuh, ptx.cuh
and the CUDA built-ins: each CUDA thread is a fiber, warp operations (shuffles, mma.sync) are
emulated lane by lane, shared memory starts as NaN or 1e30. The real binding.cpp is compiled with
it, so the op is called exactly like a kernel. Every layout the GPU can pick is run against the
float64 reference, with poisoned outputs.

This checks the kernels' logic (indexing, fragment layouts, record offsets, phases, barriers) on
any machine; it says nothing about speed, and nothing about races or memory ordering (threads
switch only at barriers, in a fixed order): compute-sanitizer does that on a GPU. See
tests/simt/README.md.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

from kda_testing import (MAGNITUDE_CASES, OUT_TOL, STATE_TOL_FP32, STATE_TOL_LOWP, UNPAIRED_STATE_LAYOUTS,
                         check_blocks, far_from_one, make_problem, poison, reference_of, rel_l2,
                         huge_state_channel, stepped_values, unpaired_state, with_fp32_gates, zero_channels)

if not sys.platform.startswith("linux"):
    pytest.skip("the SIMT emulator uses ucontext fibers (Linux)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "flash_kda" / "csrc"
SIMT = Path(__file__).resolve().parent / "simt"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# (head dim, input dtype) -> the op, built once per session
_ops: dict = {}


def sim_op(D: int, dtype: torch.dtype):
    key = (D, dtype)
    if key not in _ops:
        from torch.utils.cpp_extension import load
        name = f"kda_fwd_simt_d{D}_{DTYPE_NAMES[dtype]}"
        build = Path(os.environ["FLASH_KDA_CACHE_DIR"]) / "simt" / name
        build.mkdir(parents=True, exist_ok=True)
        load(name=f"flash_kda_{name}", sources=[str(CSRC / "binding.cpp"), str(SIMT / "cuda_sim.cpp")],
             extra_cflags=["-O1", "-std=c++17", "-DFLASH_KDA_BACKEND_CPU", f"-DFLASH_KDA_HEAD_DIM={D}",
                           f"-DFLASH_KDA_DTYPE_{DTYPE_NAMES[dtype].upper()}",
                           f"-DFLASH_KDA_OP_NAME={name}", f"-I{CSRC}", f"-I{SIMT}"],
             build_directory=str(build), is_python_module=False, verbose=False)
        _ops[key] = getattr(torch.ops.flash_kda_kernels, name)
    return _ops[key]


def run(p, *, D, dtype, layout=None, state_dtype=torch.float32, use_qk_l2norm=True, monkeypatch, final=None):
    """The sim op on problem p (as make_problem returns it); returns (out, final_state).
    layout: FLASH_KDA_SIM_* settings (tests/simt/cuda_sim.cpp), e.g. {"FORM": "fused", "VS": 32}.
    final: the final state's destination (poisoned here when not given)."""
    for key, value in (layout or {}).items():
        monkeypatch.setenv(f"FLASH_KDA_SIM_{key}", str(value))
    varlen = p["cu_seqlens"] is not None
    as4 = (lambda t: t.unsqueeze(0)) if varlen else (lambda t: t)
    N = p["cu_seqlens"].numel() - 1 if varlen else p["q"].shape[0]
    hv = p["v"].shape[-2]
    out = poison(torch.empty_like(p["v"]))
    final = poison(torch.empty(N, hv, D, D, dtype=state_dtype)) if final is None else final
    h0 = p["initial_state"]
    sim_op(D, dtype)(as4(p["q"]), as4(p["k"]), as4(p["v"]), as4(p["g"]), as4(p["beta"]), p["A_log"],
                     p["dt_bias"], None if h0 is None else h0.to(state_dtype), final, as4(out),
                     p["cu_seqlens"], D ** -0.5, -5.0, use_qk_l2norm, False, None)
    return out, final


def check(p, out, final, *, what, use_qk_l2norm=True):
    ref_out, ref_final = reference_of(p, use_qk_l2norm=use_qk_l2norm)
    dtype = p["v"].dtype
    e_out, e_st = rel_l2(out, ref_out), rel_l2(final, ref_final)
    print(f"[simt] {what}: out rel-L2 {e_out:.2e}, final_state ({final.dtype}) {e_st:.2e}")
    assert e_out <= OUT_TOL[dtype], f"{what}: out rel-L2 {e_out:.3e} > {OUT_TOL[dtype]}"
    tol = STATE_TOL_FP32[dtype] if final.dtype == torch.float32 else STATE_TOL_LOWP[dtype]
    assert e_st <= tol, f"{what}: final_state rel-L2 {e_st:.3e} > {tol}"


def seed() -> int:
    return random.SystemRandom().randrange(2**31)


# Every layout kda_cuda.cu can launch: (head dim, FLASH_KDA_SIM_* settings). The split form's
# recurrence runs its products as sm_90a does (wgmma where the layout allows: VS 64 and 128 at
# D <= 128) and, with MMA=mma16, as the other archs do.
def _split(D, vs, prep, mma="auto", stages=2):
    return (D, {"FORM": "split", "VS": vs, "PREP_THREADS": prep, "MMA": mma, "STAGES": stages})


LAYOUTS = ([_split(64, 64, 256), _split(64, 32, 256), _split(128, 128, 512), _split(128, 64, 512),
            _split(128, 32, 512), _split(128, 128, 256), _split(256, 64, 512), _split(256, 32, 256),
            _split(256, 64, 512, stages=1), _split(256, 32, 256, stages=1),
            _split(64, 64, 256, "mma16"), _split(128, 128, 512, "mma16"),
            _split(128, 64, 512, "mma16")]
           + [(D, {"FORM": "fused", "VS": vs}) for D, vs in [(64, 64), (64, 32), (128, 128), (128, 32),
                                                             (256, 64), (256, 32)]]
           + [(D, {"FORM": "portable", "PORTABLE": w}) for D in (64, 128, 256)
              for w in ("wide", "narrow", "compact")])


def _layout_id(case):
    D, s = case
    return f"D{D}-" + "-".join(str(v) for v in s.values())


@pytest.mark.parametrize("D,layout", LAYOUTS, ids=[_layout_id(c) for c in LAYOUTS])
def test_layouts(D, layout, monkeypatch):
    """Dense, two value heads per query/key head, a partial last chunk, fp32 states in and out,
    weak decays (the state and the initial state carry across chunks)."""
    s = seed()
    p = make_problem(B=2, T=70, hqk=1, hv=2, D=D, dtype=torch.bfloat16, state=True, seed=s,
                     weak_decay=True)
    out, final = run(p, D=D, dtype=torch.bfloat16, layout=layout, monkeypatch=monkeypatch)
    check(p, out, final, what=f"D={D} {layout} (seed {s})")


# (head dim, recurrence V slice, preparation threads, states, operand buffers): one split layout per
# head dim, plus a narrow slice and the 256-thread preparation at D = 128, and D = 256 with each of
# its buffer counts; each with one kind of state (fp32 in and out, bf16 in and out, none in).
PIECE_CASES = [(64, 32, 256, "bf16", 2), (128, 128, 512, "fp32", 2), (128, 64, 256, "none", 2),
               (256, 64, 512, "fp32", 2), (256, 64, 512, "fp32", 1)]


@pytest.mark.parametrize("D,vs,prep,states,stages", PIECE_CASES,
                         ids=[f"D{d}-VS{v}-prep{t}-{st}" + ("" if n == 2 else f"-stages{n}")
                              for d, v, t, st, n in PIECE_CASES])
def test_pieces_match_one_piece(D, vs, prep, states, stages, monkeypatch):
    """A dense call cut into stretches of chunks (FLASH_KDA_CUDA_PIECES on a GPU; here the pieces
    run one after the other): each stretch's preparation covers only its chunks, each recurrence
    starts from the state the previous one left in the carry (fp32). 150 tokens are 5 chunks:
    3 pieces are [0, 1) + [1, 3) + [3, 5) (stretches starting at odd chunks), 9 are cut to 5 of one
    chunk each; 3 pieces also with every preparation run before any recurrence (legal on a GPU).
    The arithmetic is the same as in one piece, so the outputs must be identical bit for bit, and
    within the tolerances of the float64 reference. The scratch starts as NaN
    (cuda_sim.cpp), so a stretch reading a record or carry its predecessors did not write fails."""
    layout = {"FORM": "split", "VS": vs, "PREP_THREADS": prep, "STAGES": stages}
    state_dtype = torch.bfloat16 if states == "bf16" else torch.float32
    s = seed()
    p = make_problem(B=2, T=150, hqk=1, hv=2, D=D, dtype=torch.bfloat16, state=states != "none",
                     state_dtype=state_dtype, seed=s, weak_decay=True)
    whole = run(p, D=D, dtype=torch.bfloat16, layout={**layout, "PIECES": 1}, state_dtype=state_dtype,
                monkeypatch=monkeypatch)
    check(p, *whole, what=f"D={D} VS={vs} one piece, states {states} (seed {s})")
    # Preparation i + 1 may run before recurrence i on a GPU: both extreme orders (cuda_sim.cpp).
    for pieces, order in ((3, "enqueued"), (9, "enqueued"), (3, "preps-first")):
        cut = run(p, D=D, dtype=torch.bfloat16, layout={**layout, "PIECES": pieces, "PIECE_ORDER": order},
                  state_dtype=state_dtype, monkeypatch=monkeypatch)
        assert torch.equal(cut[0], whole[0]), f"{pieces} pieces, {order}: output differs from one piece (seed {s})"
        assert torch.equal(cut[1], whole[1]), f"{pieces} pieces, {order}: final state differs (seed {s})"


def test_pieces_schedule(monkeypatch, capfd):
    """The schedule the launcher enqueues (tc::enqueue_pieces, shared with kda_cuda.cu), as the
    emulator traces it: 150 tokens = 5 chunks; 3 pieces are three preparation/recurrence pairs, the
    last recurrence running to the end; 9 pieces are cut to 5; k < 2 stays whole. Varlen calls are cut
    along their record slots: [70, 80] has 150 // 32 + 2 = 6 (sequence 1's first chunk is slot 3)."""
    p = make_problem(B=1, T=150, hqk=1, hv=1, D=64, dtype=torch.bfloat16, seed=seed())
    pv = make_problem(seqlens=[70, 80], hqk=1, hv=1, D=64, dtype=torch.bfloat16, seed=seed())
    whole = ["sim: prep [0, 9223372036854775807)", "sim: recurrence [0, end) carry none"]
    cases = [(p, 3, ["sim: prep [0, 1)", "sim: recurrence [0, 1) carry yes", "sim: prep [1, 3)",
                     "sim: recurrence [1, 3) carry yes", "sim: prep [3, 5)", "sim: recurrence [3, end) carry yes"]),
             (p, 9, [line for c in range(5) for line in (f"sim: prep [{c}, {c + 1})",
                     f"sim: recurrence [{c}, {'end' if c == 4 else c + 1}) carry yes")]),
             (p, 1, whole), (p, 0, whole), (pv, 1, whole),
             (pv, 3, ["sim: prep [0, 2)", "sim: recurrence [0, 2) carry yes", "sim: prep [2, 4)",
                      "sim: recurrence [2, 4) carry yes", "sim: prep [4, 6)", "sim: recurrence [4, end) carry yes"])]
    for problem, pieces, expected in cases:
        capfd.readouterr()
        run(problem, D=64, dtype=torch.bfloat16, layout={"FORM": "split", "PIECES": pieces, "TRACE": 1},
            monkeypatch=monkeypatch)
        lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("sim: ")]
        assert lines == expected, f"{pieces} pieces, {'varlen' if problem is pv else 'dense'}: {lines}"


# (head dim, recurrence V slice, preparation threads, states) for varlen calls cut into pieces
VARLEN_PIECE_CASES = [(64, 64, 256, "fp32"), (128, 128, 512, "bf16")]


@pytest.mark.parametrize("D,vs,prep,states", VARLEN_PIECE_CASES,
                         ids=[f"D{d}-VS{v}-prep{t}-{st}" for d, v, t, st in VARLEN_PIECE_CASES])
def test_varlen_pieces_match_one_piece(D, vs, prep, states, monkeypatch):
    """A varlen call cut into stretches of record slots (the host cannot see the sequences' lengths,
    but slot_base numbers the slots without them): each sequence runs its chunks whose slots fall in
    a stretch, carrying its state to the next stretch in fp32. Sequences [70, 0, 1, 100, 33] take
    slots 0-2, none (slot 3 stays unused), 4, 5-8 and 9-10 of 11: so stretches end inside a sequence,
    between sequences, and hold an empty sequence (whose final state is its initial state, copied
    once), a one-token sequence, a sequence wholly inside one stretch and one over three. Pieces
    2, 3, 4, 11 (one slot each) and 20 (cut to 11), and 3 with every preparation first: bit for bit
    the one-piece result, which is checked against the float64 reference. The scratch starts as NaN
    (cuda_sim.cpp), so a record or carry read before it is written fails."""
    layout = {"FORM": "split", "VS": vs, "PREP_THREADS": prep}
    state_dtype = torch.bfloat16 if states == "bf16" else torch.float32
    s = seed()
    p = make_problem(seqlens=[70, 0, 1, 100, 33], hqk=1, hv=2, D=D, dtype=torch.bfloat16, state=True,
                     state_dtype=state_dtype, seed=s, weak_decay=True)
    whole = run(p, D=D, dtype=torch.bfloat16, layout={**layout, "PIECES": 1}, state_dtype=state_dtype,
                monkeypatch=monkeypatch)
    check(p, *whole, what=f"varlen D={D} VS={vs} one piece, states {states} (seed {s})")
    for pieces, order in ((2, "enqueued"), (3, "enqueued"), (4, "enqueued"), (11, "enqueued"), (20, "enqueued"),
                          (3, "preps-first")):
        cut = run(p, D=D, dtype=torch.bfloat16, layout={**layout, "PIECES": pieces, "PIECE_ORDER": order},
                  state_dtype=state_dtype, monkeypatch=monkeypatch)
        what = f"varlen, {pieces} pieces, {order} (seed {s})"
        assert torch.equal(cut[0], whole[0]), f"{what}: output differs from one piece"
        assert torch.equal(cut[1], whole[1]), f"{what}: final state differs from one piece"


VARLEN_LOOKUP_CASES = {
    # lengths that repeat (the order's ties) and an empty sequence: one round of the slot search
    "ties": [33, 70, 33, 0, 70, 5, 70],
    # 30 sequences, the most that one round of loads covers (boundaries 0..30 in lanes 0..30); the
    # last one long (many slots), the one before it empty
    "30": [(7 * i) % 41 for i in range(28)] + [0, 150],
    # 31 sequences: two rounds (the second holds the answer's two boundaries); the last one empty
    "31": [(7 * i) % 41 for i in range(29)] + [97, 0],
    # 45 sequences of 0..40 tokens: two rounds of the slot search; the recurrence keeps batch order
    "many": [(7 * i) % 41 for i in range(45)],
}


@pytest.mark.parametrize("case", list(VARLEN_LOOKUP_CASES))
def test_varlen_slot_search_and_longest_first(case, monkeypatch):
    """Varlen bookkeeping of the split form. A preparation block finds its slot's sequence, chunk
    and tokens by a 32-way search across the warp's lanes (varlen_slot), and the recurrence takes the
    sequences longest first (longest_first: up to 32 sequences, ties in batch order; more keep batch
    order). A block given the wrong sequence leaves another's output unwritten (NaN from the
    poisoned destination) or computes it from the wrong tokens: both fail the reference check."""
    s = seed()
    p = make_problem(seqlens=VARLEN_LOOKUP_CASES[case], hqk=1, hv=2, D=64, dtype=torch.bfloat16, state=True,
                     seed=s, weak_decay=True)
    out, final = run(p, D=64, dtype=torch.bfloat16, layout={"FORM": "split", "VS": 32}, monkeypatch=monkeypatch)
    check(p, out, final, what=f"varlen {case} (seed {s})")


@pytest.mark.parametrize("form", ["split", "fused"])
def test_odd_head_and_sequence_counts(form, monkeypatch):
    """Three sequences of three chunks, six value heads over two query/key heads (groups of three):
    the preparation splits its block index by FastDiv (fast_div.h) with divisors that are not
    powers of two; every (sequence, chunk, head) must land on its own tokens and record."""
    s = seed()
    p = make_problem(B=3, T=70, hqk=2, hv=6, D=64, dtype=torch.bfloat16, state=True, seed=s,
                     weak_decay=True)
    out, final = run(p, D=64, dtype=torch.bfloat16, layout={"FORM": form, "VS": 32}, monkeypatch=monkeypatch)
    check(p, out, final, what=f"B=3 hqk=2 hv=6 {form} (seed {s})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_varlen_and_state_dtypes(dtype, monkeypatch):
    """Varlen with an empty and a one-token sequence; states in the input dtype; no gate
    parameters (g is the log-decay)."""
    s = seed()
    p = make_problem(seqlens=[33, 0, 1, 64, 17], hqk=2, hv=2, D=128, dtype=dtype, state=True,
                     state_dtype=dtype, gate=False, seed=s, weak_decay=True)
    out, final = run(p, D=128, dtype=dtype, state_dtype=dtype, monkeypatch=monkeypatch)
    check(p, out, final, what=f"varlen {dtype} (seed {s})")


@pytest.mark.parametrize("layout", ("contiguous",) + UNPAIRED_STATE_LAYOUTS)
def test_fp32_state_layouts(layout, monkeypatch):
    """The recurrence moves fp32 states in pairs of channels (8-byte accesses) where every stride is
    even and the base 8-byte aligned, one element at a time otherwise. The emulator's 8-byte
    accesses throw on a misaligned address as the hardware faults, so a pair path taken where it
    must not be fails here; both paths must give the reference's results (final state poisoned)."""
    s = seed()
    p = make_problem(seqlens=[40, 75], hqk=1, hv=2, D=128, dtype=torch.bfloat16, state=True, seed=s,
                     weak_decay=True)
    h0 = p["initial_state"]
    if layout == "contiguous":
        final = poison(torch.empty_like(h0))
    else:
        initial = unpaired_state(h0.shape, layout, "cpu", values=h0)
        p = dict(p, initial_state=initial)
        final = unpaired_state(h0.shape, layout, "cpu", fill=poison)
    out, got = run(p, D=128, dtype=torch.bfloat16, layout={"FORM": "split", "VS": 64}, final=final,
                   monkeypatch=monkeypatch)
    assert got is final
    check(p, out, final, what=f"fp32 states, {layout} (seed {s})")


@pytest.mark.parametrize("form", ["split", "fused", "portable"])
def test_fp32_g_and_beta(form, monkeypatch):
    """g and beta in float32 beside bf16 q, k, v, with and without gate parameters: the loaders'
    fp32 read paths (as test_correctness.test_fp32_g_and_beta_beside_16bit_inputs)."""
    for gate in (True, False):
        s = seed()
        p32 = make_problem(seqlens=[45, 70], hqk=2, hv=2, D=64, dtype=torch.float32, state=True,
                           gate=gate, seed=s, weak_decay=True)
        p = with_fp32_gates(p32, torch.bfloat16)
        out, final = run(p, D=64, dtype=torch.bfloat16, layout={"FORM": form}, monkeypatch=monkeypatch)
        check(p, out, final, what=f"fp32 g, beta, gate={gate}, {form} (seed {s})")


@pytest.mark.parametrize("case", MAGNITUDE_CASES)
def test_magnitudes_far_from_one(case, monkeypatch):
    """As test_correctness.test_magnitudes_far_from_one, on the emulated CUDA kernels."""
    s = seed()
    p, l2 = far_from_one(make_problem(B=1, T=96, hqk=2, hv=2, D=128, dtype=torch.bfloat16, state=True, seed=s),
                         case)
    out, final = run(p, D=128, dtype=torch.bfloat16, use_qk_l2norm=l2, monkeypatch=monkeypatch)
    check(p, out, final, what=f"{case} (seed {s})", use_qk_l2norm=l2)


@pytest.mark.parametrize("weak_decay", [False, True], ids=["strong-decay", "weak-decay"])
@pytest.mark.parametrize("D,layout", [(128, {"FORM": "split", "VS": 64}),
                                      (128, {"FORM": "split", "VS": 128}),
                                      (128, {"FORM": "split", "VS": 64, "MMA": "mma16"}),
                                      (64, {"FORM": "split", "VS": 32})],
                         ids=["VS64-in-step", "VS128-plain", "VS64-mma16", "D64-VS32"])
def test_state_units_follow_value_steps(D, layout, weak_decay, monkeypatch):
    """kda_testing.stepped_values: state rows whose update's scale jumps by 2^10 or 2^20 between
    chunks, up and down, beside steady rows in the same warp; each row's scales must follow (a
    per-row scale kept across chunks, docs/branches/stable-units/, failed it under two mutations).
    Checked per token block and channel kind, so small parts count. (VS 64 at D = 128 runs the
    in-step form, its decay beside the first products; VS 128 the plain wgmma form; the others
    mma16.)"""
    s = seed()
    p = stepped_values(make_problem(B=1, T=320, hqk=2, hv=2, D=D, dtype=torch.bfloat16, state=True, seed=s,
                                    weak_decay=weak_decay))
    out, final = run(p, D=D, dtype=torch.bfloat16, layout=layout, monkeypatch=monkeypatch)
    worst, e_st = check_blocks(p, out, final, what=f"stepped values (seed {s})")
    print(f"[simt] stepped values: worst block out rel-L2 {worst:.2e}, final_state {e_st:.2e}")


@pytest.mark.parametrize("form", ["split", "fused"])
@pytest.mark.parametrize("case", ["zero channels", "huge state channel"])
def test_zeros_and_huge_states(case, form, monkeypatch):
    """As test_correctness.test_zeros_and_huge_states, on the emulated kernels."""
    s = seed()
    edit = zero_channels if case == "zero channels" else huge_state_channel
    p = edit(make_problem(B=1, T=96, hqk=2, hv=2, D=128, dtype=torch.bfloat16, state=True, seed=s,
                          weak_decay=True))
    out, final = run(p, D=128, dtype=torch.bfloat16, layout={"FORM": form}, monkeypatch=monkeypatch)
    check(p, out, final, what=f"{form}, {case} (seed {s})")


@pytest.mark.parametrize("D,layout", [(128, {"FORM": "split", "VS": 64, "PREP_THREADS": 512}),
                                      (128, {"FORM": "split", "VS": 128, "PREP_THREADS": 256}),
                                      (64, {"FORM": "fused", "VS": 32}),
                                      (128, {"FORM": "portable", "PORTABLE": "narrow"})],
                         ids=["split-VS64", "split-prep256", "fused-D64", "portable"])
def test_results_do_not_depend_on_thread_order(D, layout, monkeypatch):
    """The same inputs with the fibers resumed forward, in reverse and shuffled: the outputs must
    be identical bit for bit. A difference means threads that touch the same shared memory between
    two barriers, one of them writing (a race, such as session 6's cumulative-sum variant had)."""
    p = make_problem(seqlens=[45, 1, 64], hqk=1, hv=2, D=D, dtype=torch.bfloat16, state=True,
                     seed=seed(), weak_decay=True)
    results = {}
    for order in ("forward", "reverse", "shuffle"):
        monkeypatch.setenv("FLASH_KDA_SIM_SEED", str(seed()))
        results[order] = run(p, D=D, dtype=torch.bfloat16, layout={**layout, "ORDER": order},
                             monkeypatch=monkeypatch)
    out, final = results["forward"]
    assert not torch.isnan(out).any() and not torch.isnan(final).any()
    for order in ("reverse", "shuffle"):
        assert torch.equal(results[order][0], out), f"output differs with {order} thread order"
        assert torch.equal(results[order][1], final), f"final state differs with {order} thread order"


@pytest.mark.parametrize("form", ["split", "fused"])
@pytest.mark.parametrize("case", ["unaligned inputs", "unaligned dt_bias", "g=-1000"])
def test_load_paths_and_decay_fallback(form, case, monkeypatch):
    """The tensor-core bodies' other paths: rows one element past a 16-byte boundary take the
    scalar loads (inputs, or the gate bias alone); log-decays of -1000 (gate off) make sub-block
    spans too wide for the factored decays, so the diagonal tiles come from the direct formula
    (compute_diag_fallback). As test_correctness's tests of the same names, on the emulated
    kernels."""
    s = seed()
    gate = case != "g=-1000"
    p = make_problem(B=1, T=70, hqk=2, hv=2, D=128, dtype=torch.bfloat16, state=True, seed=s,
                     gate=gate, weak_decay=True)
    if case == "g=-1000":
        g = p["g"].clone()
        g[:, 10:12] = -1000.0
        g[:, 50, :, :7] = -1000.0
        p["g"] = g
    else:
        for name in ("q", "k", "v", "g") if case == "unaligned inputs" else ("dt_bias",):
            t = p[name]
            flat = torch.empty(t.numel() + 1, dtype=t.dtype)
            p[name] = flat[1:].view(t.shape)
            p[name].copy_(t)
            assert p[name].data_ptr() % 16 != 0
    out, final = run(p, D=128, dtype=torch.bfloat16, layout={"FORM": form}, monkeypatch=monkeypatch)
    check(p, out, final, what=f"{form}, {case} (seed {s})")


def test_fallback_tile_sets_the_aqk_scale(monkeypatch):
    """A flagged sub-block's diagonal A_qk tile (compute_diag_fallback's, not a compute_A unit's)
    holding the chunk's largest |A_qk| by far: the record's fp16 scale of A_qk must count it. (The
    preparation takes that scale from the units' own maxima, and scans a flagged tile apart; left
    out, the tile's values overflow fp16.) Raw q and k (no l2norm): |k| = 0.5, |q| = 1, the first
    16 tokens' q times 256."""
    s = seed()
    p = make_problem(B=1, T=64, hqk=1, hv=1, D=128, dtype=torch.bfloat16, state=True, seed=s, gate=False,
                     weak_decay=True)
    q = torch.nn.functional.normalize(p["q"].float(), dim=-1)
    q[:, :16] *= 256.0
    p["q"] = q.to(torch.bfloat16)
    p["k"] = (0.5 * torch.nn.functional.normalize(p["k"].float(), dim=-1)).to(torch.bfloat16)
    g = p["g"].clone()
    g[:, 10:12] = -1000.0  # chunk 0's first sub-block: too wide a span for the factored decays
    p["g"] = g
    out, final = run(p, D=128, dtype=torch.bfloat16, use_qk_l2norm=False, monkeypatch=monkeypatch)
    check(p, out, final, what=f"fallback tile largest (seed {s})", use_qk_l2norm=False)


@pytest.mark.parametrize("case", ["dense", "varlen"])
def test_int64_offsets_match_int32(case, monkeypatch):
    """The preparation forms its loads' element offsets in 32 bits where every input's offsets lie
    below 2^31 (tc::offsets_fit_int32), in 64 bits otherwise. A GPU takes the 64-bit form only for
    tensors past 2^31 elements, which the emulator cannot hold (test_correctness's
    test_offsets_past_int32 runs it on a GPU), so FLASH_KDA_SIM_OFFSETS=int64 forces it here: on the
    same inputs the two forms must agree bit for bit (same arithmetic, other addresses), and match
    the reference. Grouped heads, a partial chunk, fp32 states."""
    s = seed()
    shape = dict(B=2, T=70) if case == "dense" else dict(seqlens=[45, 1, 64])
    p = make_problem(**shape, hqk=1, hv=2, D=128, dtype=torch.bfloat16, state=True, seed=s, weak_decay=True)
    results = {}
    for offsets in ("auto", "int64"):
        results[offsets] = run(p, D=128, dtype=torch.bfloat16, layout={"FORM": "split", "VS": 64, "OFFSETS": offsets},
                               monkeypatch=monkeypatch)
    check(p, *results["auto"], what=f"{case}, 32-bit offsets (seed {s})")
    for a, b, name in zip(results["auto"], results["int64"], ("output", "final state")):
        assert torch.equal(a, b), f"{case}: {name} differs between 32- and 64-bit offsets (seed {s})"


def test_nan_stays_in_its_row_and_sequence(monkeypatch):
    """A NaN in one value of one token of the second sequence: the first sequence stays finite;
    from that token on, the affected value row is NaN (as in the reference)."""
    p = make_problem(B=2, T=40, hqk=1, hv=1, D=64, dtype=torch.bfloat16, state=True, seed=seed())
    v = p["v"].clone()
    v[1, 5, 0, 3] = float("nan")
    p["v"] = v
    out, final = run(p, D=64, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    assert torch.isfinite(out[0]).all() and torch.isfinite(final[0]).all(), "NaN leaked across batch"
    assert torch.isnan(out[1, 5:, 0, 3]).all() and torch.isnan(final[1]).any()


def test_drawn_problems_in_every_layout(monkeypatch):
    """Problems drawn by hypothesis (tests/drawn_problems.py: every option at once, token counts at
    the chunk edges) on layouts drawn from LAYOUTS at D = 64 and 128: the combinations the
    parametrised tests above leave out, e.g. a varlen batch with empty sequences, grouped heads and
    an fp16 state on the mma16 recurrence. Each layout's settings apply to its example alone."""
    pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install '.[test]' brings it)")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from drawn_problems import build, problems

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problems((torch.bfloat16, torch.float16), call_options=False),
           st.sampled_from([c for c in LAYOUTS if c[0] <= 128]))
    def check_one(drawn, layout_case):
        case, options = drawn
        D, layout = layout_case
        case = dict(case, D=D)
        p = build("cpu", case, options)
        state_dtype = case.get("state_dtype", torch.float32)
        with monkeypatch.context() as m:
            out, final = run(p, D=D, dtype=case["dtype"], layout=layout, state_dtype=state_dtype,
                             use_qk_l2norm=options["l2norm"], monkeypatch=m)
        check(p, out, final, what=f"{case} {options} D={D} {layout}", use_qk_l2norm=options["l2norm"])

    check_one()
