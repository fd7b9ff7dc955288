// Launcher of the CUDA pairwise per-sample gradient Gram (grad_gram.cu); no torch headers, so nvcc
// compile-checks grad_gram.cu alone. The dispatcher registration is in grad_gram_cuda.cpp.
#pragma once
#include <cstdint>

namespace pypattern {

// g (batch x batch, float64, zeroed by the caller) += the pairwise contraction of pypattern/ops/grad_gram/:
//   g[i, j] = sum_{s,t} K[iT+s, jT+t] (y[iT+s] . y[jT+t]),  K = x x^T, or [ids equal and >= 0] when ids != null.
// x (rows, p) and y (rows, q) row-major contiguous, float64 when is_double else float32; rows = batch * T.
void grad_gram_pairwise_cuda(const void* x, const void* y, const int64_t* ids, bool is_double, int64_t rows,
                             int64_t p, int64_t q, int64_t batch, double* g, void* stream);

}  // namespace pypattern
