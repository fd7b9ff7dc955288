// The tanh-form GELU and its derivative on the CPU, one pass each. Compiled on its own (see setup.py) with -O3
// -fno-math-errno -fno-trapping-math and no torch headers, so that gcc vectorises the loops.
//
// With u = c (x + a x^3) and s = sigmoid(2u) = 1 / (1 + e), e = exp(-2u):
//   0.5 x (1 + tanh(u)) = x s                    (1 + tanh(u) = 2 s, without the cancellation of 1 + tanh(u) < 0)
//   d/dx                = s + 2 x s (1 - s) c (1 + 3 a x^2),   s (1 - s) = (e s) s.
// exp is evaluated branch-free: n = round(z / ln 2) by adding and subtracting 1.5 * 2^(mantissa bits) (round to
// nearest, valid for |n| < 2^22), z - n ln 2 in two parts (Cody and Waite's split of ln 2), a Taylor polynomial
// of degree 7 (float: truncation 6e-9 relative on |r| <= ln(2) / 2, under half an ulp) or 13 (double: 4e-18),
// and 2^n from the integer bits of the rounded sum. The exponent -2u is clamped to [-87, 80] (float) or
// [-708, 700] (double): exp stays finite and normal, s = 1 / (1 + e) stays normal (no subnormal arithmetic, which
// is slow on some CPUs) and a NaN passes through the clamp (std::min / std::max keep their first argument).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "activations/activations_cpu.h"

namespace pypattern {
namespace {

constexpr double kA = 0.044715;

template <typename T>
struct ExpParams;

template <>
struct ExpParams<float> {
  using Bits = uint32_t;
  static constexpr float lo = -87.0f, hi = 80.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr int mant = 23;
  static constexpr Bits bias = 127;
};

template <>
struct ExpParams<double> {
  using Bits = uint64_t;
  static constexpr double lo = -708.0, hi = 700.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mant = 52;
  static constexpr Bits bias = 1023;
};

template <typename T>
inline T poly_exp(T r);

template <>
inline float poly_exp<float>(float r) {
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  return std::fma(p, r, 1.0f);
}

template <>
inline double poly_exp<double>(double r) {
  double p = 1.0 / 6227020800.0;
  p = std::fma(p, r, 1.0 / 479001600.0);
  p = std::fma(p, r, 1.0 / 39916800.0);
  p = std::fma(p, r, 1.0 / 3628800.0);
  p = std::fma(p, r, 1.0 / 362880.0);
  p = std::fma(p, r, 1.0 / 40320.0);
  p = std::fma(p, r, 1.0 / 5040.0);
  p = std::fma(p, r, 1.0 / 720.0);
  p = std::fma(p, r, 1.0 / 120.0);
  p = std::fma(p, r, 1.0 / 24.0);
  p = std::fma(p, r, 1.0 / 6.0);
  p = std::fma(p, r, 0.5);
  p = std::fma(p, r, 1.0);
  return std::fma(p, r, 1.0);
}

// exp(z) for z already clamped to [lo, hi] (or NaN)
template <typename T>
inline T exp_clamped(T z) {
  using P = ExpParams<T>;
  using Bits = typename P::Bits;
  const T shifted = std::fma(z, P::log2e, P::magic);  // the low mantissa bits hold round(z / ln 2)
  const T n = shifted - P::magic;
  T r = std::fma(-n, P::ln2_hi, z);
  r = std::fma(-n, P::ln2_lo, r);
  Bits bits;
  std::memcpy(&bits, &shifted, sizeof(T));
  bits = (bits + P::bias) << P::mant;  // 2^n: n + bias in the exponent field (the shift drops the magic's bits)
  T scale;
  std::memcpy(&scale, &bits, sizeof(T));
  return poly_exp<T>(r) * scale;
}

// z = -2u for u = c (x + a x^3)
template <typename T>
inline T neg2u(T x, T c2, T a) {
  return -c2 * std::fma(a * x, x, T(1)) * x;
}

template <typename T>
inline T exp_clamp(T z) {
  using P = ExpParams<T>;
  return exp_clamped<T>(std::min(std::max(z, P::lo), P::hi));
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
