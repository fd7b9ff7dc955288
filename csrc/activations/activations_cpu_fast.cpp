// The tanh-form GELU and its derivative on the CPU, one pass each. Compiled on its own (see setup.py) with -O3
// -fno-math-errno -fno-trapping-math and no torch headers, so that gcc vectorises the loops.
//
// With u = c (x + a x^3) and s = sigmoid(2u) = 1 / (1 + e), e = exp(-2u):
//   0.5 x (1 + tanh(u)) = x s                    (1 + tanh(u) = 2 s, without the cancellation of 1 + tanh(u) < 0)
//   d/dx                = s + 2 x s (1 - s) c (1 + 3 a x^2),   s (1 - s) = (e s) s.
// exp is evaluated branch-free (fast_exp.h). The exponent -2u is clamped to [-87, 80] (float) or [-708, 700]
// (double): exp stays finite and normal, s = 1 / (1 + e) stays normal, and a NaN passes through the clamp.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "activations/activations_cpu.h"
#include "fast_exp.h"

namespace pypattern {
namespace {

using fast_exp::exp_clamp;
using fast_exp::ExpParams;

constexpr double kA = 0.044715;

// z = -2u for u = c (x + a x^3)
template <typename T>
inline T neg2u(T x, T c2, T a) {
  return -c2 * std::fma(a * x, x, T(1)) * x;
}

// Beyond the clamp the exact values are below the type's resolution: x s for z > hi is x times less than exp(-hi)
// (returned as x * 0: -0, or NaN for x = -inf as the tanh formula gives), and for z < lo, s = 1 to within
// exp(lo). The derivative there is 0 and 1 (also at -inf and +inf, where a x^3 overflows).
template <typename T>
void gelu_tanh_t(const T* __restrict x, T* __restrict y, int64_t n, double c) {
  using P = ExpParams<T>;
  const T c2 = static_cast<T>(2.0 * c), a = static_cast<T>(kA);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i];
    const T z = neg2u<T>(xi, c2, a);
    const T v = xi / (T(1) + exp_clamp<T>(z));
    y[i] = z > P::hi ? xi * T(0) : v;
  }
}

template <typename T>
void gelu_tanh_backward_t(const T* __restrict g, const T* __restrict x, T* __restrict dx, int64_t n, double c) {
  using P = ExpParams<T>;
  const T c2 = static_cast<T>(2.0 * c), a = static_cast<T>(kA), a3 = static_cast<T>(3.0 * kA);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i], gi = g[i];
    const T z = neg2u<T>(xi, c2, a);
    const T e = exp_clamp<T>(z);
    const T s = T(1) / (T(1) + e);
    const T ss = (e * s) * s;  // s (1 - s)
    const T d = gi * std::fma(xi * ss * c2, std::fma(a3 * xi, xi, T(1)), s);
    dx[i] = z > P::hi ? gi * T(0) : (z < P::lo ? gi : d);
  }
}

}  // namespace

void gelu_tanh_cpu_f32(const float* x, float* y, int64_t n, double c) { gelu_tanh_t<float>(x, y, n, c); }
void gelu_tanh_cpu_f64(const double* x, double* y, int64_t n, double c) { gelu_tanh_t<double>(x, y, n, c); }
void gelu_tanh_backward_cpu_f32(const float* g, const float* x, float* dx, int64_t n, double c) {
  gelu_tanh_backward_t<float>(g, x, dx, n, c);
}
void gelu_tanh_backward_cpu_f64(const double* g, const double* x, double* dx, int64_t n, double c) {
  gelu_tanh_backward_t<double>(g, x, dx, n, c);
}

}  // namespace pypattern
