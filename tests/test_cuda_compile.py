"""Compile the CUDA sources with the machine's nvcc, without a GPU, so compile errors surface in
CI. The device translation unit includes no torch headers, so plain `nvcc -c` builds it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flash_kda.jit.backends.cuda import gencode_flags, parse_arch_list
from flash_kda.jit.backends.base import PACKAGE_CSRC
from flash_kda.jit.spec import KernelSpec

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")


@pytest.mark.parametrize("arch,variant,head_dim,dtype", [
    ("8.0", "fast", 128, "bf16"),
    ("9.0a", "fast", 128, "bf16"),
    ("9.0a", "portable", 64, "fp16"),
    ("9.0a", "fast", 256, "fp16"),
])
def test_nvcc_compiles_cuda_sources(tmp_path, arch, variant, head_dim, dtype):
    archs = parse_arch_list(arch)
    spec = KernelSpec("cuda", "sm" + arch.replace(".", ""), head_dim, dtype, variant)
    cmd = [NVCC, "-std=c++17", "-O3", *gencode_flags(archs), *spec.defines(),
           "-I", str(PACKAGE_CSRC), "-c", str(PACKAGE_CSRC / "cuda" / "kda_cuda.cu"),
           "-o", str(tmp_path / "kda_cuda.o"), "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    # wgmma (sm_90a): ptxas serialises the products or adds fences and waits of its own where the
    # code leaves it in doubt (messages C7510-C7520); the recurrence is written so that it need not.
    for text in ("wgmma.mma_async instructions are serialized", "is injected"):
        assert text not in res.stdout + res.stderr, f"ptxas: {text}\n{res.stderr[-3000:]}"
    obj = (tmp_path / "kda_cuda.o").read_bytes()
    # The fast build carries the tensor-core kernels (fused, and the two-kernel form) next to the
    # portable ones (the launcher picks at run time); the portable build, like every MUSA build,
    # must not contain them.
    assert b"kda_portable_kernel" in obj
    for kernel in (b"kda_tc_kernel", b"kda_prep_kernel", b"kda_recurrence_kernel"):
        assert (kernel in obj) == (variant == "fast"), f"{kernel.decode()} in a {variant} build"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_workspace_formula_matches_the_record(tmp_path, head_dim):
    """flash_kda/_workspace.py sizes the scratch that get_workspace_size reports; the C++ Record
    decides what the kernels write. A static_assert compiled against the header ties the two."""
    from flash_kda._workspace import SPLIT_CHUNK, split_scratch_bytes
    record_bytes = split_scratch_bytes(1, 1, head_dim)
    src = tmp_path / "record_size.cu"
    src.write_text(
        '#include "cuda/kda_split_records.cuh"\n'
        f"static_assert(flash_kda::tc::Record<{head_dim}, {SPLIT_CHUNK}>::kFloats * 4 == {record_bytes},\n"
        '              "flash_kda/_workspace.py disagrees with Record");\n')
    cmd = [NVCC, "-std=c++17", "-DFLASH_KDA_BACKEND_CUDA", f"-DFLASH_KDA_HEAD_DIM={head_dim}",
           "-DFLASH_KDA_DTYPE_BF16", "-I", str(PACKAGE_CSRC), "-c", str(src), "-o",
           str(tmp_path / "record_size.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


def split_record_stores(ptx: str) -> list[str]:
    """Base registers of the preparation kernels' vector stores that the compiler split: a 4-byte
    global store to [%rd] with one to [%rd+4] among the next two stores (how a uint4 or float2 store
    came out of nvcc, s17)."""
    bad = []
    for entry in re.split(r"\n(?:\.visible )?\.entry ", ptx)[1:]:
        if "kda_prep_kernel" not in entry.split("(", 1)[0]:
            continue
        stores = re.findall(r"st\.global\.(?:[a-z]+\.)?[a-z]?\d+\s+\[(%rd\d+)(?:\+(\d+))?\]", entry)
        for i, (reg, off) in enumerate(stores):
            if not off and any(r == reg and o == "4" for r, o in stores[i + 1:i + 3]):
                bad.append(reg)
    return bad


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_record_stores_stay_vector_stores(tmp_path, head_dim):
    """The preparation writes each lane's 16 bytes of an fp16 record array and 8 bytes of U0 with one
    store. Written as plain uint4 / float2 stores they reached the PTX as four or two 4-byte stores,
    up to 4x the L2 sectors per store instruction (Nsight Compute, docs/performance.md v17), so they go
    through ptx.cuh's st16_global / st8_global. The check itself is tested on such a split below."""
    spec = KernelSpec("cuda", "sm90a", head_dim, "bf16", "fast")
    out = tmp_path / "kda_cuda.ptx"
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90a", *spec.defines(), "-I", str(PACKAGE_CSRC),
           "-ptx", str(PACKAGE_CSRC / "cuda" / "kda_cuda.cu"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    ptx = out.read_text()
    assert ptx.count(".entry ") and "kda_prep_kernel" in ptx
    assert split_record_stores(ptx) == []
    # the detector on the split it is for (a uint4 stored as four words, a float2 as two)
    fake = ("\n.entry _Z15kda_prep_kernel(\n st.global.u32 [%rd7], %r1;\n st.global.u32 [%rd7+4], %r2;\n"
            " st.global.u32 [%rd7+8], %r3;\n st.global.u32 [%rd7+12], %r4;\n"
            " st.global.f32 [%rd9], %f1;\n st.global.f32 [%rd9+4], %f2;\n"
            " st.global.u32 [%rd5+4], %r5;\n st.global.u32 [%rd5+8], %r6;\n st.global.u32 [%rd5], %r7;\n}")
    assert split_record_stores(fake) == ["%rd7", "%rd9"]


# (T, H, N) -> (pieces, recurrence V slice; 0 = the usual choice): the best setting of each shape
# measured with the wgmma recurrence (branch wip/wgmma-pieces) on the H200 in session 13
# (docs/performance.md v13; VS 32 / 64 / 128 x 1 / 4 / 8 pieces), and a shape where pieces lost;
# varlen calls ("v": N sequences of T tokens in all), measured on the H100 in session 15 (v15): one
# sequence of 32768 tokens at H=32 is cut (as the dense call), the varlen shapes at H=96
# (cut, 1-7 % slower) and 4 x 8192 at H=32 (cut, +1 %) stay whole; the rule reads the mean length.
SPLIT_PLAN_EXPECTED = {
    (32768, 32, 1): (8, 64), (8192, 96, 1): (4, 64), (8192, 64, 1): (4, 64), (16384, 16, 1): (4, 64),
    (8192, 32, 1): (4, 64), (512, 64, 1): (1, 0),
    (32768, 32, 1, "v"): (8, 64), (8192, 96, 6, "v"): (1, 0), (8192, 96, 8, "v"): (1, 0),
    (32768, 32, 4, "v"): (1, 0),
    (16384, 16, 4, "v"): (1, 0),  # mean 4096 tokens: like the dense 4 x 4096 (128 chunks < 256), whole
}


def test_split_plan_picks_the_measured_best(tmp_path, monkeypatch):
    """kda_cuda.cu's split_plan (the automatic pieces rule) on an H100-like device description
    (compute capability 9.0, 132 SMs, as the H200 of the measurements), run on the host: it must
    pick, for every shape timed in session 13, the setting that was fastest there (pieces and
    recurrence V slice), and one piece where pieces lost."""
    for name in ("FLASH_KDA_CUDA_PIECES", "FLASH_KDA_CUDA_VSLICE", "FLASH_KDA_CUDA_THREADS"):
        monkeypatch.delenv(name, raising=False)
    exe = tmp_path / "split_plan_check"
    spec = KernelSpec("cuda", "sm90a", 128, "bf16", "fast")
    cmd = [NVCC, "-std=c++17", "-O1", *gencode_flags(parse_arch_list("9.0a")), *spec.defines(),
           "-I", str(PACKAGE_CSRC), str(Path(__file__).resolve().parent / "cpp" / "split_plan_check.cu"),
           "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    shapes = [":".join(str(x) for x in shape) for shape in SPLIT_PLAN_EXPECTED]
    out = subprocess.run([str(exe), *shapes], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = {tuple(x if x == "v" else int(x) for x in line.split()[0].split(":")):
           tuple(int(x) for x in line.split()[1:]) for line in out.stdout.splitlines()}
    assert got == SPLIT_PLAN_EXPECTED


def test_recurrence_register_cap_compiles_and_holds(tmp_path):
    """FLASH_KDA_RECURRENCE_MAXNREG (kda_cuda.cu; a benchmarking knob set through
    FLASH_KDA_EXTRA_CUDA_CFLAGS) replaces the recurrence's launch bounds by a register cap: every
    recurrence kernel then uses at most that many registers, and nothing else changes."""
    cap = 208
    archs = parse_arch_list("9.0a")
    spec = KernelSpec("cuda", "sm90a", 128, "bf16", "fast")
    cmd = [NVCC, "-std=c++17", "-O3", *gencode_flags(archs), *spec.defines(), f"-DFLASH_KDA_RECURRENCE_MAXNREG={cap}",
           "-I", str(PACKAGE_CSRC), "-c", str(PACKAGE_CSRC / "cuda" / "kda_cuda.cu"),
           "-o", str(tmp_path / "kda_cuda.o"), "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    used = {}  # kernel name -> registers, from ptxas -v
    name = None
    for line in (res.stdout + res.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None:
            used[name] = int(m.group(1))
            name = None
    recurrences = {k: v for k, v in used.items() if "kda_recurrence_kernel" in k}
    assert len(recurrences) >= 3, used
    assert all(v <= cap for v in recurrences.values()), recurrences
    # the preparation keeps its launch bounds (512 threads, two blocks: at most 64 registers; under
    # the cap instead it would take ~100, as its 256-thread layout does)
    wide_prep = {k: v for k, v in used.items() if "kda_prep_kernel" in k and "Li512E" in k}
    assert len(wide_prep) == 1 and all(v <= 64 for v in wide_prep.values()), used
