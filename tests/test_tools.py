"""The analysis tools under tools/ that tests can check without a GPU (synthetic inputs)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import sass_load_chains  # noqa: E402

# (case, SASS lines in code order, the depth sass_load_chains must give each LDG)
CHAIN_CASES = [
    ("loads issued together share one round trip",
     ["LDG.E.128 R4, desc[UR6][R20.64]", "@P1 LDG.E R8, desc[UR6][R22.64]",
      "LDG.E.U16 R9, desc[UR6][R24.64]", "FADD R10, R4, R8"],
     [1, 1, 1]),
    # R6 lies in the first load's four registers and is used before the second load
    ("a load after a use waits for it",
     ["LDG.E.128 R4, desc[UR6][R20.64]", "IMAD.U32 R12, R6, 0x10000, RZ", "LDG.E.128 R16, desc[UR6][R22.64]",
      "PRMT R13, R16, 0x7632, R13", "@!P0 LDG.E R2, desc[UR6][R24.64]"],
     [1, 2, 3]),
    ("a store's address from a load is a use",
     ["LDG.E R2, desc[UR6][R20.64]", "@P0 STS [R2+0x10], R7", "LDG.E R5, desc[UR6][R22.64]"],
     [1, 2]),
    ("an address from a load is a use",
     ["LDG.E.64 R2, desc[UR6][R20.64]", "LDG.E R5, desc[UR6][R2.64]"],
     [1, 2]),
    # R4 is rewritten by an unpredicated instruction before anything reads it: no dependence
    ("a register overwritten before use ends the wait",
     ["LDG.E R4, desc[UR6][R20.64]", "MOV R4, RZ", "FADD R7, R4, R4", "LDG.E R8, desc[UR6][R22.64]"],
     [1, 1]),
]


@pytest.mark.parametrize("listing,depths", [c[1:] for c in CHAIN_CASES], ids=[c[0] for c in CHAIN_CASES])
def test_load_chain_depths(listing, depths):
    assert [d for _, _, d in sass_load_chains.chains(list(enumerate(listing)))] == depths


def test_emu_outputs_compare(tmp_path, capsys):
    """tools/emu_outputs.py compare: identical saves pass (exit 0); one changed element of one output,
    or a problem missing from the second save, fails (exit 1) and names the problem."""
    import torch

    import emu_outputs

    g = torch.Generator().manual_seed(0)
    saved = {name: (torch.randn(3, 4, generator=g), torch.randn(2, 2, generator=g)) for name in ("a", "b")}
    torch.save(saved, tmp_path / "x.pt")
    torch.save({k: (o.clone(), f.clone()) for k, (o, f) in saved.items()}, tmp_path / "same.pt")
    assert emu_outputs.compare(str(tmp_path / "x.pt"), str(tmp_path / "same.pt")) == 0
    changed = {k: (o.clone(), f.clone()) for k, (o, f) in saved.items()}
    changed["b"][0][1, 2] += 1e-6
    torch.save(changed, tmp_path / "changed.pt")
    assert emu_outputs.compare(str(tmp_path / "x.pt"), str(tmp_path / "changed.pt")) == 1
    assert "b: out differs" in capsys.readouterr().out
    torch.save({"a": saved["a"]}, tmp_path / "fewer.pt")
    assert emu_outputs.compare(str(tmp_path / "x.pt"), str(tmp_path / "fewer.pt")) == 1
    assert "b: missing" in capsys.readouterr().out


def _ncu_listing(rows, shared=None, glob=None):
    """A small listing in the layout of `ncu --page source --print-source sass`: a dashed line
    giving the column widths, a header whose names wrap inside them, then one row per instruction.
    shared: per row (wavefronts, excess), for the shared-memory wavefront columns of `--set full`.
    glob: per row (address space, operation, L1 tag requests, L2 sectors, wasted sectors), for its
    global-access columns."""
    cols = [("Address", 18), ("Source", 40), ("Warp Stall Sampling (All Samples)", 6),
            ("Warp Stall Sampling (Not-issued Samples)", 6), ("Instructions Executed", 7),
            ("stall_barrier", 6), ("stall_barrier (Not Issued)", 6), ("stall_long_sb", 6)]
    if shared:
        cols[5:5] = [("L1 Wavefronts Shared Excessive", 6), ("L1 Wavefronts Shared", 6),
                     ("L1 Wavefronts Shared Ideal", 6)]
    if glob:  # (ncu's order: the operation's columns, then the tag and sector counts)
        cols[5:5] = [("Address Space", 8), ("Access Operation", 8), ("L1 Tag Requests Global", 6),
                     ("L2 Theoretical Sectors Global Excessive", 6), ("L2 Theoretical Sectors Global", 6),
                     ("L2 Theoretical Sectors Global Ideal", 6)]
    wrapped = [[name[i:i + w] for i in range(0, len(name), w)] for name, w in cols]
    out = [" ".join("-" * w for _, w in cols)]
    for r in range(max(map(len, wrapped))):
        out.append(" ".join((c[r] if r < len(c) else "").ljust(w) for c, (_, w) in zip(wrapped, cols)))
    for k, (instr, samples, executed, barrier, long_sb) in enumerate(rows):
        cells = [f"0x{16 * k:x}", instr, samples, 0, executed, barrier, barrier, long_sb]
        if shared:
            wavefronts, excess = shared[k]
            cells[5:5] = [excess, wavefronts, wavefronts - excess]
        if glob:
            space, op, tags, sectors, wasted = glob[k]
            cells[5:5] = [space, op, tags, wasted, sectors, sectors - wasted]
        out.append(" ".join(str(v).ljust(w) for v, (_, w) in zip(cells, cols)))
    return "\n".join(["Kernel Name        k", *out]) + "\n"


def test_ncu_segments_attributes_barrier_waits_to_the_barrier_before(tmp_path, capsys, monkeypatch):
    import ncu_segments

    # the instruction that fills its column exactly is what the old regex parser misread
    rows = [("LDG.E R4, desc[UR6][R20.64]", 30, 64, 0, 25),
            ("@P2 FSETP.GEU.AND P4, PT, |R48|, 1e-38, PT".ljust(40)[:40], 5, 64, 0, 0),
            ("BAR.SYNC.DEFER_BLOCKING 0x0", 1, 64, 1, 0),
            ("ISETP.NE.AND P0, PT, R2, RZ, PT", 2, 64, 0, 0),
            ("@!P0 BRA 0x400", 40, 64, 38, 0),  # where the barrier's waiters are sampled
            ("EXIT", 0, 64, 0, 0)]
    path = tmp_path / "sass.txt"
    path.write_text(_ncu_listing(rows))
    parsed = ncu_segments.parse(str(path))
    assert [r[1] for r in parsed] == [30, 5, 1, 2, 40, 0]
    assert [r[2] for r in parsed] == [64] * 6
    assert parsed[4][3] == {"barrier": 38}  # the "not issued" column is not a reason of its own
    segs = ncu_segments.segments(parsed)
    assert [len(s) for s in segs] == [3, 3]
    monkeypatch.setattr(sys, "argv", ["ncu_segments.py", str(path)])
    ncu_segments.main()
    out = capsys.readouterr().out
    assert "78 stall samples" in out
    assert "after 0: 48.7" in out  # 38 of 78 samples: warps waiting at segment 0's barrier
    assert "long_sb 32.1" in out


def test_ncu_segments_counts_shared_wavefronts_per_phase(tmp_path, capsys, monkeypatch):
    """With `--set full`'s columns, each phase gets its shared-memory wavefronts: its share of the
    kernel's, per block with --blocks, and the share that bank conflicts added."""
    import ncu_segments

    rows = [("LDS.128 R4, [R2]", 3, 64, 0, 0), ("STS [R2], R4", 1, 64, 0, 0),
            ("BAR.SYNC.DEFER_BLOCKING 0x0", 0, 64, 0, 0), ("LDSM.16.M88.4 R8, [R3]", 2, 64, 1, 0),
            ("EXIT", 0, 64, 0, 0)]
    path = tmp_path / "sass.txt"
    path.write_text(_ncu_listing(rows, shared=[(40, 0), (20, 10), (0, 0), (140, 7), (0, 0)]))
    parsed = ncu_segments.parse(str(path))
    assert [r[4] for r in parsed] == [{"shared": 40, "excess": 0}, {"shared": 20, "excess": 10},
                                      {"shared": 0, "excess": 0}, {"shared": 140, "excess": 7},
                                      {"shared": 0, "excess": 0}]
    monkeypatch.setattr(sys, "argv", ["ncu_segments.py", str(path), "--blocks", "4"])
    ncu_segments.main()
    out = capsys.readouterr().out
    assert "200 shared-memory wavefronts (8.5% of them bank-conflict excess)" in out
    assert "30.0% of the kernel's, 15 a block (17% of them bank-conflict excess)" in out
    assert "70.0% of the kernel's, 35 a block (5% of them bank-conflict excess)" in out


