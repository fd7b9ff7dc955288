// CUDA kernels of the fused SGNHT and RMSprop-SGLD steps. Plain CUDA (no torch headers but c10's launch check,
// C10_CUDA_KERNEL_LAUNCH_CHECK after every launch), so nvcc compile-checks
// this file alone; the dispatcher registration lives in samplers_cuda.cpp. One thread per Philox counter: it draws
// four normals (the stream of sgld/philox.h, by philox_normals4_cuda of sgld/philox_cuda.h: sampler_normals4's
// logf is an approximation under --use_fast_math) and updates four consecutive elements with the element updates
// of sampler_kernels.h, shared with the C++ kernel. SGNHT: each block reduces its sum of p^2 and its count of
// active entries in shared memory and writes them to partials[2 * block]; samplers_cuda.cpp adds the partials
// up and updates the thermostat on the device (phase two).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "samplers/samplers_cuda.h"
#include "sgld/philox_cuda.h"

namespace pypattern {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t n) {
  const int64_t n_ctr = (n + 3) / 4;
  const int64_t want = (n_ctr + kThreads - 1) / kThreads;
  return want < 65535 * 8 ? want : 65535 * 8;
}

template <typename T>
__global__ void sgnht_kernel(T* __restrict__ w, T* __restrict__ p, const T* __restrict__ g,
                             const T* __restrict__ w0, const T* __restrict__ mask, int64_t n, SgnhtCoefs c,
                             const double* __restrict__ xi, double* __restrict__ partials, int* __restrict__ flag) {
  c.xi = *xi;  // the thermostat at the start of the step, read on the device (no host sync)
  __shared__ double s_kin[kThreads];
  __shared__ double s_cnt[kThreads];
  const int64_t n_ctr = (n + 3) / 4;
  double kinetic = 0.0;
  int64_t count = 0;
  int bad = 0;
  for (int64_t ctr = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; ctr < n_ctr;
       ctr += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (c.has_noise) philox_normals4_cuda(c.seed, c.tensor_index, c.step, static_cast<uint64_t>(ctr), z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * ctr + k;
      if (i >= n) break;
      T wi = w[i], pi = p[i];
      count += sgnht_entry<T>(wi, pi, g[i], w0[i], mask ? mask[i] : T(1), z[k], c, &kinetic, &bad);
      w[i] = wi;
      p[i] = pi;
    }
  }
  s_kin[threadIdx.x] = kinetic;
  s_cnt[threadIdx.x] = static_cast<double>(count);
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      s_kin[threadIdx.x] += s_kin[threadIdx.x + s];
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = s_kin[0];
    partials[2 * blockIdx.x + 1] = s_cnt[0];
  }
  if (bad) atomicOr(flag, bad);
}

template <typename T>
__global__ void rmsprop_sgld_kernel(T* __restrict__ w, T* __restrict__ v, const T* __restrict__ g,
                                    const T* __restrict__ w0, const T* __restrict__ mask, int64_t n,
                                    RmspropCoefs c, int* __restrict__ flag) {
  const int64_t n_ctr = (n + 3) / 4;
  int bad = 0;
  for (int64_t ctr = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; ctr < n_ctr;
       ctr += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (c.has_noise) philox_normals4_cuda(c.seed, c.tensor_index, c.step, static_cast<uint64_t>(ctr), z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * ctr + k;
      if (i >= n) break;
      T wi = w[i], vi = v[i];
      rmsprop_sgld_entry<T>(wi, vi, g[i], w0[i], mask ? mask[i] : T(1), z[k], c, &bad);
      w[i] = wi;
      v[i] = vi;
    }
  }
  if (bad) atomicOr(flag, bad);
}

template <typename T>
void launch_sgnht(T* w, T* p, const T* g, const T* w0, const T* mask, int64_t n, const SgnhtCoefs& c,
                  const double* xi, double* partials, int* flag, void* stream) {
  if (n == 0) return;
  const int blocks = static_cast<int>(grid_for(n));
  sgnht_kernel<T><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(w, p, g, w0, mask, n, c, xi,
                                                                              partials, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_rmsprop(T* w, T* v, const T* g, const T* w0, const T* mask, int64_t n, const RmspropCoefs& c, int* flag,
                    void* stream) {
  if (n == 0) return;
  const int blocks = static_cast<int>(grid_for(n));
  rmsprop_sgld_kernel<T><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(w, v, g, w0, mask, n, c, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t sgnht_cuda_blocks(int64_t n) { return n == 0 ? 0 : grid_for(n); }

void sgnht_cuda_f32(float* w, float* p, const float* g, const float* w0, const float* mask, int64_t n,
                    const SgnhtCoefs& c, const double* xi, double* partials, int* flag, void* stream) {
  launch_sgnht<float>(w, p, g, w0, mask, n, c, xi, partials, flag, stream);
}
void sgnht_cuda_f64(double* w, double* p, const double* g, const double* w0, const double* mask, int64_t n,
                    const SgnhtCoefs& c, const double* xi, double* partials, int* flag, void* stream) {
  launch_sgnht<double>(w, p, g, w0, mask, n, c, xi, partials, flag, stream);
}
void rmsprop_sgld_cuda_f32(float* w, float* v, const float* g, const float* w0, const float* mask, int64_t n,
                           const RmspropCoefs& c, int* flag, void* stream) {
  launch_rmsprop<float>(w, v, g, w0, mask, n, c, flag, stream);
}
void rmsprop_sgld_cuda_f64(double* w, double* v, const double* g, const double* w0, const double* mask, int64_t n,
                           const RmspropCoefs& c, int* flag, void* stream) {
  launch_rmsprop<double>(w, v, g, w0, mask, n, c, flag, stream);
}

}  // namespace pypattern
