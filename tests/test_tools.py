"""The analysis tools under tools/ that tests can check without a GPU (synthetic inputs)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import sass_load_chains  # noqa: E402


def depths(listing):
    return [d for _, _, d in sass_load_chains.chains(list(enumerate(listing)))]


def test_loads_issued_together_share_one_round_trip():
    assert depths([
        "LDG.E.128 R4, desc[UR6][R20.64]",
        "@P1 LDG.E R8, desc[UR6][R22.64]",
        "LDG.E.U16 R9, desc[UR6][R24.64]",
        "FADD R10, R4, R8",
    ]) == [1, 1, 1]


def test_a_load_after_a_use_waits_for_it():
    # the use of R6 (inside the first load's four registers) comes before the second load
    assert depths([
        "LDG.E.128 R4, desc[UR6][R20.64]",
        "IMAD.U32 R12, R6, 0x10000, RZ",
        "LDG.E.128 R16, desc[UR6][R22.64]",
        "PRMT R13, R16, 0x7632, R13",
        "@!P0 LDG.E R2, desc[UR6][R24.64]",
    ]) == [1, 2, 3]


def test_an_address_from_a_load_is_a_use():
    assert depths([
        "LDG.E.64 R2, desc[UR6][R20.64]",
        "LDG.E R5, desc[UR6][R2.64]",
    ]) == [1, 2]


def test_a_register_overwritten_before_use_ends_the_wait():
    # R4 is rewritten by an unpredicated instruction before anything reads it: no dependence
    assert depths([
        "LDG.E R4, desc[UR6][R20.64]",
        "MOV R4, RZ",
        "FADD R7, R4, R4",
        "LDG.E R8, desc[UR6][R22.64]",
    ]) == [1, 1]
