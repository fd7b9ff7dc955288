// CUDA registration of pypattern::sgld_step_ (compiled only in CUDA builds; see setup.py).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "math_bits.h"
#include "sgld_kernel.h"

namespace pypattern {

SgldCoefs make_coefs(double step_size, double nbeta, double localization, double weight_decay,
                     double noise_scale, const c10::optional<double>& box, int64_t seed, int64_t step);

namespace {

at::Tensor sgld_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                          const c10::List<c10::optional<at::Tensor>>& masks, double step_size, double nbeta,
                          double localization, double weight_decay, double noise_scale,
                          c10::optional<double> bounding_box, int64_t seed, int64_t step) {
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n,
              "sgld_step_: params, grads and anchors must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n,
              "sgld_step_: masks must be empty or have one entry per tensor");
  TORCH_CHECK(n > 0, "sgld_step_ (cuda): empty tensor list");
  c10::cuda::CUDAGuard guard(params[0].device());
  auto flags = at::zeros({n}, params[0].options().dtype(at::kInt));
  int* flag_ptr = flags.data_ptr<int>();
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  SgldCoefs base = make_coefs(step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step);
  const at::Device device = params[0].device();
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.is_cuda() && grads[t].is_cuda() && anchors[t].is_cuda(), "sgld_step_ (cuda): tensor ", t,
                " is not on the GPU");
    // the kernels run on params[0]'s device (the guard above): a pointer into another GPU's memory is an illegal
    // address there (a tensor moved after the first step of a chain, whose later steps skip the Python checks)
    TORCH_CHECK(p.device() == device && grads[t].device() == device && anchors[t].device() == device,
                "sgld_step_ (cuda): tensor ", t, " is not on params[0]'s device ", device);
    TORCH_CHECK(grads[t].sizes() == p.sizes() && anchors[t].sizes() == p.sizes(),
                "sgld_step_: shape mismatch at tensor ", t);
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && anchors[t].scalar_type() == p.scalar_type(),
                "sgld_step_: dtype mismatch at tensor ", t);
    check_writable(p, "sgld_step_", "params", t);
    if (p.numel() == 0) continue;
    at::Tensor w = p.is_contiguous() ? p : p.contiguous();
    at::Tensor g = read_values(grads[t]).contiguous();
    at::Tensor a = read_values(anchors[t]).contiguous();
    at::Tensor m;
    if (masks.size() > 0) {
      c10::optional<at::Tensor> mt = masks.get(t);
      if (mt.has_value() && mt->defined()) {
        // the kernel reads numel() entries of the mask on the GPU, as the C++ kernel checks for its own
        TORCH_CHECK(mt->sizes() == p.sizes(), "sgld_step_: mask shape mismatch at tensor ", t);
        TORCH_CHECK(mt->device() == device, "sgld_step_ (cuda): mask ", t, " is not on params[0]'s device ",
                    device);
        m = read_values(*mt).to(p.scalar_type()).contiguous();
      }
    }
    SgldCoefs c = base;
    c.tensor_index = static_cast<uint32_t>(t);
    if (p.scalar_type() == at::kFloat) {
      sgld_cuda_f32(w.data_ptr<float>(), g.data_ptr<float>(), a.data_ptr<float>(),
                    m.defined() ? m.data_ptr<float>() : nullptr, p.numel(), c, flag_ptr + t, stream);
    } else if (p.scalar_type() == at::kDouble) {
      sgld_cuda_f64(w.data_ptr<double>(), g.data_ptr<double>(), a.data_ptr<double>(),
                    m.defined() ? m.data_ptr<double>() : nullptr, p.numel(), c, flag_ptr + t, stream);
    } else {
      TORCH_CHECK(false, "sgld_step_ (cuda): params[", t, "] has dtype ", p.scalar_type(),
                  "; supported are float32 and float64");
    }
    if (!w.is_same(p)) p.copy_(w);
  }
  return flags;
}


