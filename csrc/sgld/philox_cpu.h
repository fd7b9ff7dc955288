// The CPU side of the noise stream of philox.h, shared by the vectorised C++ kernels (csrc/sgld/sgld_cpu_fast.cpp,
// csrc/samplers/samplers_cpu_fast.cpp): normals_block() draws the 128 normals of one block of elements from
// 32 Philox counters (four normals per call), the Philox rounds as two independent chains of 16 counters per
// AVX-512 register (four chains of 8 with AVX2, a plain simd loop otherwise: the integers are the same on every
// path), then Box-Muller with the branch-free log and sin/cos below in one vector loop. Also the bit tests for
// non-finite values the update loops use. Host only, no torch headers; include it from files compiled without
// -ffast-math (see setup.py).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "philox.h"

namespace pypattern {
namespace {  // internal linkage: each kernel file gets its own copy, compiled with its own flags

constexpr int kNormalsBlock = 128;                // elements (normals) per block
constexpr int kNormalLanes = kNormalsBlock / 4;  // Philox counters per block: 32

// Inline, branch-free float math so that the whole Box-Muller loop vectorises without library calls.
// Both are Cephes' single-precision polynomials (about 1 ulp on their ranges). The files that include this one
// are compiled without -ffast-math: the Cody-Waite reduction below must not be reassociated.
inline float log_approx(float x) {  // x in (0, 1]
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int e = static_cast<int>((bits >> 23) & 0xff) - 126;  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x007fffffu) | 0x3f000000u;
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  float f = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

inline void sincos_approx(float t, float& c, float& s) {  // t in [0, 2 pi]
  const float q = std::nearbyint(t * 0.63661977236758134f);  // nearest multiple of pi/2
  const float r = ((t - q * 1.5703125f) - q * 4.837512969970703125e-4f) - q * 7.54978995489188216e-8f;
  const float z = r * r;
  const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  const int j = static_cast<int>(q) & 3;
  const float cs = (j & 1) ? sp : cp;  // cos or sin of r, by quadrant
  const float sn = (j & 1) ? cp : sp;
  c = ((j == 1) | (j == 2)) ? -cs : cs;
  s = (j >= 2) ? -sn : sn;
}

// Fills out[0..kNormalsBlock) with the normals of elements [base, base + kNormalsBlock) of the tensor whose
// Philox key is (k0, k1) = the seed's words and whose counter words 1..3 are (c1, c2, c3) = (tensor index, step low,
// step high); base is a multiple of 4.
inline void normals_block(int64_t base, uint32_t k0, uint32_t k1, uint32_t c1, uint32_t c2, uint32_t c3,
                          float* out) {
  alignas(64) uint32_t x0[kNormalLanes], x1[kNormalLanes], x2[kNormalLanes], x3[kNormalLanes];
  const uint32_t ctr0 = static_cast<uint32_t>(base / 4);
#if defined(__AVX512F__)
  // 16 Philox counters in one register. gcc turns the portable form below into vpmovzxdq + vpmullq (slow 64-bit
  // multiplies); the widening 32x32 -> 64 multiply is vpmuludq on even lanes, and on odd lanes after a shift.
  {
    constexpr int kChains = kNormalLanes / 16;  // independent dependency chains hide the multiplies' latency
    const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
    const __m512i rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
    const __m512i ihi = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    const __m512i ilo = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i a[kChains], b[kChains], c[kChains], d[kChains];
    for (int j = 0; j < kChains; ++j) {
      a[j] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(ctr0 + 16u * j)), iota);
      b[j] = _mm512_set1_epi32(static_cast<int>(c1));
      c[j] = _mm512_set1_epi32(static_cast<int>(c2));
      d[j] = _mm512_set1_epi32(static_cast<int>(c3));
    }
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; ++r) {
      const __m512i vka = _mm512_set1_epi32(static_cast<int>(ka));
      const __m512i vkb = _mm512_set1_epi32(static_cast<int>(kb));
      for (int j = 0; j < kChains; ++j) {
        // hi and lo 32 bits of ra * a and rb * c, lane by lane: one two-source permute each picks them out of
        // the even- and odd-lane 64-bit products (a port the multiplies do not use); the xors are one vpternlogd
        const __m512i pa_even = _mm512_mul_epu32(a[j], ra);
        const __m512i pa_odd = _mm512_mul_epu32(_mm512_srli_epi64(a[j], 32), ra);
        const __m512i pc_even = _mm512_mul_epu32(c[j], rb);
        const __m512i pc_odd = _mm512_mul_epu32(_mm512_srli_epi64(c[j], 32), rb);
        const __m512i hi_a = _mm512_permutex2var_epi32(pa_even, ihi, pa_odd);
        const __m512i hi_c = _mm512_permutex2var_epi32(pc_even, ihi, pc_odd);
        const __m512i lo_a = _mm512_permutex2var_epi32(pa_even, ilo, pa_odd);
        const __m512i lo_c = _mm512_permutex2var_epi32(pc_even, ilo, pc_odd);
        const __m512i na = _mm512_ternarylogic_epi32(hi_c, b[j], vka, 0x96);
        const __m512i nc = _mm512_ternarylogic_epi32(hi_a, d[j], vkb, 0x96);
        b[j] = lo_c;
        d[j] = lo_a;
        a[j] = na;
        c[j] = nc;
      }
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    for (int j = 0; j < kChains; ++j) {
      _mm512_store_si512(x0 + 16 * j, a[j]);
      _mm512_store_si512(x1 + 16 * j, b[j]);
      _mm512_store_si512(x2 + 16 * j, c[j]);
      _mm512_store_si512(x3 + 16 * j, d[j]);
    }
  }
#elif defined(__AVX2__)
  // The same on 8 counters per register (CPUs without AVX-512: most laptops). hi and lo words come from the
  // even- and odd-lane vpmuludq products with shifts and blends.
  {
    constexpr int kChains = kNormalLanes / 8;
    const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
    const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i a[kChains], b[kChains], c[kChains], d[kChains];
    for (int j = 0; j < kChains; ++j) {
      a[j] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(ctr0 + 8u * j)), iota);
      b[j] = _mm256_set1_epi32(static_cast<int>(c1));
      c[j] = _mm256_set1_epi32(static_cast<int>(c2));
      d[j] = _mm256_set1_epi32(static_cast<int>(c3));
    }
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; ++r) {
      const __m256i vka = _mm256_set1_epi32(static_cast<int>(ka));
      const __m256i vkb = _mm256_set1_epi32(static_cast<int>(kb));
      for (int j = 0; j < kChains; ++j) {
        const __m256i pa_even = _mm256_mul_epu32(a[j], ra);
        const __m256i pa_odd = _mm256_mul_epu32(_mm256_srli_epi64(a[j], 32), ra);
        const __m256i pc_even = _mm256_mul_epu32(c[j], rb);
        const __m256i pc_odd = _mm256_mul_epu32(_mm256_srli_epi64(c[j], 32), rb);
        const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(pa_even, 32), pa_odd, 0xAA);
        const __m256i hi_c = _mm256_blend_epi32(_mm256_srli_epi64(pc_even, 32), pc_odd, 0xAA);
        const __m256i lo_a = _mm256_blend_epi32(pa_even, _mm256_slli_epi64(pa_odd, 32), 0xAA);
        const __m256i lo_c = _mm256_blend_epi32(pc_even, _mm256_slli_epi64(pc_odd, 32), 0xAA);
        const __m256i na = _mm256_xor_si256(_mm256_xor_si256(hi_c, b[j]), vka);
        const __m256i nc = _mm256_xor_si256(_mm256_xor_si256(hi_a, d[j]), vkb);
        b[j] = lo_c;
        d[j] = lo_a;
        a[j] = na;
        c[j] = nc;
      }
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    for (int j = 0; j < kChains; ++j) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(x0 + 8 * j), a[j]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(x1 + 8 * j), b[j]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(x2 + 8 * j), c[j]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(x3 + 8 * j), d[j]);
    }
  }
