// The tanh-form GELU and its derivative on CUDA: the arithmetic of activations_cpu_fast.cpp (x sigmoid(2u), the
// exponent clamped to [-87, 80] in float32 or [-708, 700] in float64, beyond which the value is x * 0 and the
// derivative 0 or 1), one thread per element in a grid-stride loop.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "activations/activations_kernel.h"

namespace pypattern {
namespace {

template <typename T>
struct Lim;
template <>
struct Lim<float> {
  static __device__ __forceinline__ float lo() { return -87.0f; }
  static __device__ __forceinline__ float hi() { return 80.0f; }
  static __device__ __forceinline__ float ex(float z) { return expf(z); }
};
template <>
struct Lim<double> {
  static __device__ __forceinline__ double lo() { return -708.0; }
  static __device__ __forceinline__ double hi() { return 700.0; }
  static __device__ __forceinline__ double ex(double z) { return exp(z); }
};

template <typename T>
__device__ __forceinline__ T neg2u(T x, T c2, T a) {
  return -c2 * fma(a * x, x, T(1)) * x;
}

template <typename T>
__global__ void gelu_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, T c2, T a) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const T xi = x[i];
    const T z = neg2u(xi, c2, a);
    const T e = Lim<T>::ex(fmin(fmax(z, Lim<T>::lo()), Lim<T>::hi()));
    y[i] = z > Lim<T>::hi() ? xi * T(0) : xi / (T(1) + e);
  }
}

template <typename T>
__global__ void gelu_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                                     int64_t n, T c2, T a, T a3) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const T xi = x[i], gi = g[i];
    const T z = neg2u(xi, c2, a);
    const T e = Lim<T>::ex(fmin(fmax(z, Lim<T>::lo()), Lim<T>::hi()));
    const T s = T(1) / (T(1) + e);
    const T ss = (e * s) * s;
    const T d = gi * fma(xi * ss * c2, fma(a3 * xi, xi, T(1)), s);
    dx[i] = z > Lim<T>::hi() ? gi * T(0) : (z < Lim<T>::lo() ? gi : d);
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 65535 * 8 ? b : 65535 * 8);
}

}  // namespace

void gelu_tanh_cuda(const void* x, void* y, int64_t n, double c, bool is_double, void* stream) {
  if (n == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (is_double) {
    gelu_kernel<double><<<blocks_for(n), 256, 0, st>>>(static_cast<const double*>(x), static_cast<double*>(y), n,
                                                      2.0 * c, 0.044715);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    gelu_kernel<float><<<blocks_for(n), 256, 0, st>>>(static_cast<const float*>(x), static_cast<float*>(y), n,
                                                     static_cast<float>(2.0 * c), 0.044715f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void gelu_tanh_backward_cuda(const void* g, const void* x, void* dx, int64_t n, double c, bool is_double,
                             void* stream) {
  if (n == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (is_double) {
    gelu_backward_kernel<double><<<blocks_for(n), 256, 0, st>>>(
        static_cast<const double*>(g), static_cast<const double*>(x), static_cast<double*>(dx), n, 2.0 * c, 0.044715,
        3.0 * 0.044715);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    gelu_backward_kernel<float><<<blocks_for(n), 256, 0, st>>>(
        static_cast<const float*>(g), static_cast<const float*>(x), static_cast<float*>(dx), n,
        static_cast<float>(2.0 * c), 0.044715f, static_cast<float>(3.0 * 0.044715));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace pypattern