def test_ncu_segments_counts_global_lines_per_phase(tmp_path, capsys, monkeypatch):
    """With `--set full`'s global-access columns, each phase gets its global loads and stores apart:
    warp-instructions, L1 tag requests per instruction (the lines it touches), per block with
    --blocks, and the share of L2 sectors wasted. Shared-memory rows do not count."""
    import ncu_segments

    rows = [("LDG.E.128 R4, desc[UR6][R2.64]", 3, 64, 0, 0), ("STS.128 [R2], R4", 1, 64, 0, 0),
            ("BAR.SYNC.DEFER_BLOCKING 0x0", 0, 64, 0, 0), ("STG.E.128 desc[UR6][R2.64], R8", 2, 64, 0, 0),
            ("STG.E.128 desc[UR6][R4.64], R8", 2, 32, 0, 0), ("EXIT", 0, 64, 0, 0)]
    glob = [("Global", "Load", 256, 1024, 0), ("Shared", "Store", 0, 0, 0), ("", "", 0, 0, 0),
            ("Global", "Store", 256, 1024, 0), ("Global", "Store", 512, 512, 128), ("", "", 0, 0, 0)]
    path = tmp_path / "sass.txt"
    path.write_text(_ncu_listing(rows, glob=glob))
    parsed = ncu_segments.parse(str(path))
    assert parsed[0][4] == {"load_executed": 64, "load_tags": 256, "load_sectors": 1024, "load_wasted": 0}
    assert parsed[1][4] == {} and parsed[3][4]["store_tags"] == 256
    monkeypatch.setattr(sys, "argv", ["ncu_segments.py", str(path), "--blocks", "8"])
    ncu_segments.main()
    out = capsys.readouterr().out
    assert "global loads: 64 warp-instructions, 4.0 L1 tag requests each, 32 tag requests a block," \
           " 1024 L2 sectors (0% of them wasted)" in out
    # 768 tag requests over 96 instructions; 128 of 1,536 sectors wasted
    assert "global stores: 96 warp-instructions, 8.0 L1 tag requests each, 96 tag requests a block," \
           " 1536 L2 sectors (8% of them wasted)" in out
    assert "global stores" not in out.split("segment  1")[0]


