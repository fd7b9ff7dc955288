// exp(z) evaluated branch-free, for the raw-pointer kernels (*_fast.cpp) whose loops gcc vectorises: n = round(z /
// ln 2) by adding and subtracting 1.5 * 2^(mantissa bits) (round to nearest, valid for |n| < 2^22), z - n ln 2 in
// two parts (Cody and Waite's split of ln 2), a Taylor polynomial of degree 7 (float: truncation 6e-9 relative on
// |r| <= ln(2) / 2, under half an ulp) or 13 (double: 4e-18), and 2^n from the integer bits of the rounded sum.
// exp_clamp clamps z to [lo, hi] first ([-87, 80] in float, [-708, 700] in double), so that the result stays finite
// and normal (no subnormal arithmetic, which is slow on some CPUs); a NaN passes through the clamp (std::min and
// std::max keep their first argument).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pypattern {
namespace fast_exp {

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

template <typename T>
inline T exp_clamp(T z) {
  using P = ExpParams<T>;
  return exp_clamped<T>(std::min(std::max(z, P::lo), P::hi));
}

}  // namespace fast_exp
}  // namespace pypattern
