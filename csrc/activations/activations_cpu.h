// Raw-pointer CPU kernels of the tanh-form GELU (activations_cpu_fast.cpp; no torch headers). Each processes
// elements [0, n) of contiguous arrays; c is the constant inside the tanh (sqrt(2 / pi) for GPT-2's gelu_new).
#pragma once
#include <cstdint>

namespace pypattern {

// y = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
void gelu_tanh_cpu_f32(const float* x, float* y, int64_t n, double c);
void gelu_tanh_cpu_f64(const double* x, double* y, int64_t n, double c);
// dx = g * d/dx [0.5 x (1 + tanh(c (x + 0.044715 x^3)))]
void gelu_tanh_backward_cpu_f32(const float* g, const float* x, float* dx, int64_t n, double c);
void gelu_tanh_backward_cpu_f64(const double* g, const double* x, double* dx, int64_t n, double c);

}  // namespace pypattern
