"""The short cuts of the host path keep the guarantees of the long one.

- A device-resident cu_seqlens is read back (a device-to-host copy that waits for the stream) only
  when it is not the tensor checked last, unchanged: every in-place write, another tensor object
  or another token count is checked again. On the CPU that memo is off (reading is free), so the
  CPU run of these tests turns it on for CPU tensors.
- Destinations are checked against every input and both states, also when the state is updated
  in place.
"""

from __future__ import annotations

import gc

import pytest
import torch

import flash_kda
from flash_kda import _validate
from conftest import DEVICES
from kda_testing import make_problem, snapshot, unchanged


def count_reads(monkeypatch) -> dict:
    """Counts the reads of cu_seqlens values (counter["n"])."""
    counter = {"n": 0}
    real = _validate._read_offsets

    def counting(cu):
        counter["n"] += 1
        return real(cu)

    monkeypatch.setattr(_validate, "_read_offsets", counting)
    return counter


@pytest.fixture
def reads(monkeypatch):
    """Counts the reads of cu_seqlens values; on the CPU, memoises them as on a GPU."""
    counter = count_reads(monkeypatch)
    monkeypatch.setattr(_validate, "_read_is_costly", lambda cu: True)
    _validate.forget_checked_offsets()
    yield counter
    _validate.forget_checked_offsets()


