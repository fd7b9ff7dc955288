// Test driver for tests/test_signed_sums_isa.py: runs the raw CPU signed-sums kernel (csrc/sums/sums_cpu_fast.cpp,
// compiled by the test with one instruction set's flags) on pseudo-random float32 and float64 blocks and compares
// every output bit for bit with a scalar loop adding the terms left to right.
//   sums_isa_driver n P max_terms seed stream misalign
// Outputs p of P have p % (max_terms + 1) terms, drawn from a pool of P + 3 blocks (so that outputs share terms);
// output 0 is computed in place into its base. `stream`: the kernel's non-temporal stores; `misalign`: every
// block starts one element past an aligned address (the streamed stores then fall back to plain ones). The kernel
// is called on the element range split in two at n / 3, as two threads would. Exit status: 0 when equal, 1 when not.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sums_cpu.h"

namespace {

uint64_t state;
double next_value() {  // a value in [-4, 4) with a few bits below float32's precision
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (static_cast<double>(state >> 11) / 9007199254740992.0 - 0.5) * 8.0;
}

template <typename T>
int check(int64_t n, int64_t P, int64_t max_terms, bool stream, bool misalign, uint64_t seed) {
  state = seed;
  const int64_t pool = P + 3, pad = 64 / static_cast<int64_t>(sizeof(T)), stride = n + 2 * pad;
  std::vector<T> mem(static_cast<size_t>((pool + 2 * P) * stride + pad), T(0));
  const uintptr_t a = reinterpret_cast<uintptr_t>(mem.data());
  T* aligned = mem.data() + ((64 - a % 64) % 64) / sizeof(T);
  auto block = [&](int64_t j) { return aligned + j * stride + (misalign ? 1 : 0); };
  for (int64_t j = 0; j < pool + P; ++j)
    for (int64_t k = 0; k < n; ++k) block(j)[k] = static_cast<T>(next_value());
  std::vector<const T*> terms, base(P);
  std::vector<T*> out(P);
  std::vector<int64_t> offsets{0};
  std::vector<T> signs;
  for (int64_t p = 0; p < P; ++p) {
    base[p] = block(pool + p);
    out[p] = p == 0 ? block(pool) : block(pool + P + p);  // output 0 in place
    for (int64_t i = 0; i < p % (max_terms + 1); ++i) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      terms.push_back(block(static_cast<int64_t>((state >> 33) % pool)));
      signs.push_back((state >> 20) & 1 ? T(1) : T(-1));
    }
    offsets.push_back(static_cast<int64_t>(terms.size()));
  }
  std::vector<T> want(static_cast<size_t>(P * n));
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < n; ++k) {
      T acc = base[p][k];
      for (int64_t i = offsets[p]; i < offsets[p + 1]; ++i) acc = signs[i] > 0 ? acc + terms[i][k] : acc - terms[i][k];
      want[p * n + k] = acc;
    }
  const int64_t split = n / 3;
  for (const auto& r : {std::pair<int64_t, int64_t>{0, split}, {split, n}}) {
    if constexpr (sizeof(T) == 4)
      pypattern::signed_sums_cpu_f32(out.data(), base.data(), terms.data(), offsets.data(), signs.data(), P, r.first,
                                     r.second, stream);
    else
      pypattern::signed_sums_cpu_f64(out.data(), base.data(), terms.data(), offsets.data(), signs.data(), P, r.first,
                                     r.second, stream);
  }
  for (int64_t p = 0; p < P; ++p)
    if (std::memcmp(out[p], want.data() + p * n, sizeof(T) * n) != 0) {
      std::fprintf(stderr, "%s output %ld differs\n", sizeof(T) == 4 ? "float32" : "float64", static_cast<long>(p));
      return 1;
    }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s n P max_terms seed stream misalign\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atol(argv[1]), P = std::atol(argv[2]), max_terms = std::atol(argv[3]);
  const uint64_t seed = std::strtoull(argv[4], nullptr, 10);
  const bool stream = std::atoi(argv[5]) != 0, misalign = std::atoi(argv[6]) != 0;
  return check<float>(n, P, max_terms, stream, misalign, seed) | check<double>(n, P, max_terms, stream, misalign, seed);
}
