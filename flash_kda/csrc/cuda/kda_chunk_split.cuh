// kda_chunk_split.cuh: the two-kernel form of the tensor-core body (NVIDIA sm_80 and newer).
//
// Why two kernels. In the fused body (kda_chunk_tc.cuh, run_block) every chunk's K-side (loads,
// norms, decays, A_kk, A_qk: about two thirds of a chunk's time, docs/performance.md) sits on the
// sequential path of the recurrence, in a grid of only sequences x heads x V slices blocks. None of
// it depends on the state, so here it moves to a preparation kernel with one block per (chunk,
// head): every chunk of every sequence at once. It also solves the chunk's triangular system for
// the state-independent right-hand sides. With T = (I + diag(β) A_kk)^{-1} diag(β):
//     U  = T (V - (K e^γ) S0ᵀ) = U0 - W S0ᵀ,   U0 = T V,  W = T (K e^γ)
// so the recurrence kernel is left with three products against the state per chunk and no solve:
//     U = U0 - W S0ᵀ,   O = (Q e^γ) S0ᵀ + A_qk U,   S = S0 diag(e^{γ_last}) + Uᵀ (K e^{γ_last - γ}).
// The price is a scratch round trip (Record, kda_split_records.cuh) through global memory, which
// the recurrence overlaps with its math: it copies the next chunk's operands with cp.async (bulk
// copies in the in-step kernel) while it works.
//
// Scratch. One Record per (slot, value head); the chunks of sequence n use the slots
// [slot_base(n), slot_base(n) + ceil(len_n / C)). Dense: slot_base(n) = n ceil(T / C). Varlen:
// slot_base(n) = floor(start_n / C) + n, which leaves room for every sequence's chunks (the chunks
// of n end at most at floor(start_{n+1} / C) + n + 1) and needs no prefix sum; some slots stay unused.
// Slots stay inside [0, num_slots) even for a malformed cu_seqlens (seq_range clamps it), so no
// access leaves the scratch; but non-increasing starts make sequences share slots, so such input
// gets undefined values (the front end rejects it before launching, as for every body).
//
// The form in four headers, each included here (this file is what kda_cuda.cu and the emulator include):
//   kda_split_records.cuh     the record, its slots, the preparation's grid, pieces (host and device)
//   kda_split_fp16.cuh        fp16 operands: power-of-two scales, fragments, core-matrix order
//   kda_split_prep.cuh        the preparation kernel's body (prep_block)
//   kda_split_recurrence.cuh  the recurrence kernel's body (recurrence_block)
#pragma once

#include "kda_split_records.cuh"
#include "kda_split_fp16.cuh"
#include "kda_split_prep.cuh"
#include "kda_split_recurrence.cuh"
