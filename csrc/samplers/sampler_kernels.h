// Element-wise SGNHT and RMSprop-SGLD updates shared by the C++ and CUDA kernels (no torch headers, so nvcc can
// compile-check the .cu files alone). The noise is the SGLD stream of sgld/philox.h: element e of tensor t at
// step s takes normal e % 4 of Philox counter (e / 4, t, s_low, s_high) keyed by the seed.
#pragma once
#include <cmath>
#include <cstdint>

#include "sgld/philox.h"
#include "sgld/sgld_kernel.h"  // the flags kFlagGradNonfinite, kFlagUpdateNonfinite

namespace pypattern {

struct SgnhtCoefs {
  double xi;          // the thermostat at the start of the step
  double step_size;   // eps
  double nbeta, localization, weight_decay;
  double noise_std;   // sqrt(2 A eps) * noise_scale
  double box;
  uint64_t seed, step;
  uint32_t tensor_index;
  bool has_box, has_noise;
};

struct RmspropCoefs {
  double half_step;   // eps / 2
  double nbeta, localization, weight_decay;
  double alpha, rms_eps;
  double noise_std;   // sqrt(eps) * noise_scale
  double box;
  uint64_t seed, step;
  uint32_t tensor_index;
  bool has_box, has_noise;
};

// The four normals of Philox counter ctr (Box-Muller on Triton's uniforms, as in the reference).
PP_HD void sampler_normals4(uint64_t seed, uint32_t tensor_index, uint64_t step, uint64_t ctr, float out[4]) {
  uint32_t x[4] = {static_cast<uint32_t>(ctr), tensor_index, static_cast<uint32_t>(step),
                   static_cast<uint32_t>(step >> 32)};
  philox4x32_10(x, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  float u0 = uint_to_uniform(x[0]);
  float u2 = uint_to_uniform(x[2]);
  u0 = u0 < 1.0e-7f ? 1.0e-7f : u0;
  u2 = u2 < 1.0e-7f ? 1.0e-7f : u2;
  // u < 1 always (at most 1 - 2^-24), but an approximate logf (nvcc's --use_fast_math) is off by up to ~3e-7
  // absolute near 1 and may return a positive log there: clamp, so the radius is 0 rather than NaN
  const float r0 = sqrtf(fmaxf(0.0f, -2.0f * logf(u0)));
  const float r1 = sqrtf(fmaxf(0.0f, -2.0f * logf(u2)));
  const float t0 = kTwoPi * uint_to_uniform(x[1]);
  const float t1 = kTwoPi * uint_to_uniform(x[3]);
  out[0] = r0 * cosf(t0);
  out[1] = r0 * sinf(t0);
  out[2] = r1 * cosf(t1);
  out[3] = r1 * sinf(t1);
}

// Whether the square of a new momentum, added to the thermostat's float64 sum, would be NaN or Inf: for float32
// exactly when the momentum is, for float64 also when it exceeds about 1.3e154.
template <typename T>
PP_HD bool square_nonfinite(T p) {
  const double d = static_cast<double>(p);
  return !std::isfinite(d * d);
}

// One SGNHT entry; returns 1 when the entry is active (mask != 0, so it counts in the thermostat's mean) and
// adds its p^2 to *kinetic. ORs into *bad kFlagGradNonfinite on a non-finite gradient, kFlagUpdateNonfinite when
// a finite gradient gives a non-finite weight or momentum (or a momentum whose square overflows float64; tested
// before the bounding box): the entry is then left as it was, its momentum too.
template <typename T>
PP_HD int sgnht_entry(T& w, T& p, T g, T a, T m, float zeta, const SgnhtCoefs& c, double* kinetic, int* bad) {
  const bool finite = std::isfinite(static_cast<double>(g));
  if (!finite) *bad |= kFlagGradNonfinite;
  if (m == T(0)) return 0;
  if (finite) {
    const T drift = static_cast<T>(c.nbeta) * g + static_cast<T>(c.localization) * (w - a) +
                    static_cast<T>(c.weight_decay) * w;
    const T dp = -static_cast<T>(c.xi) * p - static_cast<T>(c.step_size) * drift +
                 static_cast<T>(c.noise_std) * static_cast<T>(zeta);
    T pn = p + m * dp;
    T wn = w + m * pn;
    if (!std::isfinite(static_cast<double>(wn)) || square_nonfinite(pn)) {
      *bad |= kFlagUpdateNonfinite;
    } else {
      if (c.has_box) {
        const T box = static_cast<T>(c.box);
        const T d = wn - a;
        if (d > box || d < -box) {
          pn = -pn;
          wn = d > box ? a + box : a - box;
        }
      }
      w = wn;
      p = pn;
    }
  }
  *kinetic += static_cast<double>(p) * static_cast<double>(p);
  return 1;
}

// One RMSprop-SGLD entry. ORs into *bad kFlagGradNonfinite on a non-finite gradient, kFlagUpdateNonfinite when
// a finite gradient gives a non-finite weight or V (tested before the bounding box): the entry and its V are then
// left as they were.
template <typename T>
PP_HD void rmsprop_sgld_entry(T& w, T& v, T g, T a, T m, float xi, const RmspropCoefs& c, int* bad) {
  if (!std::isfinite(static_cast<double>(g))) {
    *bad |= kFlagGradNonfinite;
    return;
  }
  if (m == T(0)) return;
  const T vn = static_cast<T>(c.alpha) * v + static_cast<T>(1.0 - c.alpha) * g * g;
  const T precond = T(1) / (std::sqrt(vn) + static_cast<T>(c.rms_eps));
  const T drift = static_cast<T>(c.nbeta) * g + static_cast<T>(c.localization) * (w - a) +
                  static_cast<T>(c.weight_decay) * w;
  T delta = -static_cast<T>(c.half_step) * precond * drift;
  if (c.has_noise) delta += static_cast<T>(c.noise_std) * std::sqrt(precond) * static_cast<T>(xi);
  T wn = w + m * delta;
  if (!std::isfinite(static_cast<double>(wn)) || !std::isfinite(static_cast<double>(vn))) {
    *bad |= kFlagUpdateNonfinite;
    return;
  }
  if (c.has_box) {
    const T box = static_cast<T>(c.box);
    wn = wn < a - box ? a - box : (wn > a + box ? a + box : wn);
  }
  w = wn;
  v = vn;
}

}  // namespace pypattern