def test_prep_precision_model_factors_A_like_the_direct_formula():
    """tools/prep_precision_model.py forms A from the kernel's factored operands (reference tokens,
    M); with unrounded operands that must give the direct e^{γ_i - γ_j} formula, also under strong
    decays (gates at the lower bound), and the tril masks must match A_kk's and A_qk's causality.
    TF32 operands must then differ from it by about TF32's precision, not more."""
    import torch

    import prep_precision_model as ppm

    g = torch.Generator().manual_seed(3)
    L, K = 32, 64
    k = torch.randn(L, K, generator=g, dtype=torch.float64) / K ** 0.5
    q = torch.randn(L, K, generator=g, dtype=torch.float64) / K ** 0.5
    for a in (-torch.rand(L, K, generator=g, dtype=torch.float64),   # moderate decays
              torch.full((L, K), -5.0, dtype=torch.float64)):          # KDA's lower bound: spans of 115 log2
        gam = torch.cumsum(a, 0)
        decay = (gam[:, None, :] - gam[None, :, :]).clamp(max=0).exp()
        for rows, strict in ((k, True), (q, False)):
            direct = torch.einsum("ic,jc,ijc->ij", rows, k, decay)
            direct = direct * torch.tril(torch.ones(L, L, dtype=torch.float64), -1 if strict else 0)
            exact = ppm.a_products(rows, k, gam, "exact", strict)
            tf32 = ppm.a_products(rows, k, gam, "tf32", strict)
            assert ((exact - direct).norm() / direct.norm()).item() < 1e-6
            assert 1e-5 < ((tf32 - direct).norm() / direct.norm()).item() < 3e-3