#else
#pragma omp simd
  for (int l = 0; l < kNormalLanes; ++l) {
    uint32_t a = ctr0 + static_cast<uint32_t>(l), b = c1, c = c2, d = c3;
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxRoundA) * a;
      const uint64_t p2 = static_cast<uint64_t>(kPhiloxRoundB) * c;
      const uint32_t na = static_cast<uint32_t>(p2 >> 32) ^ b ^ ka;
      const uint32_t nc = static_cast<uint32_t>(p0 >> 32) ^ d ^ kb;
      b = static_cast<uint32_t>(p2);
      d = static_cast<uint32_t>(p0);
      a = na;
      c = nc;
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    x0[l] = a; x1[l] = b; x2[l] = c; x3[l] = d;
  }
#endif
  float n0[kNormalLanes], n1[kNormalLanes], n2[kNormalLanes], n3[kNormalLanes];
#pragma omp simd
  for (int l = 0; l < kNormalLanes; ++l) {
    const float u0 = std::max(1.0e-7f, uint_to_uniform(x0[l]));
    const float u2 = std::max(1.0e-7f, uint_to_uniform(x2[l]));
    const float r0 = std::sqrt(-2.0f * log_approx(u0));
    const float r1 = std::sqrt(-2.0f * log_approx(u2));
    float c0, s0, c1, s1;
    sincos_approx(kTwoPi * uint_to_uniform(x1[l]), c0, s0);
    sincos_approx(kTwoPi * uint_to_uniform(x3[l]), c1, s1);
    n0[l] = r0 * c0;
    n1[l] = r0 * s0;
    n2[l] = r1 * c1;
    n3[l] = r1 * s1;
  }
  for (int l = 0; l < kNormalLanes; ++l) {
    out[4 * l + 0] = n0[l];
    out[4 * l + 1] = n1[l];
    out[4 * l + 2] = n2[l];
    out[4 * l + 3] = n3[l];
  }
}

inline bool nonfinite_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return (b & 0x7f800000u) == 0x7f800000u;
}
inline bool nonfinite_bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

}  // namespace
}  // namespace pypattern
