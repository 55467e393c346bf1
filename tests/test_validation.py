"""Bad input: a clear ValueError/TypeError naming the argument, raised before anything runs, with
every caller tensor left bit-for-bit untouched."""

from __future__ import annotations

import pytest
import torch

import flash_kda
from kda_testing import make_problem, snapshot, unchanged


def good(dtype=torch.bfloat16, varlen=False):
    p = make_problem(B=2 if not varlen else 1, T=16, hqk=2, hv=4, D=64, dtype=dtype, state=True,
                     seqlens=[5, 11] if varlen else None, seed=0)
    p["out"] = torch.full_like(p["v"], 7.0)
    p["final_state"] = torch.full_like(p["initial_state"], 3.0)
    return p


def call_chunk(p, **over):
    kw = dict(scale=None, initial_state=p["initial_state"], output_final_state=True,
              cu_seqlens=p["cu_seqlens"], A_log=p["A_log"], dt_bias=p["dt_bias"], lower_bound=-5.0,
              use_qk_l2norm_in_kernel=True, output=p["out"], final_state=p["final_state"])
    kw.update(over)
    return flash_kda.chunk_kda(p["q"], p["k"], p["v"], p["g"], p["beta"], **kw)


def call_fwd(p, **over):
    args = dict(q=p["q"], k=p["k"], v=p["v"], g=p["g"], beta=p["beta"], scale=0.125, out=p["out"],
                A_log=p["A_log"], dt_bias=p["dt_bias"], lower_bound=-5.0,
                initial_state=p["initial_state"], final_state=p["final_state"],
                cu_seqlens=p["cu_seqlens"])
    args.update(over)
    return flash_kda.fwd(**args)


def call_broken(entry, p, over):
    """`entry` ("chunk_kda" or "fwd") on problem p with CASES' overrides `over` (chunk_kda's
    argument names; fwd calls the output `out`)."""
    over = dict(over)
    if entry == "fwd":
        if "output" in over:
            over["out"] = over.pop("output")
        return call_fwd(p, **over)
    positional = {k: over.pop(k) for k in ("q", "k", "v", "g", "beta") if k in over}
    return call_chunk(dict(p, **positional), **over)