def varlen_problem(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(seqlens=[5, 11], hqk=2, hv=2, D=128, dtype=dtype, device=device, state=True,
                     seed=0)
    p["out"] = torch.empty_like(p["v"])
    p["final_state"] = torch.empty_like(p["initial_state"])
    return p


def call(p, **over):
    args = dict(initial_state=p["initial_state"], final_state=p["final_state"],
                cu_seqlens=p["cu_seqlens"])
    args.update(over)
    flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 0.125, p["out"], p["A_log"],
                  p["dt_bias"], -5.0, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_unchanged_device_cu_seqlens_is_read_once(device, reads):
    p = varlen_problem(device)
    call(p)
    first = p["out"].clone()
    for _ in range(3):
        call(p)
    assert reads["n"] == 1
    assert torch.equal(p["out"], first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("write", ["setitem", "copy_", "fill_"])
def test_in_place_write_to_cu_seqlens_is_checked_again(device, reads, write):
    p = varlen_problem(device)
    call(p)
    cu = p["cu_seqlens"]
    bad = torch.tensor([0, 17, 16], dtype=cu.dtype, device=device)
    if write == "setitem":
        cu[1] = 17
    elif write == "copy_":
        cu.copy_(bad)
    else:
        cu.fill_(3)
    before = snapshot(p)
    with pytest.raises(ValueError, match="non-decreasing|start at 0"):
        call(p)
    assert unchanged(before, p) == []
    assert reads["n"] == 2
    cu.copy_(torch.tensor([0, 5, 16], dtype=cu.dtype, device=device))  # valid again: accepted
    call(p)
    assert reads["n"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_another_cu_seqlens_object_is_read(device, reads):
    p = varlen_problem(device)
    call(p)
    call(p, cu_seqlens=p["cu_seqlens"].clone())
    assert reads["n"] == 2
    view = p["cu_seqlens"][:]  # a view is another object too
    call(p, cu_seqlens=view)
    assert reads["n"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_remembered_cu_seqlens_still_checked_against_the_token_count(device, reads):
    p = varlen_problem(device)
    call(p)
    short = {k: p[k][:15] for k in ("q", "k", "v", "g", "beta", "out")}
    before = snapshot(p)
    with pytest.raises(ValueError, match="end at the total token count 15, got 16"):
        call(dict(p, **short))
    assert unchanged(before, p) == []


def test_memo_does_not_outlive_the_tensor(reads):
    p = varlen_problem("cpu")
    call(p)
    cu_values = p["cu_seqlens"].tolist()
    p["cu_seqlens"] = None
    gc.collect()
    memo = _validate._checked_offsets
    assert memo is not None and memo[0]() is None  # a weak reference: the tensor is gone
    p["cu_seqlens"] = torch.tensor(cu_values, dtype=torch.int32)
    call(p)
    assert reads["n"] == 2


def test_inference_tensor_cu_seqlens_is_read_on_every_call(reads):
    """Tensors made under inference_mode have no version counter: nothing tells a write."""
    p = varlen_problem("cpu")
    with torch.inference_mode():
        p["cu_seqlens"] = p["cu_seqlens"].clone()
        call(p)
        p["cu_seqlens"][1] = 17  # not seen by any version counter
        with pytest.raises(ValueError, match="non-decreasing"):
            call(p)
    assert reads["n"] == 2


def test_cpu_cu_seqlens_is_read_on_every_call(monkeypatch):
    counter = count_reads(monkeypatch)
    p = varlen_problem("cpu")
    call(p)
    call(p)
    assert counter["n"] == 2


@pytest.mark.parametrize("state", ["initial_state", "final_state", "in_place"])
def test_out_may_not_overlap_a_state(state):
    """out laid over a state's memory is refused: separate states, and one state updated in place."""
    p = make_problem(B=1, T=64, hqk=1, hv=1, D=64, dtype=torch.float32, state=True, seed=0)
    h0 = p["initial_state"]                      # [1, 1, 64, 64]: as many floats as out
    ht = torch.empty_like(h0)
    if state == "in_place":
        ht = h0
    target = h0 if state != "final_state" else ht
    out = target.view(p["v"].shape)
    before = snapshot(dict(p, ht=ht))
    with pytest.raises(ValueError, match="out overlaps (initial|final)_state"):
        flash_kda.fwd(p["q"], p["k"], p["v"], p["g"], p["beta"], 0.125, out, p["A_log"],
                      p["dt_bias"], -5.0, initial_state=h0, final_state=ht)
    assert unchanged(before, dict(p, ht=ht)) == []


# The direct entry (csrc/python_entry.cpp): kda_fwd's arguments straight from Python, past torch's
# dispatcher. Where it runs it must write exactly what the op writes; where the dispatcher could do
# anything else (a tensor subclass, a dispatch mode, autograd recording, another device type) it
# must decline, write nothing, and leave the call to the op.

def direct_problem(device):
    """varlen_problem as the op takes it: [1, S, H, D] tokens; destinations poisoned."""
    p = varlen_problem(device)
    for name in ("q", "k", "v", "g", "beta", "out"):
        p[name] = p[name].unsqueeze(0)
    p["out"].fill_(float("nan"))
    p["final_state"].fill_(float("nan"))
    return p


def op_args(p, **over):
    """kda_fwd's arguments, in its order (as api._run_unchecked passes them)."""
    a = dict(q=p["q"], k=p["k"], v=p["v"], g=p["g"], beta=p["beta"], A_log=p["A_log"],
             dt_bias=p["dt_bias"], initial_state=p["initial_state"], final_state=p["final_state"],
             out=p["out"], cu_seqlens=p["cu_seqlens"], scale=0.125, lower_bound=-5.0,
             use_qk_l2norm=True, state_in_place=False, workspace=None)
    a.update(over)
    return tuple(a.values())


def loaded_kernel(p):
    from flash_kda import _ops
    return _ops.kernel_for(p["q"].device, p["q"].shape[-1], p["q"].dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_direct_entry_writes_what_the_op_writes(device):
    p = direct_problem(device)
    kernel = loaded_kernel(p)
    assert kernel.direct is not None, "the library exports no direct entry"
    assert kernel.direct(*op_args(p)) is True
    direct_out, direct_state = p["out"].clone(), p["final_state"].clone()
    assert torch.isfinite(direct_out).all() and torch.isfinite(direct_state).all()
    p["out"].fill_(float("nan"))
    p["final_state"].fill_(float("nan"))
    kernel.op(*op_args(p))
    assert torch.equal(p["out"], direct_out) and torch.equal(p["final_state"], direct_state)


class _Sub(torch.Tensor):
    pass


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _declined(p, context, **over):
    kernel = loaded_kernel(p)
    before = snapshot(p)
    with context:
        ran = kernel.direct(*op_args(p, **over))
    return ran is False and unchanged(before, p) == []


@pytest.mark.parametrize("case", ["subclass", "dispatch mode", "requires grad", "bool scale",
                                  "tensor scale", "flag not a bool", "negative bit", "zero tensor",
                                  "included key", "profiler"])
def test_direct_entry_declines_what_the_dispatcher_would_handle(case):
    import contextlib
    p = direct_problem("cpu")
    ctx, over = contextlib.nullcontext(), {}
    if case == "subclass":
        over = dict(q=p["q"].as_subclass(_Sub))
    elif case == "dispatch mode":
        ctx = _Recorder()
    elif case == "negative bit":  # the same values, the memory holding their negation
        over = dict(beta=torch._neg_view(-p["beta"]))
    elif case == "zero tensor":  # no memory behind it
        over = dict(beta=torch._efficientzerotensor(p["beta"].shape))
    elif case == "included key":  # as functionalize, jit.trace (Tracer) and the like include
        ctx = torch._C._IncludeDispatchKeyGuard(torch._C.DispatchKey.Functionalize)
    elif case == "profiler":
        ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    elif case == "requires grad":
        over = dict(v=p["v"].clone().requires_grad_())
        ctx = torch.enable_grad()
    elif case == "bool scale":
        over = dict(scale=True)
    elif case == "tensor scale":
        over = dict(scale=torch.tensor(0.125))
    else:
        over = dict(use_qk_l2norm=1)
    assert _declined(p, ctx, **over)


def test_direct_entry_runs_without_grad_recording():
    """A tensor that requires grad is fine where nothing records (no_grad, inference_mode)."""
    p = direct_problem("cpu")
    kernel = loaded_kernel(p)
    v = p["v"].clone().requires_grad_()
    with torch.no_grad():
        assert kernel.direct(*op_args(p, v=v)) is True
    assert torch.isfinite(p["out"]).all()


def test_direct_entry_declines_another_device_type():
    p = direct_problem("cpu")
    meta = {k: (t.to("meta") if isinstance(t, torch.Tensor) else t) for k, t in p.items()}
    assert loaded_kernel(p).direct(*op_args(meta)) is False


def test_direct_entry_reports_bad_arguments_like_the_op():
    from flash_kda.api import _INVALID
    p = direct_problem("cpu")
    before = snapshot(p)
    with pytest.raises(ValueError) as e:
        loaded_kernel(p).direct(*op_args(p, out=p["out"][:, :1]))
    assert str(e.value).startswith(_INVALID) and "out" in str(e.value)
    assert unchanged(before, p) == []
    with pytest.raises(TypeError, match="16 arguments"):
        loaded_kernel(p).direct(*op_args(p)[:15])


def test_fwd_under_a_dispatch_mode_goes_through_the_op():
    """Declined calls still run, through the op, where the mode sees them."""
    p = direct_problem("cpu")
    mode = _Recorder()
    with mode:
        call(p)
    assert any("flash_kda_kernels" in op for op in mode.ops), mode.ops
    assert torch.isfinite(p["out"]).all()


def test_fwd_with_a_negative_bit_input_reads_its_values():
    """A lazily negated view (memory -x, value x) reaches the kernel materialised, through the op."""
    p = direct_problem("cpu")
    call(p)
    want = p["out"].clone()
    p["out"].fill_(float("nan"))
    call(dict(p, beta=torch._neg_view(-p["beta"])))
    assert torch.equal(p["out"], want)


def test_fwd_under_the_profiler_shows_the_op():
    p = direct_problem("cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(p)
    assert any("flash_kda_kernels" in e.key for e in prof.key_averages())


def test_direct_entry_survives_being_fetched_again(tmp_path):
    """Each fetch of the entry hands out a reference of its own: forgetting the loaded kernels and
    loading them again (tests, a changed environment) must not free the function in use. Run in a
    child process, where a crash cannot take the test run with it."""
    import os
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from flash_kda import _ops\n"
        "from test_host_path import direct_problem, loaded_kernel, op_args\n"
        "p = direct_problem('cpu')\n"
        "held = []\n"
        "for _ in range(4):\n"
        "    _ops.forget_kernels()\n"
        "    held.append(loaded_kernel(p).direct)\n"
        "    del held[:-1]\n"
        "    assert held[-1](*op_args(p)) is True\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(__file__), timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])


def test_fwd_without_a_direct_entry_writes_the_same(monkeypatch):
    """A library without the entry (kernel.direct None: the op alone, with the Python type checks
    the entry otherwise makes) gives the same bits."""
    p = direct_problem("cpu")
    call(p)
    want = p["out"].clone(), p["final_state"].clone()
    monkeypatch.setattr(loaded_kernel(p), "direct", None)
    p["out"].fill_(float("nan"))
    p["final_state"].fill_(float("nan"))
    call(p)
    assert torch.equal(p["out"], want[0]) and torch.equal(p["final_state"], want[1])


def test_direct_entry_can_be_turned_off(monkeypatch):
    """FLASH_KDA_DIRECT_ENTRY=0: kernels loaded from then on have no direct entry, and fwd runs."""
    from flash_kda import _ops
    monkeypatch.setenv("FLASH_KDA_DIRECT_ENTRY", "0")
    _ops.forget_kernels()
    try:
        p = direct_problem("cpu")
        assert loaded_kernel(p).direct is None
        call(p)
        assert torch.isfinite(p["out"]).all()
    finally:
        monkeypatch.delenv("FLASH_KDA_DIRECT_ENTRY")
        _ops.forget_kernels()
    assert loaded_kernel(p).direct is not None
