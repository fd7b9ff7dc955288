// CUDA registration of pypattern::gelu_tanh and pypattern::gelu_tanh_backward (compiled only in CUDA builds; see
// setup.py). The kernels and their launchers are in activations.cu; validation happens in
// pypattern/ops/activations/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "activations/activations_kernel.h"

namespace pypattern {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " is not a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, " (cuda): ", name,
              " has dtype ", t.scalar_type(), "; supported are float32 and float64");
}

at::Tensor gelu_tanh_cuda_op(const at::Tensor& x_in, double c) {
  check_float("gelu_tanh", "x", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  gelu_tanh_cuda(x.data_ptr(), y.data_ptr(), x.numel(), c, x.scalar_type() == at::kDouble,
                 c10::cuda::getCurrentCUDAStream().stream());
  return y;
}

at::Tensor gelu_tanh_backward_cuda_op(const at::Tensor& g_in, const at::Tensor& x_in, double c) {
  check_float("gelu_tanh_backward", "grad", g_in);
  check_float("gelu_tanh_backward", "x", x_in);
  TORCH_CHECK(g_in.sizes() == x_in.sizes(), "gelu_tanh_backward: grad has shape ", g_in.sizes(), ", x has ",
              x_in.sizes());
  TORCH_CHECK(g_in.scalar_type() == x_in.scalar_type(), "gelu_tanh_backward: grad is ", g_in.scalar_type(),
              ", x is ", x_in.scalar_type());
  TORCH_CHECK(g_in.device() == x_in.device(), "gelu_tanh_backward: grad and x are on different devices");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  gelu_tanh_backward_cuda(g.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), c, x.scalar_type() == at::kDouble,
                          c10::cuda::getCurrentCUDAStream().stream());
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) {
  m.impl("gelu_tanh", &gelu_tanh_cuda_op);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cuda_op);
}

}  // namespace pypattern
