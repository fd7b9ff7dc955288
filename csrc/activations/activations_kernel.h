// Launchers of the CUDA tanh-form GELU and its derivative (activations.cu); no torch headers, so nvcc
// compile-checks activations.cu alone. The dispatcher registration is in activations_cuda.cpp.
#pragma once
#include <cstdint>

namespace pypattern {

// y = 0.5 x (1 + tanh(c (x + 0.044715 x^3))) over n contiguous elements (float64 when is_double else float32)
void gelu_tanh_cuda(const void* x, void* y, int64_t n, double c, bool is_double, void* stream);
// dx = g * d/dx [0.5 x (1 + tanh(c (x + 0.044715 x^3)))]
void gelu_tanh_backward_cuda(const void* g, const void* x, void* dx, int64_t n, double c, bool is_double,
                             void* stream);

}  // namespace pypattern