def test_sass_path_count_follows_the_chosen_branches():
    """tools/sass_path_count.py: unconditional branches are followed, predicated ones only when
    listed, predicated-off instructions count, the walk stops at the stop pattern; another
    function's instructions are not read."""
    import sass_path_count as spc

    listing = """
        Function : other_kernel
        /*0000*/                   NOP ;
        Function : _Z4prepv
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;
        /*0020*/               @P0 BRA 0x50 ;
        /*0030*/                   MOV R1, RZ ;
        /*0040*/                   BRA 0x60 ;
        /*0050*/              @!P0 FADD R1, R1, 1 ;
        /*0060*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0070*/                   EXIT ;
        Function : after
        /*0000*/                   NOP ;
    """
    code = spc.kernel_listing(listing, r"_Z4prep")
    assert len(code) == 8
    # not taken: 0, 10, 20, 30, 40 -> 60 (stop) = 6 issued
    assert spc.walk(code, set(), "HMMA")[0] == 6
    # taken: 0, 10, 20 -> 50, 60 = 5 issued (the predicated-off FADD counts)
    count, met = spc.walk(code, {0x20}, "HMMA")
    assert count == 5 and met == ["20->50 (taken)"]
    assert spc.walk(code, set(), "EXIT_NEVER")[0] == 7  # runs to EXIT


def test_sass_loop_segments_cuts_the_longest_loop_at_its_waits():
    """tools/sass_loop_segments.py: the longest backward branch is the loop; its body is cut before
    each barrier or wait and before the first HGMMA of each run (set-up instructions between HGMMAs
    do not end a run); the instructions before the loop are not in it."""
    import sass_loop_segments as sls
    import sass_path_count as spc

    listing = """
        Function : _Z3recv
        /*0000*/                   MOV R1, RZ ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   FMUL R2, R2, R3 ;
        /*0030*/                   HGMMA.64x32x16.F32 R24, R120, gdesc[UR8], RZ, !UPT ;
        /*0040*/                   UIADD3 UR8, UR8, 0x2, URZ ;
        /*0050*/                   HGMMA.64x32x16.F32 R24, R124, gdesc[UR8], R24, gsb0 ;
        /*0060*/                   IMAD R5, R6, R7, RZ ;
        /*0070*/                   HGMMA.64x32x16.F32 R88, R152, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/                   FFMA R8, R24, R2, R8 ;
        /*00a0*/               @P0 BRA 0x10 ;
        /*00b0*/                   BRA 0x30 ;
        /*00c0*/                   EXIT ;
    """
    body = sls.main_loop(spc.kernel_listing(listing, r"_Z3rec"))
    assert [a for a, _ in body] == list(range(0x10, 0xb0, 0x10))  # 0x10..0xa0, the longer of two loops
    segs = [[a for a, _ in seg] for seg in sls.segments(body)]
    assert segs == [[0x10, 0x20], [0x30, 0x40, 0x50, 0x60], [0x70], [0x80, 0x90, 0xa0]]
    assert sls.opcode("@!P0 FADD R1, R1, 1") == "FADD"


