// CUDA registration of pypattern::sgnht_step_ and pypattern::rmsprop_sgld_step_ (compiled only in CUDA builds;
// see setup.py). SGNHT phase two (the thermostat from the kernels' partial sums) runs as torch ops on the same
// stream, so a step never waits for the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "math_bits.h"
#include "samplers/samplers_cuda.h"

namespace pypattern {
namespace {

struct Prepared {
  at::Tensor w, s, g, a, m;
};

Prepared prepare(const char* op, const char* state_name, int64_t t, const at::Tensor& p, const at::Tensor& s,
                 const at::Tensor& g,
                 const at::Tensor& a, const c10::List<c10::optional<at::Tensor>>& masks, const at::Device& device) {
  TORCH_CHECK(p.is_cuda() && s.is_cuda() && g.is_cuda() && a.is_cuda(), op, " (cuda): tensor ", t,
              " is not on the GPU");
  // the kernels run on the device of the guard (params[0]'s): a pointer into another GPU's memory is an illegal
  // address there (a tensor moved after the first step of a chain, whose later steps skip the Python checks)
  TORCH_CHECK(p.device() == device && s.device() == device && g.device() == device && a.device() == device, op,
              " (cuda): tensor ", t, " is not on params[0]'s device ", device);
  TORCH_CHECK(g.sizes() == p.sizes() && a.sizes() == p.sizes() && s.sizes() == p.sizes(), op,
              ": shape mismatch at tensor ", t);
  TORCH_CHECK(g.scalar_type() == p.scalar_type() && a.scalar_type() == p.scalar_type() &&
                  s.scalar_type() == p.scalar_type(),
              op, ": dtype mismatch at tensor ", t);
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, op, " (cuda): params[", t,
              "] has dtype ", p.scalar_type(), "; supported are float32 and float64");
  check_writable(p, op, "params", t);
  check_writable(s, op, state_name, t);
  Prepared r;
  r.w = p.is_contiguous() ? p : p.contiguous();
  r.s = s.is_contiguous() ? s : s.contiguous();
  r.g = read_values(g).contiguous();
  r.a = read_values(a).contiguous();
  if (masks.size() > 0) {
    c10::optional<at::Tensor> mt = masks.get(t);
    if (mt.has_value() && mt->defined()) {
      // the kernels read numel() entries of the mask on the GPU, as the C++ kernels check for their own
      TORCH_CHECK(mt->sizes() == p.sizes(), op, ": mask shape mismatch at tensor ", t);
      TORCH_CHECK(mt->device() == device, op, " (cuda): mask ", t, " is not on params[0]'s device ", device);
      r.m = read_values(*mt).to(p.scalar_type()).contiguous();
    }
  }
  return r;
}

void finish(const Prepared& r, const at::Tensor& p, const at::Tensor& s) {
  if (!r.w.is_same(p)) p.copy_(r.w);
  if (!r.s.is_same(s)) s.copy_(r.s);
}

at::Tensor sgnht_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                           at::TensorList momenta, at::Tensor thermostat,
                           const c10::List<c10::optional<at::Tensor>>& masks, double step_size, double nbeta,
                           double localization, double weight_decay, double diffusion_factor, double noise_scale,
                           c10::optional<double> bounding_box, int64_t seed, int64_t step) {
  const char* op = "sgnht_step_";
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n &&
                  static_cast<int64_t>(momenta.size()) == n,
              op, ": params, grads, anchors and momenta must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n, op,
              ": masks must be empty or have one entry per tensor");
  TORCH_CHECK(n > 0, op, " (cuda): empty tensor list");
  TORCH_CHECK(thermostat.is_cuda() && thermostat.scalar_type() == at::kDouble && thermostat.numel() == 1, op,
              " (cuda): thermostat must be a float64 GPU tensor with one element");
  check_writable(thermostat, op, "thermostat");
  const at::Device device = params[0].device();
  TORCH_CHECK(thermostat.device() == device, op, " (cuda): thermostat is on ", thermostat.device(),
              ", params[0] on ", device);
  c10::cuda::CUDAGuard guard(device);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  auto flags = at::zeros({n}, params[0].options().dtype(at::kInt));
  int* flag_ptr = flags.data_ptr<int>();
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) total += sgnht_cuda_blocks(params[t].numel());
  auto partials = at::zeros({total > 0 ? total : 1, 2}, params[0].options().dtype(at::kDouble));
  const at::Tensor xi_start = thermostat.reshape({1}).clone();
  SgnhtCoefs base{};
  base.step_size = step_size;
  base.nbeta = nbeta;
  base.localization = localization;
  base.weight_decay = weight_decay;
  base.noise_std = std::sqrt(2.0 * diffusion_factor * step_size) * noise_scale;
  base.has_noise = base.noise_std != 0.0;
  base.has_box = bounding_box.has_value();
  base.box = bounding_box.has_value() ? *bounding_box : 0.0;
  base.seed = static_cast<uint64_t>(seed);
  base.step = static_cast<uint64_t>(step);
  int64_t at_block = 0;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    if (p.numel() == 0) continue;
    Prepared r = prepare(op, "momenta", t, p, momenta[t], grads[t], anchors[t], masks, device);
    SgnhtCoefs c = base;
    c.tensor_index = static_cast<uint32_t>(t);
    double* part = partials.data_ptr<double>() + 2 * at_block;
    const double* xi = xi_start.data_ptr<double>();
    if (p.scalar_type() == at::kFloat) {
      sgnht_cuda_f32(r.w.data_ptr<float>(), r.s.data_ptr<float>(), r.g.data_ptr<float>(), r.a.data_ptr<float>(),
                     r.m.defined() ? r.m.data_ptr<float>() : nullptr, p.numel(), c, xi, part, flag_ptr + t, stream);
    } else {
      sgnht_cuda_f64(r.w.data_ptr<double>(), r.s.data_ptr<double>(), r.g.data_ptr<double>(),
                     r.a.data_ptr<double>(), r.m.defined() ? r.m.data_ptr<double>() : nullptr, p.numel(), c, xi,
                     part, flag_ptr + t, stream);
    }
    at_block += sgnht_cuda_blocks(p.numel());
    finish(r, p, momenta[t]);
  }
  // Phase two: xi += sum(p^2) / count - eps * noise_scale^2 where count > 0.
  const at::Tensor sums = partials.sum(0);
  const at::Tensor kin = sums.select(0, 0), cnt = sums.select(0, 1);
  const double target = step_size * noise_scale * noise_scale;
  const at::Tensor delta = kin.div(cnt.clamp_min(1.0)).sub(target).mul(cnt.gt(0));
  thermostat.add_(delta.reshape(thermostat.sizes()));
  return flags;
}

