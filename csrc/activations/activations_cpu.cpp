// The tanh-form GELU: schemas (TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernels of pypattern::gelu_tanh and
// pypattern::gelu_tanh_backward. Validation happens in Python (pypattern/ops/activations/); this file checks only
// what would make memory access unsafe. The work is split over torch's intra-op threads in chunks of 32768
// elements, each running the vectorised loop of activations_cpu_fast.cpp; every element is computed on its own,
// so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "activations/activations_cpu.h"

namespace pypattern {
namespace {

constexpr int64_t kGrain = 32768;

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu): ", name, " is not a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, " (cpu): ", name,
              " has dtype ", t.scalar_type(), "; supported are float32 and float64");
}

at::Tensor gelu_tanh_cpu(const at::Tensor& x_in, double c) {
  check_float("gelu_tanh", "x", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { gelu_tanh_cpu_f32(xp + b, yp + b, e - b, c); });
  } else {
    const double* xp = x.const_data_ptr<double>();
    double* yp = y.mutable_data_ptr<double>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { gelu_tanh_cpu_f64(xp + b, yp + b, e - b, c); });
  }
  return y;
}

at::Tensor gelu_tanh_backward_cpu(const at::Tensor& g_in, const at::Tensor& x_in, double c) {
  check_float("gelu_tanh_backward", "grad", g_in);
  check_float("gelu_tanh_backward", "x", x_in);
  TORCH_CHECK(g_in.sizes() == x_in.sizes(), "gelu_tanh_backward: grad has shape ", g_in.sizes(), ", x has ",
              x_in.sizes());
  TORCH_CHECK(g_in.scalar_type() == x_in.scalar_type(), "gelu_tanh_backward: grad is ", g_in.scalar_type(),
              ", x is ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return dx;
  if (x.scalar_type() == at::kFloat) {
    const float *xp = x.const_data_ptr<float>(), *gp = g.const_data_ptr<float>();
    float* dp = dx.mutable_data_ptr<float>();
    at::parallel_for(0, n, kGrain,
                     [&](int64_t b, int64_t e) { gelu_tanh_backward_cpu_f32(gp + b, xp + b, dp + b, e - b, c); });
  } else {
    const double *xp = x.const_data_ptr<double>(), *gp = g.const_data_ptr<double>();
    double* dp = dx.mutable_data_ptr<double>();
    at::parallel_for(0, n, kGrain,
                     [&](int64_t b, int64_t e) { gelu_tanh_backward_cpu_f64(gp + b, xp + b, dp + b, e - b, c); });
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  m.def("gelu_tanh(Tensor x, float c) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x, float c) -> Tensor");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) {
  m.impl("gelu_tanh", &gelu_tanh_cpu);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cpu);
}

}  // namespace pypattern