def test_sass_loop_segments_skips_an_mbarrier_retry_stub():
    """tools/sass_loop_segments.py: an mbarrier wait's retry loop, placed after the function's EXIT
    and branching back into the chunk loop, spans more than the loop but is not it; the wait
    (SYNCS.PHASECHK) starts a segment."""
    import sass_loop_segments as sls
    import sass_path_count as spc

    listing = """
        Function : _Z3recv
        /*0000*/                   MOV R1, RZ ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R25+UR10+0xf500], R24 ;
        /*0030*/              @!P0 BRA 0x90 ;
        /*0040*/                   FMUL R2, R2, R3 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/               @P2 EXIT ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80 ;
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R25+UR10+0xf500], R24 ;
        /*00a0*/              @!P0 BRA 0x90 ;
        /*00b0*/                   BRA 0x40 ;
    """
    body = sls.main_loop(spc.kernel_listing(listing, r"_Z3rec"))
    assert [a for a, _ in body] == list(range(0x10, 0x60, 0x10))  # not 0x40..0xb0, the stub's way back
    segs = [[a for a, _ in seg] for seg in sls.segments(body)]
    assert segs == [[0x10], [0x20, 0x30, 0x40, 0x50]]


# kernel_times.py's rows as they come from a GPU (short() keeps the demangled name from "Layout" on)
KT_OUTPUT = """| shape | kernel | ms per call |
| --- | --- | ---: |
| T=8192 H=96 | kda_prep_kernel Layout<128, 32, 512> >(flash_kda::KdaParams, flash_kda::tc::PrepGrid) | {p1} |
| T=8192 H=96 | kda_recurrence_kernel RecurrenceLayout<128, 64, 32, 2> | 0.500 |
| T=8192 H=96 | kda_prep_kernel PrepLayout<128, 32, 256> | 0.100 |
| T=8192 H=96 | all | 9.999 |
| varlen 1300,547 H=96 | kda_prep_kernel PrepLayout<128, 32, 512> | {p2} |
| varlen 1300,547 H=96 | all | 9.999 |
"""


def test_ab_kernels_parses_sums_and_compares(tmp_path, capsys):
    """tools/ab_kernels.py: the matching kernels of a shape are summed (not the 'all' row, not other
    kernels); the sides run in turn every round; means, spreads and the change against the first side
    come out of the rounds' figures."""
    import ab_kernels

    assert ab_kernels.parse_rows(KT_OUTPUT.format(p1="0.800", p2="0.300"), "kda_prep_kernel") == {
        "T=8192 H=96": pytest.approx(0.900), "varlen 1300,547 H=96": pytest.approx(0.300)}
    side_b = tmp_path / "csrc_b"
    (side_b / "cuda").mkdir(parents=True)
    # per side, the prep kernel's figure in rounds 1 and 2 (T=8192 / varlen)
    figures = {"": [("0.800", "0.300"), ("0.820", "0.300")], str(side_b): [("0.700", "0.330"), ("0.700", "0.330")]}
    calls = []

    def runner(csrc, shapes, env_extra, timeout):
        calls.append(csrc)
        p1, p2 = figures[csrc][sum(c == csrc for c in calls) - 1]
        return KT_OUTPUT.format(p1=p1, p2=p2)

    argv = ["--side", "main=", "--side", f"b={side_b}", "--rounds", "2", "--kernel", "kda_prep_kernel", "8192:96"]
    rc = ab_kernels.main(argv, runner=runner)
    out = capsys.readouterr().out
    assert rc == 0
    assert calls == ["", str(side_b), "", str(side_b)]
    table = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in out.splitlines()
             if line.startswith("| T=") or line.startswith("| varlen")}
    # main T=8192: (0.900 + 0.920) / 2 = 0.910, spread 0.020; b: 0.800, change 0.800 / 0.910 - 1 = -12.1 %
    assert "| 0.910 | 0.020 |" in table[("T=8192 H=96", "main")]
    assert "| 0.800 | 0.000 | -12.1 % |" in table[("T=8192 H=96", "b")]
    assert "| 0.330 | 0.000 | +10.0 % |" in table[("varlen 1300,547 H=96", "b")]
    # by default both kernels, a table each
    calls.clear()
    assert ab_kernels.main(["--side", "main=", "--rounds", "1", "8192:96"], runner=runner) == 0
    out = capsys.readouterr().out
    prep, rec = out.split("\nkda_prep_kernel:\n")[1].split("\nkda_recurrence_kernel:\n")
    assert "| T=8192 H=96 | main | 0.900 | 0.000 |  |" in prep
    assert "| T=8192 H=96 | main | 0.500 | 0.000 |  |" in rec and "varlen" not in rec


