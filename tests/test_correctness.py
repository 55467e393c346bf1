"""Kernels vs the float64 token-by-token reference (relative L2), on fresh random inputs, with
poisoned outputs so that unwritten elements fail. Parametrised over devices: CPU always; CUDA when
a GPU is present (skipped with a reason otherwise)."""

from __future__ import annotations

import os
import random

import pytest
import torch

import flash_kda
from flash_kda import _workspace
from conftest import DEVICES, cuda_ok
from kda_testing import (MAGNITUDE_CASES, OUT_TOL, STATE_TOL_FP32, STATE_TOL_LOWP, UNPAIRED_STATE_LAYOUTS,
                         check_blocks, far_from_one, make_problem, poison, reference_of, rel_l2,
                         huge_state_channel, stepped_values, unpaired_state, with_fp32_gates, zero_channels)

GPU_DTYPES = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtypes_for(device):
    return ALL_DTYPES if device == "cpu" else GPU_DTYPES


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def run_chunk(p, *, output_final_state=True, final_state=None, use_qk_l2norm=True, scale=None,
              lower_bound=-5.0):
    out = poison(torch.empty_like(p["v"]))
    res = flash_kda.chunk_kda(
        p["q"], p["k"], p["v"], p["g"], p["beta"], scale=scale, initial_state=p["initial_state"],
        output_final_state=output_final_state, cu_seqlens=p["cu_seqlens"], A_log=p["A_log"],
        dt_bias=p["dt_bias"], lower_bound=lower_bound, use_qk_l2norm_in_kernel=use_qk_l2norm,
        output=out, final_state=final_state)
    return res if output_final_state else (res, None)


def check(p, out, final, seed, *, use_qk_l2norm=True, scale=None, lower_bound=-5.0, what=""):
    ref_out, ref_final = reference_of(p, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                      lower_bound=lower_bound)
    dtype = p["v"].dtype
    e_out = rel_l2(out, ref_out)
    e_st = rel_l2(final, ref_final) if final is not None else float("nan")
    # One line per case (pytest -s, or -rP) so that the figures can be recorded.
    final_dtype = None if final is None else final.dtype
    print(f"[{out.device.type}] {what}: out rel-L2 {e_out:.2e}, final_state ({final_dtype}) {e_st:.2e}")
    assert e_out <= OUT_TOL[dtype], f"{what} out rel-L2 {e_out:.3e} > {OUT_TOL[dtype]} (seed {seed})"
    if final is not None:
        tol = STATE_TOL_FP32[dtype] if final.dtype == torch.float32 else STATE_TOL_LOWP[dtype]
        assert e_st <= tol, f"{what} final_state rel-L2 {e_st:.3e} > {tol} (seed {seed})"
    return e_out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("D", [64, 128, 256], ids=lambda d: f"D{d}")
def test_dtypes_and_head_dims(device, dtype, D):
    if dtype not in dtypes_for(device):
        pytest.skip(f"{dtype} inputs are CPU-only")
    seed = fresh_seed()
    p = make_problem(B=2, T=70, hqk=2, hv=4, D=D, dtype=dtype, device=device, state=True, seed=seed)
    out, final = run_chunk(p)
    check(p, out, final, seed, what=f"B2 T70 D{D} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_dense_long(device):
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    T, H = (300, 4) if device == "cpu" else (1000, 4)
    p = make_problem(B=2, T=T, hqk=H, hv=H, D=128, dtype=dtype, device=device, seed=seed)
    out, final = run_chunk(p)
    check(p, out, final, seed, what=f"dense T{T}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_varlen_with_empty_and_single_token_sequences(device, cu_dtype):
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    seqlens = [0, 1, 17, 130, 0, 65] if device == "cpu" else [1, 17, 300, 1024, 0, 513]
    p = make_problem(seqlens=seqlens, hqk=4, hv=8, D=128, dtype=dtype, device=device, state=True,
                     seed=seed)
    p["cu_seqlens"] = p["cu_seqlens"].to(cu_dtype)
    out, final = run_chunk(p)
    assert out.shape == p["v"].shape
    check(p, out, final, seed, what=f"varlen {seqlens}")
    # a [1, S, H, D] batch view gives the same result
    p4 = dict(p, **{k: p[k].unsqueeze(0) for k in ("q", "k", "v", "g", "beta")})
    out4, final4 = run_chunk(p4)
    assert torch.equal(out4[0], out) and torch.equal(final4, final)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "nol2norm"])
