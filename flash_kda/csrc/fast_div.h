// fast_div.h: division of non-negative 31-bit integers by a divisor fixed at launch time, as one
// high multiply, one add and one shift (Granlund and Montgomery, "Division by invariant integers
// using multiplication", 1994). A 32-bit `/` or `%` by a runtime value compiles to ~20 instructions
// on NVIDIA GPUs (a reciprocal, a correction and sign handling); a kernel that splits its block
// index that way in every one of its warps pays it per warp and block (docs/performance.md v9).
//
// For a divisor d in [1, 2^31), with l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1 (which
// fits 32 bits because 2^(l-1) < d), floor(n / d) = (mulhi(m, n) + n) >> l for every n in
// [0, 2^31): the sum stays below 2^32 because mulhi(m, n) <= n. tests/test_fast_div.py checks it
// against `/` on edge and random pairs.
#pragma once

#include <stdint.h>

#include "kda_params.h"  // FLASH_KDA_HD

namespace flash_kda {

struct FastDiv {
  uint32_t d;  // the divisor
  uint32_t m;  // the magic multiplier
  uint32_t l;  // the shift

  FastDiv() = default;
  // Host side, once per launch. d outside [1, 2^31) is the caller's error; it is clamped to that range
  // so the object stays well-defined.
  static FastDiv of(int64_t divisor) {
    FastDiv f;
    f.d = static_cast<uint32_t>(divisor < 1 ? 1 : (divisor > 0x7fffffff ? 0x7fffffff : divisor));
    f.l = 0;
    while ((uint64_t{1} << f.l) < f.d) ++f.l;
    f.m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << f.l) - f.d)) / f.d + 1);
    return f;
  }

  // floor(n / d) for n in [0, 2^31)
  FLASH_KDA_HD uint32_t div(uint32_t n) const {
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(m) * n) >> 32);
    return (hi + n) >> l;
  }
  // n = q d + r with q = floor(n / d), for n in [0, 2^31)
  FLASH_KDA_HD void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * d;
  }
};

}  // namespace flash_kda