at::Tensor rmsprop_sgld_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                                  at::TensorList square_avgs, const c10::List<c10::optional<at::Tensor>>& masks,
                                  double step_size, double nbeta, double localization, double weight_decay,
                                  double alpha, double eps, double noise_scale, c10::optional<double> bounding_box,
                                  int64_t seed, int64_t step) {
  const char* op = "rmsprop_sgld_step_";
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n &&
                  static_cast<int64_t>(square_avgs.size()) == n,
              op, ": params, grads, anchors and square_avgs must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n, op,
              ": masks must be empty or have one entry per tensor");
  TORCH_CHECK(n > 0, op, " (cuda): empty tensor list");
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  auto flags = at::zeros({n}, params[0].options().dtype(at::kInt));
  int* flag_ptr = flags.data_ptr<int>();
  RmspropCoefs base{};
  base.half_step = 0.5 * step_size;
  base.nbeta = nbeta;
  base.localization = localization;
  base.weight_decay = weight_decay;
  base.alpha = alpha;
  base.rms_eps = eps;
  base.noise_std = std::sqrt(step_size) * noise_scale;
  base.has_noise = base.noise_std != 0.0;
  base.has_box = bounding_box.has_value();
  base.box = bounding_box.has_value() ? *bounding_box : 0.0;
  base.seed = static_cast<uint64_t>(seed);
  base.step = static_cast<uint64_t>(step);
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    if (p.numel() == 0) continue;
    Prepared r = prepare(op, "square_avgs", t, p, square_avgs[t], grads[t], anchors[t], masks, device);
    RmspropCoefs c = base;
    c.tensor_index = static_cast<uint32_t>(t);
    if (p.scalar_type() == at::kFloat) {
      rmsprop_sgld_cuda_f32(r.w.data_ptr<float>(), r.s.data_ptr<float>(), r.g.data_ptr<float>(),
                            r.a.data_ptr<float>(), r.m.defined() ? r.m.data_ptr<float>() : nullptr, p.numel(), c,
                            flag_ptr + t, stream);
    } else {
      rmsprop_sgld_cuda_f64(r.w.data_ptr<double>(), r.s.data_ptr<double>(), r.g.data_ptr<double>(),
                            r.a.data_ptr<double>(), r.m.defined() ? r.m.data_ptr<double>() : nullptr, p.numel(),
                            c, flag_ptr + t, stream);
    }
    finish(r, p, square_avgs[t]);
  }
  return flags;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) {
  m.impl("sgnht_step_", &sgnht_step_cuda);
  m.impl("rmsprop_sgld_step_", &rmsprop_sgld_step_cuda);
}

}  // namespace pypattern