def test_grouped_heads_gate_l2norm(device, gate, l2norm):
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=1, T=150, hqk=2, hv=8, D=64, dtype=dtype, device=device, gate=gate,
                     state=True, seed=seed)
    if not l2norm:  # keep the recurrence stable without normalisation: |k|² small enough
        p["q"] = p["q"] / 8
        p["k"] = p["k"] / 8
    out, final = run_chunk(p, use_qk_l2norm=l2norm, scale=0.3, lower_bound=-3.0)
    check(p, out, final, seed, use_qk_l2norm=l2norm, scale=0.3, lower_bound=-3.0,
          what=f"Hqk2 Hv8 gate={gate} l2norm={l2norm}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", [True, False], ids=["gate-params", "log-decay"])
def test_fp32_g_and_beta_beside_16bit_inputs(device, gate):
    """g and beta in float32 with bf16 q, k, v (varlen, a short last chunk): their own read path."""
    seed = fresh_seed()
    p32 = make_problem(seqlens=[45, 70], hqk=2, hv=4, D=64, dtype=torch.float32, device=device,
                       state=True, gate=gate, seed=seed, weak_decay=True)
    p = with_fp32_gates(p32, torch.bfloat16)
    out, final = run_chunk(p)
    check(p, out, final, seed, what=f"fp32 g, beta (gate={gate})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("state_dtype", ["fp32", "input"])
def test_states_in_out_and_in_place(device, dtype, state_dtype):
    """States in and out, fp32 or the input dtype (both 16-bit input types), and in place."""
    seed = fresh_seed()
    sdt = torch.float32 if state_dtype == "fp32" else dtype
    p = make_problem(seqlens=[33, 0, 90], hqk=2, hv=4, D=64, dtype=dtype, device=device, state=True,
                     state_dtype=sdt, seed=seed)
    out, final = run_chunk(p)
    assert final.dtype == sdt
    check(p, out, final, seed, what=f"states {sdt}")
    # in place: the same tensor as initial and final state gives the out-of-place result
    inplace = p["initial_state"].clone()
    out2 = poison(torch.empty_like(p["v"]))
    flash_kda.chunk_kda(p["q"], p["k"], p["v"], p["g"], p["beta"], initial_state=inplace,
                        output_final_state=True, cu_seqlens=p["cu_seqlens"], A_log=p["A_log"],
                        dt_bias=p["dt_bias"], output=out2, final_state=inplace)
    assert torch.equal(out2, out)
    assert torch.equal(inplace, final)


@pytest.mark.parametrize("device", DEVICES)
def test_no_initial_state_and_outputs_allocated(device):
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=3, T=40, hqk=2, hv=2, D=64, dtype=dtype, device=device, seed=seed)
    res = flash_kda.chunk_kda(p["q"], p["k"], p["v"], p["g"], p["beta"], A_log=p["A_log"],
                              dt_bias=p["dt_bias"], output_final_state=True)
    out, final = res
    assert final.dtype == torch.float32 and final.shape == (3, 2, 64, 64)
    check(p, out, final, seed, what="allocated outputs")
    only_out = flash_kda.chunk_kda(p["q"], p["k"], p["v"], p["g"], p["beta"], A_log=p["A_log"],
                                   dt_bias=p["dt_bias"])
    assert isinstance(only_out, torch.Tensor) and torch.equal(only_out, out)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views(device):
    """Only the last dim must be contiguous: padded token strides and sliced heads work."""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=2, T=50, hqk=2, hv=4, D=64, dtype=dtype, device=device, state=True, seed=seed)
    wide = {}
    for name in ("q", "k", "v", "g"):
        t = p[name]
        big = torch.randn(t.shape[0], t.shape[1], t.shape[2] + 3, t.shape[3], device=device).to(dtype)
        big[:, :, 1:1 + t.shape[2]] = t
        wide[name] = big[:, :, 1:1 + t.shape[2]]
        assert not wide[name].is_contiguous()
    b = p["beta"]
    bbig = torch.randn(b.shape[0], b.shape[1] * 2, b.shape[2], device=device).to(b.dtype)
    bbig[:, ::2] = b
    wide["beta"] = bbig[:, ::2]
    ps = dict(p, **wide)
    out, final = run_chunk(ps)
    check(p, out, final, seed, what="strided")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", UNPAIRED_STATE_LAYOUTS)
