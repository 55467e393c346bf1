"""Scratch size of the CUDA two-kernel path, as the C++ side computes it.

Must match ``Record<D, C>`` / ``num_slots`` / ``split_scratch_bytes`` / ``carry_bytes`` in
csrc/cuda/kda_split_records.cuh (and the chunk kSplitChunk in csrc/cuda/kda_cuda.cu): one Record
per (slot, value head), a slot per chunk of C tokens.
"""

from __future__ import annotations

import os
import re

SPLIT_CHUNK = 32  # C: tokens per chunk of the split path (kSplitChunk)


def split_scratch_bytes(num_slots: int, hv: int, head_dim: int, chunk: int = SPLIT_CHUNK) -> int:
    """Bytes for `num_slots` chunk slots of `hv` value heads of head dim D (K == V)."""
    # Record<D, C>::kFloats (kda_split_records.cuh): W, Q e^γ, Klᵀ, U0 ([C, D] fp16 each) at two
    # halves per float; A_qk's n (n + 1) / 2 core matrices on or below the diagonal (n = C / 8; 32
    # floats each); e^{γ_last} [D] fp32; U0's inverse scales (one per 8 channels), the other four
    # arrays' and Klᵀ's scale; padded to a whole number of 128-byte lines
    n = chunk // 8
    record_floats = 4 * chunk * head_dim // 2 + 16 * n * (n + 1) + head_dim + head_dim // 8 + 5
    record_floats = -(-record_floats // 32) * 32
    return num_slots * hv * record_floats * 4


def varlen_slots(total_tokens: int, num_seqs: int, chunk: int = SPLIT_CHUNK) -> int:
    """num_slots for cu_seqlens: T_total // C + N. It bounds the dense count B * ceil(T / C) of N = B
    sequences of T_total / N tokens too."""
    return total_tokens // chunk + num_seqs


def carry_bytes(num_seqs: int, hv: int, head_dim: int) -> int:
    """The fp32 state [N, hv, D, D] that a call cut into pieces carries from one stretch of chunks to
    the next (``carry_bytes`` in kda_split_records.cuh); placed after the records."""
    return num_seqs * hv * head_dim * head_dim * 4


def _atoi(value: str) -> int:
    """C's atoi: optional blanks and sign, then leading digits; no digits reads as 0."""
    m = re.match(r"\s*([+-]?\d+)", value)
    return int(m.group(1)) if m is not None else 0


def split_possible() -> bool:
    """Whether this process may run the CUDA two-kernel form: a CUDA build of torch with a visible
    device, and the fast kernel variant (FLASH_KDA_KERNEL). CPU, MUSA and portable builds use no
    workspace. (A pre-sm_80 device does not run it either; the size is then merely unused.)"""
    import torch

    from .jit import env
    return (torch.version.cuda is not None and torch.cuda.is_available()
            and env.kernel_variant() == "fast")


def split_selected() -> bool:
    """Whether the CUDA two-kernel form is selected (the default): FLASH_KDA_CUDA_SPLIT unset or
    empty, or a value that C atoi reads as non-zero (optional blanks and sign, then leading digits;
    no digits reads as 0). Parsed as kda_cuda.cu parses it; C++ reads it once per process, this on
    every call: set it before the first launch."""
    value = os.environ.get("FLASH_KDA_CUDA_SPLIT", "")
    return value == "" or _atoi(value) != 0
