// Vectorised CPU kernels of the SGNHT and RMSprop-SGLD steps: one pass over the tensors, noise generated per block
// of 128 elements (32 Philox counters) in a portable `omp simd` loop with branch-free float math (the Cephes
// single-precision log and sin/cos polynomials that csrc/sgld/sgld_cpu_fast.cpp uses, about 1 ulp), then one
// vector loop of updates. Compiled on its own (see setup.py) with -O3 -fno-math-errno -fno-trapping-math and no
// torch headers; the mask and the bounding box are template parameters so that the update loops stay branch-free.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "samplers/samplers_cpu.h"

namespace pypattern {
namespace {

constexpr int kNoiseBlock = 128;
constexpr int kLanes = kNoiseBlock / 4;

inline float log_approx(float x) {  // x in (0, 1]
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int e = static_cast<int>((bits >> 23) & 0xff) - 126;
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
  const float q = std::nearbyint(t * 0.63661977236758134f);
  const float r = ((t - q * 1.5703125f) - q * 4.837512969970703125e-4f) - q * 7.54978995489188216e-8f;
  const float z = r * r;
  const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  const int j = static_cast<int>(q) & 3;
  const float cs = (j & 1) ? sp : cp;
  const float sn = (j & 1) ? cp : sp;
  c = ((j == 1) | (j == 2)) ? -cs : cs;
  s = (j >= 2) ? -sn : sn;
}

// out[0..128) = the normals of elements [base, base + 128), base a multiple of 4.
void normals_block(int64_t base, uint64_t seed, uint32_t tensor_index, uint64_t step, float* out) {
  alignas(64) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  const uint32_t ctr0 = static_cast<uint32_t>(base / 4);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(step), c3 = static_cast<uint32_t>(step >> 32);
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    uint32_t a = ctr0 + static_cast<uint32_t>(l), b = tensor_index, c = c2, d = c3;
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
    x0[l] = a;
    x1[l] = b;
    x2[l] = c;
    x3[l] = d;
  }
  float n0[kLanes], n1[kLanes], n2[kLanes], n3[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    const float u0 = std::max(1.0e-7f, uint_to_uniform(x0[l]));
    const float u2 = std::max(1.0e-7f, uint_to_uniform(x2[l]));
    const float r0 = std::sqrt(-2.0f * log_approx(u0));
    const float r1 = std::sqrt(-2.0f * log_approx(u2));
    float cc0, s0, cc1, s1;
    sincos_approx(kTwoPi * uint_to_uniform(x1[l]), cc0, s0);
    sincos_approx(kTwoPi * uint_to_uniform(x3[l]), cc1, s1);
    n0[l] = r0 * cc0;
    n1[l] = r0 * s0;
    n2[l] = r1 * cc1;
    n3[l] = r1 * s1;
  }
  for (int l = 0; l < kLanes; ++l) {
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

template <typename T, bool kMask, bool kBox>
int sgnht_t(T* __restrict w, T* __restrict p, const T* __restrict g, const T* __restrict w0,
            const T* __restrict mask, int64_t begin, int64_t end, const SgnhtCoefs& c, double* kinetic,
            int64_t* count) {
  const T xi = static_cast<T>(c.xi), eps = static_cast<T>(c.step_size), nb = static_cast<T>(c.nbeta);
  const T loc = static_cast<T>(c.localization), wd = static_cast<T>(c.weight_decay);
  const T s = static_cast<T>(c.noise_std), box = static_cast<T>(c.box);
  alignas(64) float noise[kNoiseBlock];
  if (!c.has_noise) std::fill(noise, noise + kNoiseBlock, 0.0f);
  int bad = 0;
  double kin = 0.0;
  int64_t cnt = 0;
  for (int64_t base = begin; base < end; base += kNoiseBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kNoiseBlock, end - base));
    if (c.has_noise) normals_block(base, c.seed, c.tensor_index, c.step, noise);
    T* __restrict wb = w + base;
    T* __restrict pb = p + base;
    const T* __restrict gb = g + base;
    const T* __restrict ab = w0 + base;
    const T* __restrict mb = kMask ? mask + base : nullptr;
    int block_bad = 0;
    double block_kin = 0.0;
    int64_t block_cnt = 0;
#pragma omp simd reduction(| : block_bad) reduction(+ : block_kin, block_cnt)
    for (int i = 0; i < len; ++i) {
      const T wi = wb[i], pi = pb[i], gi = gb[i], ai = ab[i];
      const int nf = nonfinite_bits(gi) ? 1 : 0;
      block_bad |= nf;
      const T m = kMask ? mb[i] : T(1);
      const T dp = -xi * pi - eps * (nb * gi + loc * (wi - ai) + wd * wi) + s * static_cast<T>(noise[i]);
      T pn = pi + m * dp;
      T wn = wi + m * pn;
      if constexpr (kBox) {
        const T d = wn - ai;
        const bool out = (d > box) | (d < -box);
        wn = std::min(std::max(wn, ai - box), ai + box);
        pn = out ? -pn : pn;
      }
      const bool keep = (kMask && m == T(0)) || nf;
      wn = keep ? wi : wn;
      pn = keep ? pi : pn;
      wb[i] = wn;
      pb[i] = pn;
      const bool active = !kMask || m != T(0);
      block_kin += active ? static_cast<double>(pn) * static_cast<double>(pn) : 0.0;
      block_cnt += active ? 1 : 0;
    }
    bad |= block_bad;
    kin += block_kin;
    cnt += block_cnt;
  }
  *kinetic += kin;
  *count += cnt;
  return bad;
}

template <typename T, bool kMask, bool kBox>
int rmsprop_t(T* __restrict w, T* __restrict v, const T* __restrict g, const T* __restrict w0,
              const T* __restrict mask, int64_t begin, int64_t end, const RmspropCoefs& c) {
  const T half = static_cast<T>(c.half_step), nb = static_cast<T>(c.nbeta);
  const T loc = static_cast<T>(c.localization), wd = static_cast<T>(c.weight_decay);
  const T alpha = static_cast<T>(c.alpha), one_minus = static_cast<T>(1.0 - c.alpha);
  const T reps = static_cast<T>(c.rms_eps), s = static_cast<T>(c.noise_std), box = static_cast<T>(c.box);
  alignas(64) float noise[kNoiseBlock];
  if (!c.has_noise) std::fill(noise, noise + kNoiseBlock, 0.0f);
  int bad = 0;
  for (int64_t base = begin; base < end; base += kNoiseBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kNoiseBlock, end - base));
    if (c.has_noise) normals_block(base, c.seed, c.tensor_index, c.step, noise);
    T* __restrict wb = w + base;
    T* __restrict vb = v + base;
    const T* __restrict gb = g + base;
    const T* __restrict ab = w0 + base;
    const T* __restrict mb = kMask ? mask + base : nullptr;
    int block_bad = 0;
#pragma omp simd reduction(| : block_bad)
    for (int i = 0; i < len; ++i) {
      const T wi = wb[i], vi = vb[i], gi = gb[i], ai = ab[i];
      const int nf = nonfinite_bits(gi) ? 1 : 0;
      block_bad |= nf;
      const T m = kMask ? mb[i] : T(1);
      const T vn = alpha * vi + one_minus * gi * gi;
      const T pc = T(1) / (std::sqrt(vn) + reps);
      const T delta = -half * pc * (nb * gi + loc * (wi - ai) + wd * wi) + s * std::sqrt(pc) * static_cast<T>(noise[i]);
      T wn = wi + m * delta;
      if constexpr (kBox) wn = std::min(std::max(wn, ai - box), ai + box);
      const bool keep = (kMask && m == T(0)) || nf;
      wb[i] = keep ? wi : wn;
      vb[i] = keep ? vi : vn;
    }
    bad |= block_bad;
  }
  return bad;
}

