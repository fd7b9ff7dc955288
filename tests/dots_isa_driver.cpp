// Test driver for tests/test_row_dots.py: runs the raw CPU row-dots kernel (csrc/dots/dots_cpu_fast.cpp, compiled by
// the test with one instruction set's flags) over a grid of shapes (row counts around the register blocks and the
// panel of g rows, term counts around the vector width and the chunk) in float32 and float64, rows in separate
// places and optionally one element off an aligned address, and compares every product with a scalar long-double
// loop: |got - want| <= tol * sum_k |a_k g_k| (+ the smallest normal number), tol 1e-5 (float32) or 1e-13 (float64).
//   dots_isa_driver misalign
// Exit status: 0 when every product agrees, 1 when one does not (named on stderr).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "dots_cpu.h"

namespace {

uint64_t state = 12345;
double next_value() {  // a value in [-4, 4) with a few bits below float32's precision
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (static_cast<double>(state >> 11) / 9007199254740992.0 - 0.5) * 8.0;
}

template <typename T>
int check(int64_t M, int64_t N, int64_t K, bool misalign) {
  const int64_t pad = 64 / static_cast<int64_t>(sizeof(T)), stride = K + 3 * pad;
  std::vector<T> mem(static_cast<size_t>((M + N) * stride + pad), T(0));
  const uintptr_t p = reinterpret_cast<uintptr_t>(mem.data());
  T* aligned = mem.data() + ((64 - p % 64) % 64) / sizeof(T);
  std::vector<const T*> a(M), g(N);
  // rows in reverse order of their places, each its own offset from an aligned address
  for (int64_t m = 0; m < M; ++m) a[m] = aligned + (M + N - 1 - m) * stride + (misalign ? 1 : 0);
  for (int64_t n = 0; n < N; ++n) g[n] = aligned + n * stride + (misalign ? 1 : 0);
  for (auto& x : mem) x = static_cast<T>(next_value());
  const int64_t ldo = N + 3;
  std::vector<T> out(static_cast<size_t>(M * ldo), T(7));
  if constexpr (sizeof(T) == 4)
    pypattern::row_dots_cpu_f32(a.data(), M, g.data(), N, K, out.data(), ldo);
  else
    pypattern::row_dots_cpu_f64(a.data(), M, g.data(), N, K, out.data(), ldo);
  const long double tol = sizeof(T) == 4 ? 1e-5L : 1e-13L;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      long double want = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const long double x = static_cast<long double>(a[m][k]) * g[n][k];
        want += x;
        mag += std::fabs(x);
      }
      const long double err = std::fabs(static_cast<long double>(out[m * ldo + n]) - want);
      if (!(err <= tol * mag + std::numeric_limits<T>::min())) {
        std::fprintf(stderr, "%s M=%ld N=%ld K=%ld misalign=%d: out[%ld, %ld] = %.17Lg, want %.17Lg\n",
                     sizeof(T) == 4 ? "float32" : "float64", static_cast<long>(M), static_cast<long>(N),
                     static_cast<long>(K), misalign ? 1 : 0, static_cast<long>(m), static_cast<long>(n),
                     static_cast<long double>(out[m * ldo + n]), want);
        return 1;
      }
    }
    for (int64_t n = N; n < ldo; ++n)
      if (out[m * ldo + n] != T(7)) {
        std::fprintf(stderr, "M=%ld N=%ld K=%ld: wrote past row %ld's N products\n", static_cast<long>(M),
                     static_cast<long>(N), static_cast<long>(K), static_cast<long>(m));
        return 1;
      }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s misalign\n", argv[0]);
    return 2;
  }
  const bool misalign = std::atoi(argv[1]) != 0;
  const int64_t Ms[] = {0, 1, 2, 3, 4, 5, 8, 13};
  const int64_t Ns[] = {0, 1, 5, 6, 7, 13, 48, 49, 97};
  const int64_t Ks[] = {0, 1, 7, 8, 16, 17, 1000, 1024, 1025, 2049, 4097, 5003};
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (int64_t K : Ks)
        if (check<float>(M, N, K, misalign) || check<double>(M, N, K, misalign)) return 1;
  return 0;
}
