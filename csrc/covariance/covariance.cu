// CUDA kernels of the streaming cross-covariance update (maths in pypattern/ops/covariance/). Plain CUDA but for
// c10's launch check (every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK); nvcc compile-checks this file
// alone; covariance_cuda.cpp registers the op. Everything is float64
// (chunks may be float32): centring happens on load, so no centred copy of the chunk is ever written.
//   1. if count == 0: shift = column means of the raw chunk, mean = 0;
//   2. chunk means of (x - shift), delta = chunk mean - running mean;
//   3. comoment += ac^T bc + w delta_a delta_b^T (64 x 64 tiles, 16 draws per step, 4 x 4 outputs per thread);
//   4. auto co-moments (diagonal or full, the full one by the same tile kernel);
//   5. mean += (m / (n + m)) delta.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "covariance_kernel.h"

namespace pypattern {
namespace {

constexpr int kTile = 64;   // output tile edge
constexpr int kStep = 16;   // draws per shared-memory step
constexpr int kThreads = 256;

template <typename T>
__global__ void col_mean_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t M, int64_t cols,
                                const double* __restrict__ shift, double* __restrict__ out, double scale) {
  __shared__ double part[8][32];
  const int lane = threadIdx.x % 32, grp = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  double s = 0.0;
  if (c < cols) {
    const double sh = shift ? shift[c] : 0.0;
    for (int64_t r = grp; r < M; r += 8) s += static_cast<double>(x[r * s0 + c * s1]) - sh;
  }
  part[grp][lane] = s;
  __syncthreads();
  if (grp == 0 && c < cols) {
    double t = 0.0;
#pragma unroll
    for (int g = 0; g < 8; ++g) t += part[g][lane];
    out[c] = t * scale;
  }
}

template <typename T>
__global__ void col_m2_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t M, int64_t cols,
                              const double* __restrict__ shift, const double* __restrict__ mean,
                              const double* __restrict__ delta, double w, double* __restrict__ m2) {
  __shared__ double part[8][32];
  const int lane = threadIdx.x % 32, grp = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  double s = 0.0;
  if (c < cols) {
    const double sh = shift[c], mu = mean[c];
    for (int64_t r = grp; r < M; r += 8) {
      const double v = (static_cast<double>(x[r * s0 + c * s1]) - sh) - mu;
      s += v * v;
    }
  }
  part[grp][lane] = s;
  __syncthreads();
  if (grp == 0 && c < cols) {
    double t = 0.0;
#pragma unroll
    for (int g = 0; g < 8; ++g) t += part[g][lane];
    m2[c] += t + w * delta[c] * delta[c];
  }
}

__global__ void start_kernel(double* __restrict__ shift_src, double* __restrict__ shift, double* __restrict__ mean,
                             int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    shift[i] = shift_src[i];
    mean[i] = 0.0;
  }
}

__global__ void delta_kernel(const double* __restrict__ chunk_mean, const double* __restrict__ mean,
                             double* __restrict__ delta, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) delta[i] = chunk_mean[i] - mean[i];
}

__global__ void mean_kernel(double* __restrict__ mean, const double* __restrict__ delta, double f, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) mean[i] += f * delta[i];
}

