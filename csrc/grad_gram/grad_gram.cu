// CUDA kernel of the pairwise per-sample gradient Gram (maths in pypattern/ops/grad_gram/). Plain CUDA but for
// c10's launch check (every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK); nvcc compile-checks this file
// alone; grad_gram_cuda.cpp registers the op.
// One block of 16 x 16 threads owns a 32 x 32 tile of row pairs (2 x 2 per thread); both dot products are
// accumulated from 16-feature slices staged in shared memory; the products go to g by atomicAdd (float64):
// one add per block when T is a multiple of 32 (the tile lies in one sample pair), else one per element.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "grad_gram_kernel.h"

namespace pypattern {
namespace {

constexpr int kTile = 32;
constexpr int kSlice = 16;

template <typename T>
__device__ void tile_dots(const T* __restrict__ m, int64_t cols, int64_t rows, int64_t r0, int64_t c0,
                          T (*sr)[kSlice + 1], T (*sc)[kSlice + 1], T acc[2][2]) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  for (int64_t f0 = 0; f0 < cols; f0 += kSlice) {
    for (int i = tid; i < kTile * kSlice; i += 256) {
      const int r = i / kSlice, f = i % kSlice;
      const int64_t fr = f0 + f;
      sr[r][f] = (r0 + r < rows && fr < cols) ? m[(r0 + r) * cols + fr] : T(0);
      sc[r][f] = (c0 + r < rows && fr < cols) ? m[(c0 + r) * cols + fr] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < kSlice; ++f) {
      const T a0 = sr[ty][f], a1 = sr[ty + 16][f];
      const T b0 = sc[tx][f], b1 = sc[tx + 16][f];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    pairwise_kernel(const T* __restrict__ x, const T* __restrict__ y, const int64_t* __restrict__ ids, int64_t rows,
                    int64_t p, int64_t q, int64_t t, int64_t batch, double* __restrict__ g) {
  __shared__ T sr[kTile][kSlice + 1];
  __shared__ T sc[kTile][kSlice + 1];
  __shared__ double red[256];
  const int tx = threadIdx.x, ty = threadIdx.y;
  // the column tiles on gridDim.x (up to 2^31 - 1 blocks); the row tiles on gridDim.y, capped at 65535 (see
  // grad_gram_pairwise_cuda): each block walks the row tiles in steps of gridDim.y
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * kTile;
    T kd[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
    tile_dots<T>(y, q, rows, r0, c0, sr, sc, kd);
    T ka[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
    if (ids == nullptr) tile_dots<T>(x, p, rows, r0, c0, sr, sc, ka);
    double v[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t r = r0 + ty + 16 * i, c = c0 + tx + 16 * j;
        double k = 0.0;
        if (r < rows && c < rows) {
          if (ids == nullptr) {
            k = static_cast<double>(ka[i][j]);
          } else {
            k = (ids[r] >= 0 && ids[r] == ids[c]) ? 1.0 : 0.0;
          }
        }
        v[i][j] = k * static_cast<double>(kd[i][j]);
      }
    }
    if (t % kTile == 0) {
      red[ty * 16 + tx] = v[0][0] + v[0][1] + v[1][0] + v[1][1];
      __syncthreads();
      for (int s = 128; s > 0; s >>= 1) {
        if (ty * 16 + tx < s) red[ty * 16 + tx] += red[ty * 16 + tx + s];
        __syncthreads();
      }
      if (tx == 0 && ty == 0 && r0 < rows && c0 < rows) atomicAdd(g + (r0 / t) * batch + c0 / t, red[0]);
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t r = r0 + ty + 16 * i, c = c0 + tx + 16 * j;
          if (r < rows && c < rows && v[i][j] != 0.0) atomicAdd(g + (r / t) * batch + c / t, v[i][j]);
        }
      }
    }
    __syncthreads();  // sr, sc and red are rewritten by the next row tile
  }
}

}  // namespace

void grad_gram_pairwise_cuda(const void* x, const void* y, const int64_t* ids, bool is_double, int64_t rows,
                             int64_t p, int64_t q, int64_t batch, double* g, void* stream) {
  if (rows == 0 || batch == 0) return;
  const int64_t t = rows / batch;
  const unsigned nb = static_cast<unsigned>((rows + kTile - 1) / kTile);
  // the column tiles on x (2^31 - 1 blocks at most), the row tiles on y capped at 65535, CUDA's limit there (the
  // kernel loops)
  dim3 grid(nb, nb < 65535u ? nb : 65535u), block(16, 16);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (is_double) {
    pairwise_kernel<double><<<grid, block, 0, st>>>(static_cast<const double*>(x), static_cast<const double*>(y), ids,
                                                    rows, p, q, t, batch, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    pairwise_kernel<float><<<grid, block, 0, st>>>(static_cast<const float*>(x), static_cast<const float*>(y), ids,
                                                   rows, p, q, t, batch, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace pypattern
