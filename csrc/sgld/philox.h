// Counter-based normal generator shared by the C++ and CUDA kernels.
//
// The stream is Triton's Philox4x32-10 (same constants and round function as triton.language.philox) with
// key (k0, k1) = (low, high) 32 bits of the 64-bit seed and counter
//   (c0, c1, c2, c3) = (element_index / 4, tensor_index, step_low, step_high).
// The four 32-bit outputs become four uniforms with Triton's uint_to_uniform_float and two Box-Muller pairs
// (u0, u1) -> (r cos t, r sin t), (u2, u3) -> (r' cos t', r' sin t'); element e takes normal e % 4.
// No torch headers here, so nvcc can compile-check it on its own.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PP_HD __host__ __device__ __forceinline__
#else
#define PP_HD inline
#endif

namespace pypattern {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // 2^-31, as Triton writes it
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kHalfPi = 1.5707963267948966f;

PP_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  uint32_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t p2 = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  c[0] = c0; c[1] = c1; c[2] = c2; c[3] = c3;
}

// Triton's uint_to_uniform_float: reinterpret as int32, fold negatives (x < 0 -> -x - 1 == ~x), scale.
PP_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

}  // namespace pypattern