// pypattern::sgld_chains_step_ (see sgld_cpu.cpp): one launch per chain and tensor, each with its chain's seed.
at::Tensor sgld_chains_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                                 const c10::List<c10::optional<at::Tensor>>& masks, double step_size, double nbeta,
                                 double localization, double weight_decay, double noise_scale,
                                 c10::optional<double> bounding_box, at::IntArrayRef seeds, int64_t step) {
  const auto n = static_cast<int64_t>(params.size());
  const auto C = static_cast<int64_t>(seeds.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n,
              "sgld_chains_step_: params, grads and anchors must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n,
              "sgld_chains_step_: masks must be empty or have one entry per tensor");
  TORCH_CHECK(n > 0, "sgld_chains_step_ (cuda): empty tensor list");
  c10::cuda::CUDAGuard guard(params[0].device());
  auto flags = at::zeros({C, n}, params[0].options().dtype(at::kInt));
  int* flag_ptr = flags.data_ptr<int>();
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  SgldCoefs base = make_coefs(step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, 0, step);
  const at::Device device = params[0].device();
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.is_cuda() && grads[t].is_cuda() && anchors[t].is_cuda(), "sgld_chains_step_ (cuda): tensor ", t,
                " is not on the GPU");
    TORCH_CHECK(p.device() == device && grads[t].device() == device && anchors[t].device() == device,
                "sgld_chains_step_ (cuda): tensor ", t, " is not on params[0]'s device ", device);
    TORCH_CHECK(p.dim() >= 1 && p.size(0) == C, "sgld_chains_step_: params[", t, "] must have ", C,
                " rows (one per seed), got shape ", p.sizes());
    TORCH_CHECK(grads[t].sizes() == p.sizes(), "sgld_chains_step_: grads[", t, "] shape mismatch");
    TORCH_CHECK(anchors[t].sizes() == p.sizes().slice(1), "sgld_chains_step_: anchors[", t,
                "] must have the shape of one row of params[", t, "]");
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && anchors[t].scalar_type() == p.scalar_type(),
                "sgld_chains_step_: dtype mismatch at tensor ", t);
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                "sgld_chains_step_ (cuda): params[", t, "] has dtype ", p.scalar_type(),
                "; supported are float32 and float64");
    check_writable(p, "sgld_chains_step_", "params", t);
    const int64_t row = anchors[t].numel();
    if (row == 0 || C == 0) continue;
    at::Tensor w = p.is_contiguous() ? p : p.contiguous();
    at::Tensor g = read_values(grads[t]).contiguous();
    at::Tensor a = read_values(anchors[t]).contiguous();
    at::Tensor m;
    if (masks.size() > 0) {
      c10::optional<at::Tensor> mt = masks.get(t);
      if (mt.has_value() && mt->defined()) {
        TORCH_CHECK(mt->sizes() == anchors[t].sizes(), "sgld_chains_step_: mask shape mismatch at tensor ", t);
        TORCH_CHECK(mt->device() == device, "sgld_chains_step_ (cuda): mask ", t, " is not on params[0]'s device ",
                    device);
        m = read_values(*mt).to(p.scalar_type()).contiguous();
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      SgldCoefs k = base;
      k.seed = static_cast<uint64_t>(seeds[c]);
      k.tensor_index = static_cast<uint32_t>(t);
      const int64_t off = c * row;
      if (p.scalar_type() == at::kFloat) {
        sgld_cuda_f32(w.data_ptr<float>() + off, g.data_ptr<float>() + off, a.data_ptr<float>(),
                      m.defined() ? m.data_ptr<float>() : nullptr, row, k, flag_ptr + c * n + t, stream);
      } else {
        sgld_cuda_f64(w.data_ptr<double>() + off, g.data_ptr<double>() + off, a.data_ptr<double>(),
                      m.defined() ? m.data_ptr<double>() : nullptr, row, k, flag_ptr + c * n + t, stream);
      }
    }
    if (!w.is_same(p)) p.copy_(w);
  }
  return flags;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) {
  m.impl("sgld_step_", &sgld_step_cuda);
  m.impl("sgld_chains_step_", &sgld_chains_step_cuda);
}

}  // namespace pypattern
