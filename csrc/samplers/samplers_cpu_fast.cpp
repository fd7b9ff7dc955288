// Vectorised CPU kernels of the SGNHT and RMSprop-SGLD steps: one pass over the tensors, noise generated per block
// of 128 elements (32 Philox counters) by normals_block() of csrc/sgld/philox_cpu.h, the code (and the stream) of the
// SGLD kernel, then one vector loop of updates. Compiled on its own (see setup.py) with -O3 -fno-math-errno -fno-trapping-math and no
// torch headers; the mask and the bounding box are template parameters so that the update loops stay branch-free.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "samplers/samplers_cpu.h"
#include "sgld/philox_cpu.h"

namespace pypattern {
namespace {

constexpr int kNoiseBlock = kNormalsBlock;  // elements per block of normals (philox_cpu.h): 128

// out[0..128) = the normals of elements [base, base + 128) of tensor tensor_index at step step, base a multiple of 4.
inline void normals_of(int64_t base, uint64_t seed, uint32_t tensor_index, uint64_t step, float* out) {
  normals_block(base, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), tensor_index,
                static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), out);
}

// Whether p^2 in float64 is NaN or Inf (as square_nonfinite of sampler_kernels.h), as bit tests that vectorise.
inline bool square_nonfinite(float p) { return nonfinite_bits(p); }  // a float's square never overflows a double
inline bool square_nonfinite(double p) { return nonfinite_bits(p * p); }

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
    if (c.has_noise) normals_of(base, c.seed, c.tensor_index, c.step, noise);
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
      const bool nf = nonfinite_bits(gi);
      const T m = kMask ? mb[i] : T(1);
      const T dp = -xi * pi - eps * (nb * gi + loc * (wi - ai) + wd * wi) + s * static_cast<T>(noise[i]);
      T pn = pi + m * dp;
      T wn = wi + m * pn;
      const bool frozen = kMask && m == T(0);
      // a finite gradient whose new weight or momentum is not finite, or whose p^2 would overflow the thermostat's
      // float64 sum (tested before the box, which would hide an inf)
      const bool over = (nonfinite_bits(wn) | square_nonfinite(pn)) & !nf & !frozen;
      block_bad |= (nf ? kFlagGradNonfinite : 0) | (over ? kFlagUpdateNonfinite : 0);
      if constexpr (kBox) {
        const T d = wn - ai;
        const bool out = (d > box) | (d < -box);
        wn = std::min(std::max(wn, ai - box), ai + box);
        pn = out ? -pn : pn;
      }
      const bool keep = frozen | nf | over;
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
    if (c.has_noise) normals_of(base, c.seed, c.tensor_index, c.step, noise);
    T* __restrict wb = w + base;
    T* __restrict vb = v + base;
    const T* __restrict gb = g + base;
    const T* __restrict ab = w0 + base;
    const T* __restrict mb = kMask ? mask + base : nullptr;
    int block_bad = 0;
#pragma omp simd reduction(| : block_bad)
    for (int i = 0; i < len; ++i) {
      const T wi = wb[i], vi = vb[i], gi = gb[i], ai = ab[i];
      const bool nf = nonfinite_bits(gi);
      const T m = kMask ? mb[i] : T(1);
      const T vn = alpha * vi + one_minus * gi * gi;
      const T pc = T(1) / (std::sqrt(vn) + reps);
      const T delta = -half * pc * (nb * gi + loc * (wi - ai) + wd * wi) + s * std::sqrt(pc) * static_cast<T>(noise[i]);
      T wn = wi + m * delta;
      const bool frozen = kMask && m == T(0);
      // a finite gradient whose new weight or V is not finite (tested before the box, which would hide an inf)
      const bool over = (nonfinite_bits(wn) | nonfinite_bits(vn)) & !nf & !frozen;
      block_bad |= (nf ? kFlagGradNonfinite : 0) | (over ? kFlagUpdateNonfinite : 0);
      if constexpr (kBox) wn = std::min(std::max(wn, ai - box), ai + box);
      const bool keep = frozen | nf | over;
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