def test_fp32_states_that_cannot_move_in_pairs(device, layout):
    """fp32 states with one odd stride (row, head or sequence), or starting 4 bytes past an 8-byte
    boundary: the CUDA recurrence then reads and writes them one element at a time instead of in
    pairs of channels (its pair path needs even strides and an 8-byte aligned base; a pair access
    there would fault on a misaligned address). Both ends, the final state poisoned."""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(seqlens=[40, 75], hqk=2, hv=4, D=128, dtype=dtype, device=device, state=True, seed=seed)
    h0 = p["initial_state"]
    initial = unpaired_state(h0.shape, layout, device, values=h0)
    final = unpaired_state(h0.shape, layout, device, fill=poison)
    out, got = run_chunk(dict(p, initial_state=initial), final_state=final)
    assert got.data_ptr() == final.data_ptr()
    assert torch.equal(initial, h0)  # the caller's initial state is only read
    check(p, out, final, seed, what=f"fp32 states, {layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["inputs", "dt_bias"])
def test_views_off_16_byte_alignment(device, which):
    """Rows that start one element past a 16-byte boundary (legal: only the last dim must be
    contiguous) take the kernels' scalar loads; `inputs` offsets q, k, v and g, `dt_bias` only the
    gate bias (read with vector loads when aligned)."""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=1, T=70, hqk=2, hv=2, D=128, dtype=dtype, device=device, state=True, seed=seed)
    names = ("q", "k", "v", "g") if which == "inputs" else ("dt_bias",)
    shifted = {}
    for name in names:
        t = p[name]
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
        shifted[name] = flat[1:].view(t.shape)
        shifted[name].copy_(t)
        assert shifted[name].data_ptr() % 16 != 0
    out, final = run_chunk(dict(p, **shifted))
    check(p, out, final, seed, what=f"unaligned {which}")


@pytest.mark.parametrize("device", DEVICES)
def test_fwd_writes_in_place_and_matches_chunk_kda(device):
    seed = fresh_seed()
    dtype = torch.bfloat16
    p = make_problem(seqlens=[5, 64, 129], hqk=4, hv=4, D=128, dtype=dtype, device=device, state=True,
                     seed=seed)
    out = poison(torch.empty_like(p["v"]))
    final = poison(torch.empty_like(p["initial_state"]))
    ret = flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 128 ** -0.5, out, p["A_log"],
                        p["dt_bias"], -5.0, initial_state=p["initial_state"], final_state=final,
                        cu_seqlens=p["cu_seqlens"].to(torch.int64))
    assert ret is None
    check(p, out, final, seed, what="fwd")
    out2, final2 = run_chunk(p)
    assert torch.equal(out, out2) and torch.equal(final, final2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
def test_weak_decay_carries_state_across_chunks(device, gate):
    """Log-decays of -0.002 to -0.02 per token: the state and the initial state matter for every
    chunk, so a kernel that mishandles what passes between chunks (the decay of the carried state,
    its order with the chunk's update) fails here. (The default decays are strong enough that the
    state is nearly forgotten within a chunk.)"""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=2, T=150, hqk=1, hv=2, D=64, dtype=dtype, device=device, gate=gate,
                     state=True, seed=seed, weak_decay=True)
    out, final = run_chunk(p)
    check(p, out, final, seed, what="weak decay")


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_decay_stays_finite(device):
    """Gate off with some g = -1000 (a log-decay that zeroes the state): no overflow, no NaN."""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=1, T=100, hqk=2, hv=2, D=64, dtype=dtype, device=device, gate=False,
                     state=True, seed=seed)
    g = p["g"].clone()
    g[:, 10:12] = -1000.0
    g[:, 50, :, :7] = -1000.0
    p["g"] = g
    out, final = run_chunk(p)
    check(p, out, final, seed, what="g=-1000")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MAGNITUDE_CASES)
