// Raw-pointer CPU kernel of the row dot products (dots_cpu_fast.cpp; no torch headers).
#pragma once
#include <cstdint>

namespace pypattern {

// out[m * ldo + n] = sum_{k < K} a[m][k] * g[n][k] for m < M, n < N: a and g are arrays of row pointers, each row
// K contiguous elements. out's rows are written in full (not accumulated into).
void row_dots_cpu_f32(const float* const* a, int64_t M, const float* const* g, int64_t N, int64_t K, float* out,
                      int64_t ldo);
void row_dots_cpu_f64(const double* const* a, int64_t M, const double* const* g, int64_t N, int64_t K,
                      double* out, int64_t ldo);

}  // namespace pypattern