// C[k, n] += sum_r ((a[r,k] - sa[k]) - ma[k]) ((b[r,n] - sb[n]) - mb[n]) + w da[k] db[n]
template <typename TA, typename TB>
__global__ void __launch_bounds__(kThreads)
    comoment_kernel(const TA* __restrict__ a, int64_t s_am, int64_t s_ak, const TB* __restrict__ b, int64_t s_bm,
                    int64_t s_bn, int64_t M, int64_t K, int64_t N, const double* __restrict__ sa,
                    const double* __restrict__ ma, const double* __restrict__ sb, const double* __restrict__ mb,
                    const double* __restrict__ da, const double* __restrict__ db, double w, double* __restrict__ C) {
  __shared__ double As[kStep][kTile];
  __shared__ double Bs[kStep][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // N on gridDim.x (up to 2^31 - 1 blocks); the K tiles on gridDim.y, capped at 65535 (see comoment below): each
  // block walks the K tiles in steps of gridDim.y
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t k_tiles = (K + kTile - 1) / kTile;
  for (int64_t kt = blockIdx.y; kt < k_tiles; kt += gridDim.y) {
    const int64_t k0 = kt * kTile;
    double acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
    for (int64_t m0 = 0; m0 < M; m0 += kStep) {
      for (int i = threadIdx.x; i < kStep * kTile; i += kThreads) {
        const int r = i / kTile, c = i % kTile;
        const int64_t row = m0 + r, ka = k0 + c, nb = n0 + c;
        As[r][c] = (row < M && ka < K) ? (static_cast<double>(a[row * s_am + ka * s_ak]) - sa[ka]) - ma[ka] : 0.0;
        Bs[r][c] = (row < M && nb < N) ? (static_cast<double>(b[row * s_bm + nb * s_bn]) - sb[nb]) - mb[nb] : 0.0;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kStep; ++r) {
        double av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[r][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[r][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t k = k0 + ty + 16 * i;
      if (k >= K) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n < N) C[k * N + n] += acc[i][j] + w * da[k] * db[n];
      }
    }
  }
}

inline unsigned blocks(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

template <typename T>
void col_mean(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t cols, const double* shift, double* out,
              cudaStream_t st) {
  if (cols > 0) {
    col_mean_kernel<T><<<blocks(cols, 32), kThreads, 0, st>>>(x, s0, s1, M, cols, shift, out, 1.0 / M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename TA, typename TB>
void comoment(const TA* a, int64_t s_am, int64_t s_ak, const TB* b, int64_t s_bm, int64_t s_bn, int64_t M, int64_t K,
              int64_t N, const double* sa, const double* ma, const double* sb, const double* mb, const double* da,
              const double* db, double w, double* C, cudaStream_t st) {
  if (K == 0 || N == 0) return;
  // N on x (2^31 - 1 blocks at most), the K tiles on y capped at 65535, CUDA's limit there (the kernel loops)
  const unsigned k_blocks = blocks(K, kTile);
  dim3 grid(blocks(N, kTile), k_blocks < 65535u ? k_blocks : 65535u);
  comoment_kernel<TA, TB><<<grid, kThreads, 0, st>>>(a, s_am, s_ak, b, s_bm, s_bn, M, K, N, sa, ma, sb, mb, da, db,
                                                     w, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void auto_moment(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t cols, const double* shift,
                 const double* mean, const double* delta, double w, double* m2, int mode, cudaStream_t st) {
  if (mode == 1 && cols > 0) {
    col_m2_kernel<T><<<blocks(cols, 32), kThreads, 0, st>>>(x, s0, s1, M, cols, shift, mean, delta, w, m2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (mode == 2) {
    comoment<T, T>(x, s0, s1, x, s0, s1, M, cols, cols, shift, mean, shift, mean, delta, delta, w, m2, st);
  }
}

template <typename TA, typename TB>
void update(const TA* a, int64_t s_am, int64_t s_ak, const TB* b, int64_t s_bm, int64_t s_bn, int64_t M, int64_t K,
            int64_t N, double* shift_a, double* shift_b, double* mean_a, double* mean_b, double* C, double* m2_a,
            int mode_a, double* m2_b, int mode_b, double* ws, int64_t count, cudaStream_t st) {
  double* pm_a = ws;
  double* pm_b = pm_a + K;
  double* d_a = pm_b + N;
  double* d_b = d_a + K;
  if (count == 0) {
    col_mean(a, s_am, s_ak, M, K, nullptr, pm_a, st);
    col_mean(b, s_bm, s_bn, M, N, nullptr, pm_b, st);
    if (K > 0) {
      start_kernel<<<blocks(K, kThreads), kThreads, 0, st>>>(pm_a, shift_a, mean_a, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (N > 0) {
      start_kernel<<<blocks(N, kThreads), kThreads, 0, st>>>(pm_b, shift_b, mean_b, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  col_mean(a, s_am, s_ak, M, K, shift_a, pm_a, st);
  col_mean(b, s_bm, s_bn, M, N, shift_b, pm_b, st);
  if (K > 0) {
    delta_kernel<<<blocks(K, kThreads), kThreads, 0, st>>>(pm_a, mean_a, d_a, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (N > 0) {
    delta_kernel<<<blocks(N, kThreads), kThreads, 0, st>>>(pm_b, mean_b, d_b, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const double n_new = static_cast<double>(count + M);
  const double w = static_cast<double>(count) * static_cast<double>(M) / n_new;
  comoment<TA, TB>(a, s_am, s_ak, b, s_bm, s_bn, M, K, N, shift_a, pm_a, shift_b, pm_b, d_a, d_b, w, C, st);
  auto_moment<TA>(a, s_am, s_ak, M, K, shift_a, pm_a, d_a, w, m2_a, mode_a, st);
  auto_moment<TB>(b, s_bm, s_bn, M, N, shift_b, pm_b, d_b, w, m2_b, mode_b, st);
  const double f = static_cast<double>(M) / n_new;
  if (K > 0) {
    mean_kernel<<<blocks(K, kThreads), kThreads, 0, st>>>(mean_a, d_a, f, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (N > 0) {
    mean_kernel<<<blocks(N, kThreads), kThreads, 0, st>>>(mean_b, d_b, f, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void covariance_update_cuda(const void* a, bool a_double, int64_t s_am, int64_t s_ak, const void* b,
                            bool b_double, int64_t s_bm, int64_t s_bn, int64_t M, int64_t K, int64_t N,
                            double* shift_a, double* shift_b, double* mean_a, double* mean_b, double* comoment,
                            double* m2_a, int mode_a, double* m2_b, int mode_b, double* workspace, int64_t count,
                            void* stream) {
  if (M == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
#define PP_COV_CALL(TA, TB)                                                                                      \
  update<TA, TB>(static_cast<const TA*>(a), s_am, s_ak, static_cast<const TB*>(b), s_bm, s_bn, M, K, N, shift_a, \
                 shift_b, mean_a, mean_b, comoment, m2_a, mode_a, m2_b, mode_b, workspace, count, st)
  if (a_double && b_double) PP_COV_CALL(double, double);
  else if (a_double) PP_COV_CALL(double, float);
  else if (b_double) PP_COV_CALL(float, double);
  else PP_COV_CALL(float, float);
#undef PP_COV_CALL
}

}  // namespace pypattern
