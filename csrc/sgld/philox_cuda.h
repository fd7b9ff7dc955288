// Device side of the noise stream of philox.h for the CUDA kernels (sgld.cu, samplers/samplers.cu), which are
// compiled with --use_fast_math (setup.py). That flag turns logf into lg2.approx, whose error is absolute (about
// 1e-7 on [0.5, 2]): near u = 1, where log u is about -(1 - u), it is a large relative error, and the Box-Muller
// radius r = sqrt(-2 log u) moves by up to 1e-4 and more (at u = 1 - 2^-24, r = 3.5e-4 became 0), so the noise
// left the other backends' stream, which take log to float precision. log1pf is not replaced by an approximation,
// and its argument u - 1 is exact for u >= 0.5; below 0.5, |log u| > 0.69 and lg2.approx's error is a few ulps
// of it. Only nvcc compiles this file.
#pragma once
#include <cstdint>

#include "sgld/philox.h"

namespace pypattern {

// log(u) to float precision for u in (0, 1], under --use_fast_math as without it.
__device__ __forceinline__ float log_uniform(float u) { return u >= 0.5f ? log1pf(u - 1.0f) : logf(u); }

// The four normals of Philox counter ctr: sampler_normals4 of samplers/sampler_kernels.h (Box-Muller on Triton's
// uniforms, as in the reference), with the log above.
__device__ __forceinline__ void philox_normals4_cuda(uint64_t seed, uint32_t tensor_index, uint64_t step,
                                                     uint64_t ctr, float out[4]) {
  uint32_t x[4] = {static_cast<uint32_t>(ctr), tensor_index, static_cast<uint32_t>(step),
                   static_cast<uint32_t>(step >> 32)};
  philox4x32_10(x, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u0 = fmaxf(1.0e-7f, uint_to_uniform(x[0]));
  const float u2 = fmaxf(1.0e-7f, uint_to_uniform(x[2]));
  const float r0 = sqrtf(fmaxf(0.0f, -2.0f * log_uniform(u0)));
  const float r1 = sqrtf(fmaxf(0.0f, -2.0f * log_uniform(u2)));
  float s0, c0, s1, c1;
  sincosf(kTwoPi * uint_to_uniform(x[1]), &s0, &c0);
  sincosf(kTwoPi * uint_to_uniform(x[3]), &s1, &c1);
  out[0] = r0 * c0;
  out[1] = r0 * s0;
  out[2] = r1 * c1;
  out[3] = r1 * s1;
}

}  // namespace pypattern