SCALE_TEXT = "scale must be a float, finite in fp32"
# (id, how to break a good problem -> kwargs override, expected exception, text in the message)
CASES = [
    ("q-not-tensor", lambda p: dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    ("q-int", lambda p: dict(q=p["q"].to(torch.int32)), TypeError, "q must be one of"),
    ("k-dtype", lambda p: dict(k=p["k"].half()), TypeError, "k must have q's dtype"),
    ("g-dtype", lambda p: dict(g=p["g"].double()), TypeError, "g must be"),
    ("beta-dtype", lambda p: dict(beta=p["beta"].half()), TypeError, "beta must be"),
    ("q-3d-dense", lambda p: dict(q=p["q"][0], k=p["k"][0]), ValueError, "q must be [B, T, H, K]"),
    ("k-shape", lambda p: dict(k=p["k"][:, :8]), ValueError, "k.shape must equal q.shape"),
    ("g-shape", lambda p: dict(g=p["g"][:, :, :2]), ValueError, "g.shape must equal v.shape"),
    ("beta-shape", lambda p: dict(beta=p["beta"][:, :, :2]), ValueError, "beta.shape"),
    ("v-tokens", lambda p: dict(v=p["v"][:, :8], g=p["g"][:, :8], beta=p["beta"][:, :8],
                                output=p["out"][:, :8]), ValueError, "differ from q"),
    ("heads-not-multiple", lambda p: dict(q=p["q"][:, :, :1].expand(-1, -1, 3, -1),
                                          k=p["k"][:, :, :1].expand(-1, -1, 3, -1)),
     ValueError, "multiple of query/key heads"),
    ("head-dim-96", lambda p: dict(q=p["q"][..., :48], k=p["k"][..., :48], v=p["v"][..., :48],
                                   g=p["g"][..., :48], output=p["out"][..., :48]),
     ValueError, "head dim 48"),
    ("k-ne-v", lambda p: dict(v=torch.cat([p["v"], p["v"]], -1), g=torch.cat([p["g"], p["g"]], -1),
                              output=torch.cat([p["out"], p["out"]], -1)), ValueError, "K == V"),
    ("last-dim-strided", lambda p: dict(q=torch.cat([p["q"], p["q"]], -1)[..., ::2]),
     ValueError, "q: the last dimension must be contiguous"),
    ("scale-nan", lambda p: dict(scale=float("nan")), TypeError, SCALE_TEXT),
    ("scale-str", lambda p: dict(scale="0.1"), TypeError, SCALE_TEXT),
    ("lower-bound-inf", lambda p: dict(lower_bound=float("inf")), TypeError,
     "lower_bound must be a float, finite in fp32"),
    ("scale-beyond-fp32", lambda p: dict(scale=1e39), TypeError, SCALE_TEXT),
    ("A_log-alone", lambda p: dict(dt_bias=None), ValueError, "come together"),
    ("A_log-shape", lambda p: dict(A_log=p["A_log"][:2]), ValueError, "A_log must be [Hv]"),
    ("A_log-dtype", lambda p: dict(A_log=p["A_log"].bfloat16()), TypeError, "A_log and dt_bias must be float32"),
    ("dt_bias-shape", lambda p: dict(dt_bias=p["dt_bias"].reshape(-1)), ValueError, "dt_bias must be"),
    ("state-shape", lambda p: dict(initial_state=p["initial_state"][:1]), ValueError, "initial_state must have shape"),
    ("state-dtype", lambda p: dict(initial_state=p["initial_state"].double()), TypeError,
     "initial_state must be float32"),
    ("state-dtypes-differ", lambda p: dict(final_state=p["final_state"].bfloat16()), TypeError, "dtypes differ"),
    ("final-shape", lambda p: dict(final_state=p["final_state"][:, :2]), ValueError, "final_state must have shape"),
    ("final-partial-overlap", lambda p: _overlapping_states(p["initial_state"]), ValueError, "partly overlaps"),
    ("out-shape", lambda p: dict(output=p["out"][:, :4]), ValueError, "output must have shape"),
    ("out-dtype", lambda p: dict(output=p["out"].float()), TypeError, "output must be"),
    ("out-aliases-v", lambda p: dict(output=p["v"]), ValueError, "overlaps v"),
    ("out-expanded", lambda p: dict(output=p["out"][:, :1].expand_as(p["out"])), ValueError, "overlapping elements"),
    ("flag-not-bool", lambda p: dict(output_final_state=1), TypeError, "must be bool"),
]


# fwd has no output_final_state flag, and requires the gate parameters.
FWD_CASES = [(n, b, TypeError, "dt_bias must be a torch.Tensor") if n == "A_log-alone"
             else (n, b, e, t.replace("output", "out")) for n, b, e, t in CASES if n != "flag-not-bool"]


@pytest.mark.parametrize("entry", ["direct", "op"])
@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_fwd_rejects_and_touches_nothing(case, entry, monkeypatch):
    """As test_chunk_kda_rejects_and_touches_nothing, through fwd: with its kernel loaded, fwd
    calls the compiled op first, whose own checks must reject everything these cases break (else
    the kernels would run on them), and only then explains in Python. Through the library's
    direct entry, and through torch.ops as for a library without one (entry "op")."""
    call_fwd(good())  # loads the kernel: the unchecked path applies from here on
    if entry == "op":
        from flash_kda import _ops
        q = good()["q"]
        monkeypatch.setattr(_ops.kernel_for(q.device, q.shape[-1], q.dtype), "direct", None)
    name, breaker, exc, text = case
    p = good()
    over = breaker(p)
    tensors = dict(p, **{k: v for k, v in over.items() if isinstance(v, torch.Tensor)})
    before = snapshot(tensors)
    with pytest.raises(exc) as info:
        call_broken("fwd", p, over)
    assert text in str(info.value), f"message {str(info.value)!r} should mention {text!r}"
    assert unchanged(before, tensors) == []


def _overlapping_states(s):
    """initial/final states of s's shape in one buffer, the final shifted by one element."""
    big = torch.randn(s.numel() + 1).to(s.dtype)
    return dict(initial_state=big[:-1].view(s.shape), final_state=big[1:].view(s.shape))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunk_kda_rejects_and_touches_nothing(case):
    """With the kernel loaded, so that chunk_kda tries the compiled op first (its checks must
    refuse every case) and explains in Python after."""
    call_chunk(good())
    name, breaker, exc, text = case
    p = good()
    over = breaker(p)
    tensors = dict(p, **{k: v for k, v in over.items() if isinstance(v, torch.Tensor)})
    before = snapshot(tensors)
    with pytest.raises(exc) as info:
        call_broken("chunk_kda", p, over)
    assert text in str(info.value), f"message {str(info.value)!r} should mention {text!r}"
    assert unchanged(before, tensors) == []


def test_final_state_aliasing_an_input():
    p = good(dtype=torch.float32)
    # final_state laid over the memory of g (same dtype family, enough bytes)
    need = p["final_state"].numel()
    g_big = torch.randn(need + 10)
    p["g"] = g_big[: p["g"].numel()].view(p["g"].shape)
    alias = g_big[:need].view(p["final_state"].shape)
    before = snapshot(dict(p, alias=alias))
    with pytest.raises(ValueError, match="final_state overlaps g"):
        call_chunk(p, final_state=alias)
    assert unchanged(before, dict(p, alias=alias)) == []


@pytest.mark.parametrize("bad,text", [
    ([0, 5, 4, 16], "non-decreasing"),
    ([1, 5, 16], "start at 0"),
    ([0, 5, 15], "end at the total token count 16"),
    ([0, 5, 17], "end at the total token count 16"),
])
def test_bad_cu_seqlens(bad, text):
    p = good(varlen=True)
    p["initial_state"] = p["initial_state"][:1].expand(len(bad) - 1, -1, -1, -1).contiguous()
    p["final_state"] = torch.full_like(p["initial_state"], 3.0)
    p["cu_seqlens"] = torch.tensor(bad, dtype=torch.int64)
    before = snapshot(p)
    with pytest.raises(ValueError, match=text):
        call_chunk(p)
    assert unchanged(before, p) == []


@pytest.mark.parametrize("entry", ["chunk_kda", "fwd"])
def test_empty_cu_seqlens(entry):
    p = good(varlen=True)
    # [1, S, H, D]: the layout fwd's unchecked path takes (it applies from the first call on)
    p.update({k: p[k].unsqueeze(0) for k in ("q", "k", "v", "g", "beta", "out")})
    call_fwd(good())
    before = snapshot(p)
    with pytest.raises(ValueError, match="at least one element"):
        (call_chunk if entry == "chunk_kda" else call_fwd)(p, cu_seqlens=torch.zeros(0, dtype=torch.int32))
    assert unchanged(before, p) == []


def test_cu_seqlens_dtype_and_batch():
    p = good(varlen=True)
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        call_chunk(p, cu_seqlens=p["cu_seqlens"].float())
    q4 = {k: p[k].unsqueeze(0).expand(2, *p[k].shape) for k in ("q", "k", "v", "g", "beta")}
    with pytest.raises(ValueError, match="batch size 2"):
        call_chunk(dict(p, **q4))


def test_fwd_requires_gate_parameters_and_checks_out():
    p = good()
    before = snapshot(p)
    with pytest.raises(TypeError, match="A_log must be a torch.Tensor"):
        call_fwd(p, A_log=None)
    with pytest.raises(ValueError, match="out must have shape"):
        call_fwd(p, out=p["out"][:1])
    with pytest.raises(TypeError, match="workspace"):
        call_fwd(p, workspace=123)
    assert unchanged(before, p) == []


@pytest.fixture
def cuda_split_possible(monkeypatch):
    """As if a CUDA device were present with the fast kernels (get_workspace_size is 0 otherwise)."""
    monkeypatch.setattr(flash_kda.api, "split_possible", lambda: True)


def test_get_workspace_size_is_zero_where_nothing_uses_it(monkeypatch):
    monkeypatch.delenv("FLASH_KDA_CUDA_SPLIT", raising=False)
    monkeypatch.setattr(flash_kda.api, "split_possible", lambda: False)  # CPU, MUSA, portable
    assert flash_kda.get_workspace_size(8192, 96, 4) == 0
    monkeypatch.setattr(flash_kda.api, "split_possible", lambda: True)
    monkeypatch.setenv("FLASH_KDA_CUDA_SPLIT", "0")  # the fused form
    assert flash_kda.get_workspace_size(8192, 96, 4) == 0


def test_split_is_not_possible_without_a_cuda_device_or_with_portable_kernels(monkeypatch):
    from flash_kda import _workspace
    if not torch.cuda.is_available():
        assert not _workspace.split_possible()
    monkeypatch.setenv("FLASH_KDA_KERNEL", "portable")
    assert not _workspace.split_possible()


@pytest.mark.parametrize("value,selected", [(None, True), ("", True), ("1", True), (" 1", True),
                                            ("+1", True), ("01", True), ("1x", True), ("2", True),
                                            ("-1", True), ("0", False), (" 0", False), ("00", False),
                                            ("0x1", False), ("x1", False), ("off", False)])
def test_split_selection_is_parsed_like_the_launcher(monkeypatch, cuda_split_possible, value, selected):
    """kda_cuda.cu reads FLASH_KDA_CUDA_SPLIT with atoi (unset or empty: the default, on);
    get_workspace_size must agree with it."""
    if value is None:
        monkeypatch.delenv("FLASH_KDA_CUDA_SPLIT", raising=False)
    else:
        monkeypatch.setenv("FLASH_KDA_CUDA_SPLIT", value)
    assert (flash_kda.get_workspace_size(64, 1, 1) > 0) == selected


def test_get_workspace_size(monkeypatch, cuda_split_possible):
    # The two-kernel form (the default): Record<128, 32> of kda_split_records.cuh,
    # 4*32*128 / 2 + 10*32 (A_qk's 10 core matrices on or below the diagonal) + 128 + 128/8 + 5 = 8661,
    # padded to 8672 floats (128-byte lines) per slot and head (fp16 operands, fp16 U0 with a scale
    # per 8 channels); slots T_total // 32 + N.
    # Plus the fp32 carry state of a call cut into pieces, N x H x 128 x 128 floats.
    monkeypatch.delenv("FLASH_KDA_CUDA_SPLIT", raising=False)
    assert flash_kda.get_workspace_size(8192, 96, 4) == (8192 // 32 + 4) * 96 * 8672 * 4 + 4 * 96 * 16384 * 4
    assert flash_kda.get_workspace_size(100, 8, 3) == (100 // 32 + 3) * 8 * 8672 * 4 + 3 * 8 * 16384 * 4
    assert flash_kda.get_workspace_size(0, 8, 0) == 0
    sizes = [flash_kda.get_workspace_size(t, h, n)
             for t, h, n in [(0, 1, 1), (31, 1, 1), (32, 1, 1), (64, 1, 1), (64, 2, 1), (64, 2, 2)]]
    assert sizes == sorted(sizes) and sizes[0] > 0
    # never below the dense slot count B * ceil(T / 32) of the same tokens
    for B, T in [(1, 1), (3, 33), (4, 2048), (7, 95)]:
        assert flash_kda.get_workspace_size(B * T, 4, B) >= B * -(-T // 32) * 4 * 8672 * 4
    for bad in [(-1, 96, 1), (8, -1, 1), (8, 96, 1.5), (True, 96, 1)]:
        with pytest.raises(ValueError):
            flash_kda.get_workspace_size(*bad)


def test_fwd_workspace_on_another_device():
    p = good()
    before = snapshot(p)
    with pytest.raises(ValueError, match="workspace must be on cpu"):
        call_fwd(p, workspace=torch.empty(64, dtype=torch.uint8, device="meta"))
    assert unchanged(before, p) == []


@pytest.mark.parametrize("victim", ["q", "v", "out", "final_state"])
def test_fwd_workspace_aliasing_an_argument(victim):
    """The kernels overwrite the workspace: one that shares memory with an argument is refused
    before anything runs."""
    p = good()
    before = snapshot(p)
    ws = p[victim].view(-1)[4:].view(torch.uint8)
    with pytest.raises(ValueError, match=f"workspace overlaps {victim}"):
        call_fwd(p, workspace=ws)
    assert unchanged(before, p) == []


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fwd_with_workspace_matches_without_on_cpu(varlen, cuda_split_possible):
    """The CPU kernel needs no scratch: a given workspace (big or too small) changes nothing."""
    p = good(varlen=varlen)
    call_fwd(p)
    out, final = p["out"].clone(), p["final_state"].clone()
    T_total = p["q"].shape[-3] * (1 if varlen else p["q"].shape[0])
    N = p["initial_state"].shape[0]
    for ws in (torch.full((flash_kda.get_workspace_size(T_total, 4, N),), 0xFF, dtype=torch.uint8),
               torch.empty(3, dtype=torch.uint8)):
        p["out"].fill_(7.0)
        p["final_state"].fill_(3.0)
        call_fwd(p, workspace=ws)
        assert torch.equal(p["out"], out) and torch.equal(p["final_state"], final)


def test_unsupported_device_type():
    p = good()
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    with pytest.raises(ValueError, match="CPU, CUDA and MUSA"):
        call_chunk(meta)


def test_mixed_devices_rejected():
    p = good()
    with pytest.raises(ValueError, match="put all tensors on one device"):
        call_chunk(p, A_log=p["A_log"].to("meta"))


def test_two_faults_at_once_are_refused_and_touch_nothing():
    """Every ordered pair of CASES' faults in one call (bf16 inputs, as CASES are written), through
    chunk_kda and fwd (1,922 calls, ~2 s): each raises TypeError or ValueError and changes no
    tensor. Where the two faults set different arguments, the message is one of the two faults'
    own; where they set the same one (the second's value wins), a third mismatch may be the one
    named, e.g. k of one fault beside q of the other. The binding checks first and Python explains
    after, so a fault that only one of them saw, or one let through to the kernel, would show here
    as no error, another kind of exception, an unexpected message or a write."""
    import itertools

    by_name = {c[0]: c for c in CASES}
    fwd_by_name = {c[0]: c for c in FWD_CASES}
    call_chunk(good())  # the kernel loaded: both entry points try the compiled op first
    wrong = []
    for names in itertools.permutations(sorted(by_name), 2):
        for entry in ("chunk_kda", "fwd"):
            if entry == "fwd" and "flag-not-bool" in names:
                continue  # (fwd has no such flag)
            p = good()
            parts = [by_name[n][1](p) for n in names]
            over = {k: v for part in parts for k, v in part.items()}
            disjoint = not set(parts[0]) & set(parts[1])
            expected = [(fwd_by_name if entry == "fwd" else by_name)[n][2:] for n in names]
            tensors = dict(p, **{k: v for k, v in over.items() if isinstance(v, torch.Tensor)})
            before = snapshot(tensors)
            try:
                call_broken(entry, p, over)
                wrong.append((names, entry, "no error"))
            except (TypeError, ValueError) as e:
                if disjoint and not any(isinstance(e, exc) and text in str(e) for exc, text in expected):
                    wrong.append((names, entry, f"{type(e).__name__}: {e}"))
            except Exception as e:  # noqa: BLE001 (any other kind is the finding)
                wrong.append((names, entry, f"{type(e).__name__}: {e}"))
            changed = unchanged(before, tensors)
            if changed:
                wrong.append((names, entry, f"changed {changed}"))
    assert wrong == [], f"{len(wrong)} of the pairs: {wrong[:10]}"
