// CUDA kernels of the fused SGLD step. Plain CUDA (no torch headers but c10's launch check,
// C10_CUDA_KERNEL_LAUNCH_CHECK after every launch), so nvcc compile-checks this file alone;
// the dispatcher registration lives in sgld_cuda.cpp. One thread per Philox counter: it draws four normals and
// updates four consecutive elements, so the noise is the stream of philox.h, identical to the other backends'
// integers. Compiled with --use_fast_math: the radius's log is log_uniform of philox_cuda.h (fast math's logf is
// off by far more than a rounding near u = 1); sin and cos stay the fast approximations (absolute errors of the
// order of 1e-6). tests/test_sgld.py and tests/test_gpu_paths_review.py check the noise against the reference's
// where a GPU is present.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.h"
#include "philox_cuda.h"
#include "sgld_kernel.h"

namespace pypattern {
namespace {

template <typename T>
__device__ __forceinline__ bool nonfinite(T x) {
  return !isfinite(x);
}

template <typename T>
__global__ void sgld_kernel(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ w0,
                            const T* __restrict__ mask, int64_t n, SgldCoefs c, int* __restrict__ flag) {
  const T a = static_cast<T>(c.drift_grad), b = static_cast<T>(c.drift_loc), d = static_cast<T>(c.drift_wd);
  const T s = static_cast<T>(c.noise_std), box = static_cast<T>(c.box);
  const int64_t n_ctr = (n + 3) / 4;
  int bad = 0;
  for (int64_t ctr = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; ctr < n_ctr;
       ctr += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float xi[4] = {0.f, 0.f, 0.f, 0.f};
    if (c.has_noise) {
      uint32_t x[4] = {static_cast<uint32_t>(ctr), c.tensor_index, static_cast<uint32_t>(c.step),
                       static_cast<uint32_t>(c.step >> 32)};
      philox4x32_10(x, static_cast<uint32_t>(c.seed), static_cast<uint32_t>(c.seed >> 32));
      const float u0 = fmaxf(1.0e-7f, uint_to_uniform(x[0]));
      const float u2 = fmaxf(1.0e-7f, uint_to_uniform(x[2]));
      // log_uniform(u) <= 0 for u <= 1; the clamp keeps sqrtf's argument >= 0 whatever the rounding
      const float r0 = sqrtf(fmaxf(0.0f, -2.0f * log_uniform(u0)));
      const float r1 = sqrtf(fmaxf(0.0f, -2.0f * log_uniform(u2)));
      float s0, c0, s1, c1;
      sincosf(kTwoPi * uint_to_uniform(x[1]), &s0, &c0);
      sincosf(kTwoPi * uint_to_uniform(x[3]), &s1, &c1);
      xi[0] = r0 * c0; xi[1] = r0 * s0; xi[2] = r1 * c1; xi[3] = r1 * s1;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * ctr + k;
      if (i >= n) break;
      const T wi = w[i], gi = g[i], ai = w0[i];
      const bool nf = nonfinite(gi);
      const T m = mask ? mask[i] : T(1);
      T wn = wi + m * (-(a * gi + b * (wi - ai) + d * wi) + s * static_cast<T>(xi[k]));
      const bool frozen = m == T(0);
      const bool over = nonfinite(wn) && !nf && !frozen;  // tested before the box, which would hide an inf
      bad |= (nf ? kFlagGradNonfinite : 0) | (over ? kFlagUpdateNonfinite : 0);
      if (c.has_box) wn = min(max(wn, ai - box), ai + box);
      if (!(frozen || nf || over)) w[i] = wn;
    }
  }
  if (bad) atomicOr(flag, bad);
}

template <typename T>
void launch(T* w, const T* g, const T* w0, const T* mask, int64_t n, const SgldCoefs& c, int* flag, void* stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t n_ctr = (n + 3) / 4;
  const int64_t want = (n_ctr + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  sgld_kernel<T><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(w, g, w0, mask, n, c, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void sgld_cuda_f32(float* w, const float* g, const float* w0, const float* mask, int64_t n, const SgldCoefs& c,
                   int* flag, void* stream) {
  launch<float>(w, g, w0, mask, n, c, flag, stream);
}
void sgld_cuda_f64(double* w, const double* g, const double* w0, const double* mask, int64_t n,
                   const SgldCoefs& c, int* flag, void* stream) {
  launch<double>(w, g, w0, mask, n, c, flag, stream);
}

}  // namespace pypattern