def test_ab_kernels_stops_on_a_failed_run(tmp_path, capsys):
    import ab_kernels

    def runner(csrc, shapes, env_extra, timeout):
        raise RuntimeError("kernel_times.py exited 1:\nno GPU")

    assert ab_kernels.main(["--side", "main=", "8192:96"], runner=runner) == 1
    assert "side main, round 1: kernel_times.py exited 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a side whose folder is not a copy of flash_kda/csrc
        ab_kernels.main(["--side", f"x={tmp_path}", "8192:96"], runner=runner)


def test_ab_kernels_run_side_sets_the_sources(tmp_path, monkeypatch):
    """run_side: the side's folder reaches the child as FLASH_KDA_CSRC_DIR (absolute), the package's own
    sources as no variable at all (even if the caller's environment has one), the extra variables too;
    a child that fails raises with its last lines."""
    import ab_kernels

    fake = tmp_path / "fake_kernel_times.py"
    fake.write_text("import os, sys\n"
                    "env = os.environ.get\n"
                    "print(env('FLASH_KDA_CSRC_DIR', '-'), env('FLASH_KDA_CUDA_PIECES', '-'), *sys.argv[1:])\n"
                    "sys.exit(3 if 'fail' in sys.argv else 0)\n")
    monkeypatch.setattr(ab_kernels, "KERNEL_TIMES", fake)
    monkeypatch.setenv("FLASH_KDA_CSRC_DIR", "/somewhere/else")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b").mkdir()
    assert ab_kernels.run_side("b", ["8192:96"], {"FLASH_KDA_CUDA_PIECES": "1"}, 30).split() == [
        str(tmp_path / "b"), "1", "8192:96"]
    assert ab_kernels.run_side("", ["512:64"], {}, 30).split() == ["-", "-", "512:64"]
    assert ab_kernels.run_side("", [], {}, 30).split() == ["-", "-"]  # kernel_times.py's own shapes
    with pytest.raises(RuntimeError, match="exited 3"):
        ab_kernels.run_side("", ["fail"], {}, 30)


TOOL_SCRIPTS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


@pytest.mark.parametrize("script", TOOL_SCRIPTS)
def test_tool_help(script):
    """Every Python script under tools/ answers --help with its usage (which names the script) and
    exit status 0, on a machine without a GPU, so a user can read how to call it anywhere. (Scripts
    that import flash_kda load the CPU module then: the session's cache holds it already.)"""
    import subprocess

    tools = Path(__file__).resolve().parents[1] / "tools"
    r = subprocess.run([sys.executable, str(tools / script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert script in r.stdout and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