def test_magnitudes_far_from_one(device, case):
    """Inputs whose products leave the range of 16-bit operands (fp16: max 65504, subnormal below
    2^-14) unless the kernel scales them: the error must stay that of ordinary inputs.
    (tools/recurrence_precision_model.py shows unscaled fp16 operands failing the first three.)"""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p, l2 = far_from_one(make_problem(B=1, T=96, hqk=2, hv=2, D=128, dtype=dtype, device=device, state=True,
                                      seed=seed), case)
    out, final = run_chunk(p, use_qk_l2norm=l2)
    check(p, out, final, seed, use_qk_l2norm=l2, what=case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weak_decay", [False, True], ids=["strong-decay", "weak-decay"])
def test_state_units_follow_value_steps(device, weak_decay):
    """kda_testing.stepped_values: rows whose values jump by 2^10 or 2^20 between chunks, up and down, beside
    steady rows; checked per token block and channel kind (check_blocks), so the small parts count."""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = stepped_values(make_problem(B=1, T=320, hqk=2, hv=2, D=128, dtype=dtype, device=device, state=True,
                                    seed=seed, weak_decay=weak_decay))
    out, final = run_chunk(p)
    worst, e_st = check_blocks(p, out, final, what=f"stepped values (seed {seed})")
    print(f"[{device}] stepped values: worst block out rel-L2 {worst:.2e}, final_state {e_st:.2e}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["zero channels", "huge state channel"])
def test_zeros_and_huge_states(device, case):
    """kda_testing.zero_channels and huge_state_channel: a kernel that scales rows or channels by
    their largest magnitude must not turn a zero's scale, or a state far beyond its updates, into
    an overflow (inf, or inf · 0 = NaN); the error must stay that of ordinary inputs."""
    seed = fresh_seed()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    edit = zero_channels if case == "zero channels" else huge_state_channel
    p = edit(make_problem(B=1, T=96, hqk=2, hv=2, D=128, dtype=dtype, device=device, state=True,
                          seed=seed, weak_decay=True))
    out, final = run_chunk(p)
    check(p, out, final, seed, what=case)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_the_reference(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(B=2, T=20, hqk=1, hv=1, D=64, dtype=dtype, device=device, seed=1)
    v = p["v"].clone()
    v[1, 5, 0, 3] = float("nan")
    p["v"] = v
    out, final = run_chunk(p)
    assert torch.isfinite(out[0]).all() and torch.isfinite(final[0]).all(), "NaN leaked across batch"
    # From the poisoned token on, the affected value row is NaN, as in the reference. (Tokens of
    # the same chunk before it may be NaN too: masked-out matrix entries are 0 · NaN.)
    assert torch.isnan(out[1, 5:, 0, 3]).all() and torch.isnan(final[1]).any()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="no CUDA device on this machine (CPU-only CI)")
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fwd_caller_workspace(varlen):
    """A caller workspace of get_workspace_size bytes, poisoned with NaN (0xFF bytes), gives the
    result of the call without one; too small or misaligned ones still work (fwd allocates)."""
    seed = fresh_seed()
    H = 4
    if varlen:
        p = make_problem(seqlens=[1, 33, 300, 0, 513], hqk=H, hv=H, D=128, dtype=torch.bfloat16,
                         device="cuda", state=True, seed=seed)
        T_total, N = p["q"].shape[0], p["cu_seqlens"].numel() - 1
    else:
        p = make_problem(B=3, T=200, hqk=H, hv=H, D=128, dtype=torch.bfloat16, device="cuda",
                         state=True, seed=seed)
        T_total, N = p["q"].shape[0] * p["q"].shape[1], p["q"].shape[0]

    def run(workspace=None):
        out = poison(torch.empty_like(p["v"]))
        final = poison(torch.empty_like(p["initial_state"]))
        flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 128 ** -0.5, out, p["A_log"],
                      p["dt_bias"], -5.0, initial_state=p["initial_state"], final_state=final,
                      cu_seqlens=p["cu_seqlens"], workspace=workspace)
        return out, final

    out0, final0 = run()
    check(p, out0, final0, seed, what=f"fwd without workspace ({'varlen' if varlen else 'dense'})")
    size = flash_kda.get_workspace_size(T_total, H, N)
    ws = torch.full((size,), 0xFF, dtype=torch.uint8, device="cuda")
    out, final = run(ws)
    assert torch.equal(out, out0) and torch.equal(final, final0), f"seed {seed}"
    # The two-kernel path (sm_80+, fast kernels, not FLASH_KDA_CUDA_SPLIT=0) writes its scratch into ws.
    split_expected = (torch.cuda.get_device_capability() >= (8, 0)
                      and _workspace.split_possible() and _workspace.split_selected())
    if split_expected:
        assert not bool((ws == 0xFF).all()), "the caller's workspace was not used"
    too_small = torch.full((max(size // 2, 1),), 0xFF, dtype=torch.uint8, device="cuda")
    misaligned = torch.full((size + 16,), 0xFF, dtype=torch.uint8, device="cuda")[1:size + 1]
    for bad in (too_small, misaligned):
        out, final = run(bad)
        assert torch.equal(out, out0) and torch.equal(final, final0), f"seed {seed}"


def run_child(script: str, path, args, env_changes: dict, *, what: str):
    """Runs `script` in a fresh Python process (for launcher settings that are read once per process)
    as `python -c script path *args`, with tests/ and the project on its path and the environment
    changed by env_changes (a value of None unsets the variable); returns what it saved at path."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    res = subprocess.run([sys.executable, "-c", script, str(path), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{what}:\n{res.stderr[-3000:]}"
    return torch.load(path)


# A child process: FLASH_KDA_CUDA_PIECES is read once per process by the launcher, so each piece
# count gets its own. For three problems (small: checked against the reference by the parent; large:
# 256 chunks, 32 heads, so that the two streams really run side by side; varlen: cut along its
# record slots, with an empty and a one-token sequence, also checked by the parent) it runs fwd
# eagerly, then captures the same call in a CUDA graph and replays it. The workspace is the caller's,
# of get_workspace_size bytes, filled with 0xFF (NaN) before every call, inside the graph too: a
# recurrence reading a record or carry before it is written gives NaN. "capture-first" captures
# before any eager call that is cut (only a varlen call of one slot, never cut, comes first), so the
# side stream is made inside the capture (overlap.cuh, in relaxed capture mode).
_PIECES_CHILD = r"""
import sys
import torch
import flash_kda
from kda_testing import make_problem, poison
path, seed, order = sys.argv[1], int(sys.argv[2]), sys.argv[3]
problems = {"small": dict(B=2, T=1000, hqk=2, hv=4), "large": dict(B=1, T=8192, hqk=32, hv=32),
            "varlen": dict(seqlens=[300, 0, 1, 700, 33, 2048], hqk=2, hv=4)}

def setup(shape):
    p = make_problem(**shape, D=128, dtype=torch.bfloat16, device="cuda", state=True, seed=seed,
                     weak_decay=True)
    if "seqlens" in shape:
        T_total, N = sum(shape["seqlens"]), len(shape["seqlens"])
    else:
        T_total, N = shape["B"] * shape["T"], shape["B"]
    ws = torch.empty(flash_kda.get_workspace_size(T_total, shape["hv"], N), dtype=torch.uint8, device="cuda")
    out = poison(torch.empty_like(p["v"]))
    final = poison(torch.empty_like(p["initial_state"]))
    def call():
        ws.fill_(0xFF)
        out.fill_(float("nan"))
        final.fill_(float("nan"))
        flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 128 ** -0.5, out, p["A_log"], p["dt_bias"],
                      -5.0, initial_state=p["initial_state"], final_state=final, cu_seqlens=p["cu_seqlens"],
                      workspace=ws)
    return call, out, final, ws

def capture(call):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph

results = {}
if order == "capture-first":
    v = make_problem(seqlens=[30], hqk=2, hv=4, D=128, dtype=torch.bfloat16, device="cuda", seed=seed)
    flash_kda.chunk_kda(v["q"], v["k"], v["v"], v["g"], v["beta"], cu_seqlens=v["cu_seqlens"],
                        A_log=v["A_log"], dt_bias=v["dt_bias"], use_qk_l2norm_in_kernel=True)
    torch.cuda.synchronize()
for name, shape in problems.items():
    call, out, final, ws = setup(shape)
    if order == "capture-first" and name == "small":
        graph = capture(call)  # the first dense call of the process, inside a capture
        graph.replay()
        torch.cuda.synchronize()
        results[name + " graph"] = (out.cpu(), final.cpu())
    call()
    torch.cuda.synchronize()
    assert not bool((ws == 0xFF).all()), "the caller's workspace was not used"
    results[name + " eager"] = (out.cpu(), final.cpu())
    if order == "eager-first":
        graph = capture(call)
        graph.replay()
        torch.cuda.synchronize()
        results[name + " graph"] = (out.cpu(), final.cpu())
torch.save(results, path)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="no CUDA device on this machine (CPU-only CI)")
def test_offsets_past_int32():
    """The preparation forms its loads' element offsets in 32 bits when every input's offsets lie
    below 2^31 (tc::offsets_fit_int32) and in 64 bits otherwise. Here q's second sequence starts
    2^31 + 256 elements into its storage (a 4.3 GB bf16 buffer), so the call takes the 64-bit form;
    it must give the reference's results and, bit for bit, what the same values in a contiguous q
    give through the 32-bit form."""
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * 2**30:
        pytest.skip(f"{free / 2**30:.1f} GiB free on the GPU; the case needs about 5")
    seed = fresh_seed()
    p = make_problem(B=2, T=70, hqk=2, hv=4, D=128, dtype=torch.bfloat16, device="cuda", state=True, seed=seed,
                     weak_decay=True)
    q = p["q"]
    seq_stride = 2**31 + 256  # a multiple of 8 elements: 16-byte loads stay possible
    one_seq = q[0].numel()
    storage = torch.empty(seq_stride + one_seq, dtype=q.dtype, device="cuda")
    far = storage.as_strided(q.shape, (seq_stride,) + q.stride()[1:])
    far.copy_(q)
    assert far.stride(0) * (q.shape[0] - 1) >= 2**31 and torch.equal(far, q)
    out_far, final_far = run_chunk(dict(p, q=far))
    del far, storage
    out, final = run_chunk(p)
    check(p, out_far, final_far, seed, what="q past 2^31 elements")
    assert torch.equal(out_far, out), f"output differs from the contiguous q's (seed {seed})"
    assert torch.equal(final_far, final), f"final state differs from the contiguous q's (seed {seed})"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="no CUDA device on this machine (CPU-only CI)")
@pytest.mark.parametrize("many", [False, True], ids=["blocks-fit", "more-blocks-than-SMs"])
def test_d256_recurrence_operand_buffers(many):
    """At D = 256 the recurrence runs with two operand buffers where its blocks fit one per
    multiprocessor and with one where they do not (kda_cuda.cu, RecurrenceVariant::cost). Both paths
    against the reference, fp32 states and weak decays so that the state crosses chunks, and the
    layout the profiler names is the one the rule picks (its fourth template argument). With many
    heads (sms / 2 + 1: more blocks than SMs at either V slice) the cost model alone would pick two
    buffers at VS 64 (one block per SM, 3 waves, against one buffer's 2 shared waves), so the case
    fails if the rule that excludes them there is lost."""
    import re
    if os.environ.get("FLASH_KDA_CUDA_SPLIT") == "0":
        pytest.skip("FLASH_KDA_CUDA_SPLIT=0: no recurrence kernel runs")
    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is not None and optin < 160 * 1024:
        pytest.skip(f"{optin} B of shared memory per block: D = 256's preparation (157 KB) does not fit")
    sms = props.multi_processor_count
    hv = sms // 2 + 1 if many else 2  # V slices of 64: 4 blocks per head (8 of 32)
    seed = fresh_seed()
    p = make_problem(B=1, T=70, hqk=1, hv=hv, D=256, dtype=torch.bfloat16, device="cuda", state=True,
                     seed=seed, weak_decay=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, final = run_chunk(p)
        torch.cuda.synchronize()
    check(p, out, final, seed, what=f"D256 H{hv} ({'many' if many else 'few'} blocks)")
    stages = {m.group(1) for e in prof.events()
              for m in [re.search(r"RecurrenceLayout<256, \d+, 32, (\d)", e.name)] if m}
    assert stages == ({"1"} if many else {"2"}), f"recurrence layouts run: {stages}"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="no CUDA device on this machine (CPU-only CI)")
def test_pieces_match_one_piece_and_capture(tmp_path):
    """FLASH_KDA_CUDA_PIECES cuts a call into stretches (dense: of chunks; varlen: of record slots)
    whose recurrences run on a
    second stream beside the next stretch's preparation (kda_cuda.cu, overlap.cuh). The results
    must equal the one-piece call's bit for bit (same arithmetic; the state between stretches is
    carried in fp32), eagerly and when the call is captured in a CUDA graph and replayed (also as
    the process's first dense call, whose side stream is then made inside the capture), and be within the reference's
    tolerances. 1000 tokens are 32 chunks: 3 pieces start stretches at chunks 10 and 21, 8 pieces at
    every fourth chunk; the large problem has 256 chunks and 32 heads; the varlen problem's 102
    slots are cut inside and between its sequences."""
    seed = fresh_seed()
    results = {}
    for pieces, order in ((1, "eager-first"), (3, "eager-first"), (8, "eager-first"), (3, "capture-first")):
        results[(pieces, order)] = run_child(_PIECES_CHILD, tmp_path / f"pieces{pieces}-{order}.pt", [seed, order],
                                             {"FLASH_KDA_CUDA_PIECES": str(pieces)},
                                             what=f"{pieces} pieces, {order} (seed {seed})")
    # The small problem's inputs, rebuilt on the CPU (make_problem draws on a CPU generator).
    p = make_problem(B=2, T=1000, hqk=2, hv=4, D=128, dtype=torch.bfloat16, state=True, seed=seed,
                     weak_decay=True)
    base = results[(1, "eager-first")]
    check(p, *base["small eager"], seed, what="one piece")
    pv = make_problem(seqlens=[300, 0, 1, 700, 33, 2048], hqk=2, hv=4, D=128, dtype=torch.bfloat16, state=True,
                      seed=seed, weak_decay=True)
    check(pv, *base["varlen eager"], seed, what="varlen, one piece")
    for (pieces, order), r in results.items():
        for key, (out, final) in r.items():
            ref_out, ref_final = base[key.split()[0] + " eager"]
            what = f"{pieces} pieces, {order}, {key}"
            assert torch.equal(out, ref_out), f"{what}: output differs from one piece (seed {seed})"
            assert torch.equal(final, ref_final), f"{what}: final state differs (seed {seed})"


# A child process: FLASH_KDA_CUDA_VSLICE=64 (read once per process) pins the recurrence's V slice at
# 64, two slices per head at D = 128. The first problem has 96 value heads (192 blocks: more than an
# H100's or H200's 132 multiprocessors, so on sm_90 the slices run as clusters kept in step), the
# second 4 (8 blocks: the plain kernel). Saves both results for the parent to check.
_LOCKSTEP_CHILD = r"""
import sys
import torch
import flash_kda
from kda_testing import make_problem, poison
path, seed = sys.argv[1], int(sys.argv[2])
results = {}
for hv in (96, 4):
    p = make_problem(B=1, T=200, hqk=hv, hv=hv, D=128, dtype=torch.bfloat16, device="cuda", state=True,
                     seed=seed, weak_decay=True)
    out = poison(torch.empty_like(p["v"]))
    final = poison(torch.empty_like(p["initial_state"]))
    flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 128 ** -0.5, out, p["A_log"], p["dt_bias"],
                  -5.0, initial_state=p["initial_state"], final_state=final)
    torch.cuda.synchronize()
    results[hv] = (out.cpu(), final.cpu())
torch.save(results, path)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="no CUDA device on this machine (CPU-only CI)")
def test_recurrence_in_step_then_plain_in_one_process(tmp_path):
    """One process launches the recurrence kept in step (a cluster per head, sm_90) and then the
    plain one of the same layout. Each kernel must get its own shared-memory limit: when the two
    shared one record of it, the second launch failed with "invalid argument" (session 19)."""
    seed = fresh_seed()
    # (FLASH_KDA_CUDA_CLUSTER None: unset, so that the default rule decides)
    results = run_child(_LOCKSTEP_CHILD, tmp_path / "lockstep.pt", [seed],
                        {"FLASH_KDA_CUDA_VSLICE": "64", "FLASH_KDA_CUDA_CLUSTER": None}, what=f"seed {seed}")
    for hv in (96, 4):
        p = make_problem(B=1, T=200, hqk=hv, hv=hv, D=128, dtype=torch.bfloat16, state=True, seed=seed,
                         weak_decay=True)
        check(p, *results[hv], seed, what=f"VS 64, {hv} heads")