template <typename T>
int sgnht_dispatch(T* w, T* p, const T* g, const T* w0, const T* mask, int64_t begin, int64_t end,
                   const SgnhtCoefs& c, double* kinetic, int64_t* count) {
  if (mask) {
    return c.has_box ? sgnht_t<T, true, true>(w, p, g, w0, mask, begin, end, c, kinetic, count)
                     : sgnht_t<T, true, false>(w, p, g, w0, mask, begin, end, c, kinetic, count);
  }
  return c.has_box ? sgnht_t<T, false, true>(w, p, g, w0, mask, begin, end, c, kinetic, count)
                   : sgnht_t<T, false, false>(w, p, g, w0, mask, begin, end, c, kinetic, count);
}

template <typename T>
int rmsprop_dispatch(T* w, T* v, const T* g, const T* w0, const T* mask, int64_t begin, int64_t end,
                     const RmspropCoefs& c) {
  if (mask) {
    return c.has_box ? rmsprop_t<T, true, true>(w, v, g, w0, mask, begin, end, c)
                     : rmsprop_t<T, true, false>(w, v, g, w0, mask, begin, end, c);
  }
  return c.has_box ? rmsprop_t<T, false, true>(w, v, g, w0, mask, begin, end, c)
                   : rmsprop_t<T, false, false>(w, v, g, w0, mask, begin, end, c);
}

}  // namespace

int sgnht_cpu_range_f32(float* w, float* p, const float* g, const float* w0, const float* mask, int64_t begin,
                        int64_t end, const SgnhtCoefs& c, double* kinetic, int64_t* count) {
  return sgnht_dispatch<float>(w, p, g, w0, mask, begin, end, c, kinetic, count);
}
int sgnht_cpu_range_f64(double* w, double* p, const double* g, const double* w0, const double* mask, int64_t begin,
                        int64_t end, const SgnhtCoefs& c, double* kinetic, int64_t* count) {
  return sgnht_dispatch<double>(w, p, g, w0, mask, begin, end, c, kinetic, count);
}
int rmsprop_sgld_cpu_range_f32(float* w, float* v, const float* g, const float* w0, const float* mask, int64_t begin,
                               int64_t end, const RmspropCoefs& c) {
  return rmsprop_dispatch<float>(w, v, g, w0, mask, begin, end, c);
}
int rmsprop_sgld_cpu_range_f64(double* w, double* v, const double* g, const double* w0, const double* mask,
                               int64_t begin, int64_t end, const RmspropCoefs& c) {
  return rmsprop_dispatch<double>(w, v, g, w0, mask, begin, end, c);
}

}  // namespace pypattern
