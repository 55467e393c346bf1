// Checks flash_kda::FastDiv (flash_kda/csrc/fast_div.h) against integer division: every divisor
// the kernels can meet is in [1, 2^31); these are edge divisors (small ones, powers of two and
// their neighbours, the largest) and pseudo-random ones, each with edge and pseudo-random
// dividends in [0, 2^31). Prints the number of pairs checked; exits 1 on the first mismatch.
#include <cstdio>
#include <vector>

#include "fast_div.h"

namespace {

uint64_t state = 0x9e3779b97f4a7c15ull;
uint32_t next31() {  // xorshift64*, top 31 bits
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return static_cast<uint32_t>((state * 0x2545f4914f6cdd1dull) >> 33);
}

}  // namespace

int main() {
  const uint32_t kMax = 0x7fffffffu;  // 2^31 - 1
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int s = 12; s <= 31; ++s) {
    const uint64_t p = uint64_t{1} << s;
    for (int64_t e = -2; e <= 2; ++e) {
      const int64_t d = static_cast<int64_t>(p) + e;
      if (d >= 1 && d <= kMax) divisors.push_back(static_cast<uint32_t>(d));
    }
  }
  for (int i = 0; i < 20000; ++i) divisors.push_back(next31() >> (next31() % 31) | 1u);

  uint64_t checked = 0;
  for (const uint32_t d : divisors) {
    const flash_kda::FastDiv f = flash_kda::FastDiv::of(d);
    std::vector<uint32_t> ns = {0, 1, 2, 3, d - 1, d, kMax, kMax - 1, kMax - d + 1};
    if (d <= kMax / 2) ns.insert(ns.end(), {2 * d - 1, 2 * d, 2 * d + 1});
    const uint32_t top = kMax / d * d;  // the largest multiple of d in range, and its neighbours
    ns.insert(ns.end(), {top, top - 1});
    if (top < kMax) ns.push_back(top + 1);
    for (int i = 0; i < 64; ++i) ns.push_back(next31());
    const uint64_t near = uint64_t{4} * d < kMax ? uint64_t{4} * d : kMax;  // small multiples of d
    for (int i = 0; i < 16; ++i) ns.push_back(static_cast<uint32_t>(next31() % near));
    for (const uint32_t n : ns) {
      uint32_t q, r;
      f.divmod(n, q, r);
      if (q != n / d || r != n % d) {
        std::printf("mismatch: %u / %u: got %u rem %u, want %u rem %u\n", n, d, q, r, n / d, n % d);
        return 1;
      }
      ++checked;
    }
  }
  std::printf("%llu pairs ok\n", static_cast<unsigned long long>(checked));
  return 0;
}
