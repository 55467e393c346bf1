"""fla compatibility: with fla-core installed beside flash_kda, fla's own ``chunk_kda`` (inference,
bf16, head dim 128, gate/l2norm/beta-sigmoid in kernel, safe_gate, state_v_first, fp32 final state)
dispatches to ``flash_kda.fwd`` and matches fla's Triton result. Needs a CUDA GPU and fla-core."""

from __future__ import annotations

import pytest
import torch

import flash_kda
from conftest import cuda_ok
from kda_testing import reference_of, rel_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_ok(), reason="fla's Triton kernels need a CUDA GPU")]


def test_fla_chunk_kda_dispatches_to_flash_kda_and_matches_triton(monkeypatch):
    fla_kda = pytest.importorskip("fla.ops.kda", reason="fla-core is not installed")
    torch.manual_seed(0)
    dev, H, D = "cuda", 4, 128
    seqlens = [100, 1, 700, 223]
    S, N = sum(seqlens), len(seqlens)
    q, k, v, g = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    beta = torch.randn(1, S, H, device=dev, dtype=torch.bfloat16)
    A_log = torch.rand(H, device=dev) * 2 - 1
    dt_bias = torch.randn(H * D, device=dev) * 0.5
    h0 = torch.randn(N, H, D, D, device=dev) * 0.5
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=dev, dtype=torch.int32)

    calls = []
    real_fwd = flash_kda.fwd

    def counting_fwd(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens"))
        return real_fwd(*args, **kwargs)

    monkeypatch.setattr(flash_kda, "fwd", counting_fwd)

    def fla_call():
        return fla_kda.chunk_kda(
            q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
            safe_gate=True, lower_bound=-5.0, state_v_first=True, cu_seqlens=cu,
            A_log=A_log, dt_bias=dt_bias)

    with torch.inference_mode():
        monkeypatch.setenv("FLA_FLASH_KDA", "1")
        o_ours, s_ours = fla_call()
        assert len(calls) == 1, "fla did not dispatch chunk_kda to flash_kda.fwd"
        monkeypatch.setenv("FLA_FLASH_KDA", "0")
        o_tri, s_tri = fla_call()
        assert len(calls) == 1, "FLA_FLASH_KDA=0 should run fla's Triton kernel"

    assert s_ours.dtype == torch.float32 and s_ours.shape == (N, H, D, D)
    p = dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias.view(H, D),
             initial_state=h0, cu_seqlens=cu)
    ref_o, ref_s = reference_of(p)
    e = {"ours_vs_triton_out": rel_l2(o_ours, o_tri), "ours_vs_triton_state": rel_l2(s_ours, s_tri),
         "ours_out": rel_l2(o_ours, ref_o), "ours_state": rel_l2(s_ours, ref_s),
         "triton_out": rel_l2(o_tri, ref_o), "triton_state": rel_l2(s_tri, ref_s)}
    print(e)
    assert e["ours_vs_triton_out"] < 1e-2 and e["ours_vs_triton_state"] < 1e-2, e
    assert e["ours_out"] < 8e-3 and e["ours_state"] < 3e-3, e
