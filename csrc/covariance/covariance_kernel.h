// Launchers of the CUDA streaming cross-covariance update (covariance.cu). No torch headers, so nvcc
// compile-checks covariance.cu on its own; the dispatcher registration is in covariance_cuda.cpp.
#pragma once
#include <cstdint>

namespace pypattern {

// One chunk of M draws into the accumulator state (all pointers on the device, state float64 contiguous):
// a is (M, K) with strides (s_am, s_ak), float64 when a_double else float32; b is (M, N) likewise.
// mode_a / mode_b: 0 = no auto co-moment, 1 = diagonal (m2 has K / N entries), 2 = full (K x K / N x N).
// workspace: 2 * (K + N) doubles. count: draws already in the accumulator. stream: a cudaStream_t.
void covariance_update_cuda(const void* a, bool a_double, int64_t s_am, int64_t s_ak, const void* b,
                            bool b_double, int64_t s_bm, int64_t s_bn, int64_t M, int64_t K, int64_t N,
                            double* shift_a, double* shift_b, double* mean_a, double* mean_b, double* comoment,
                            double* m2_a, int mode_a, double* m2_b, int mode_b, double* workspace, int64_t count,
                            void* stream);

}  // namespace pypattern
