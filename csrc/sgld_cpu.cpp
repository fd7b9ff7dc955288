// CPU implementation of pypattern::sgld_step_: validation happens in Python (pypattern/ops/sgld.py); this
// file checks only what would make memory access unsafe, then runs the fast kernel in parallel blocks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "sgld_kernel.h"

namespace pypattern {

SgldCoefs make_coefs(double step_size, double nbeta, double localization, double weight_decay,
                     double noise_scale, const c10::optional<double>& box, int64_t seed, int64_t step) {
  SgldCoefs c{};
  c.drift_grad = 0.5 * step_size * nbeta;
  c.drift_loc = 0.5 * step_size * localization;
  c.drift_wd = 0.5 * step_size * weight_decay;
  c.noise_std = std::sqrt(step_size) * noise_scale;
  c.has_noise = c.noise_std != 0.0;
  c.has_box = box.has_value();
  c.box = box.has_value() ? *box : 0.0;
  c.seed = static_cast<uint64_t>(seed);
  c.step = static_cast<uint64_t>(step);
  return c;
}

namespace {

at::Tensor sgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                         const c10::List<c10::optional<at::Tensor>>& masks, double step_size, double nbeta,
                         double localization, double weight_decay, double noise_scale,
                         c10::optional<double> bounding_box, int64_t seed, int64_t step) {
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n,
              "sgld_step_: params, grads and anchors must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n,
              "sgld_step_: masks must be empty or have one entry per tensor");
  auto flags = at::zeros({n}, at::TensorOptions().dtype(at::kInt));
  auto* flag_ptr = flags.data_ptr<int32_t>();
  SgldCoefs base = make_coefs(step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, seed, step);
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "sgld_step_ (cpu): params[", t, "] is not a CPU tensor");
    TORCH_CHECK(grads[t].sizes() == p.sizes() && anchors[t].sizes() == p.sizes(),
                "sgld_step_: shape mismatch at tensor ", t);
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && anchors[t].scalar_type() == p.scalar_type(),
                "sgld_step_: dtype mismatch at tensor ", t);
    const int64_t numel = p.numel();
    if (numel == 0) continue;
    at::Tensor w = p.is_contiguous() ? p : p.contiguous();
    at::Tensor g = grads[t].contiguous();
    at::Tensor a = anchors[t].contiguous();
    at::Tensor m;
    if (masks.size() > 0) {
      c10::optional<at::Tensor> mt = masks.get(t);
      if (mt.has_value() && mt->defined()) {
        TORCH_CHECK(mt->sizes() == p.sizes(), "sgld_step_: mask shape mismatch at tensor ", t);
        m = mt->to(p.scalar_type()).contiguous();
      }
    }
    SgldCoefs c = base;
    c.tensor_index = static_cast<uint32_t>(t);
    std::atomic<int> bad{0};
    const int64_t nblocks = (numel + kSgldBlock - 1) / kSgldBlock;
    // 256k elements per task: smaller tensors run on one thread (an OpenMP fork per small tensor costs more
    // than it saves, and collapses when the other core is busy)
    const int64_t grain = 1024;
    if (p.scalar_type() == at::kFloat) {
      float* wp = w.data_ptr<float>();
      const float* gp = g.data_ptr<float>();
      const float* ap = a.data_ptr<float>();
      const float* mp = m.defined() ? m.data_ptr<float>() : nullptr;
      at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
        if (sgld_cpu_range_f32(wp, gp, ap, mp, b0 * kSgldBlock, std::min(numel, b1 * kSgldBlock), c)) bad.store(1);
      });
    } else if (p.scalar_type() == at::kDouble) {
      double* wp = w.data_ptr<double>();
      const double* gp = g.data_ptr<double>();
      const double* ap = a.data_ptr<double>();
      const double* mp = m.defined() ? m.data_ptr<double>() : nullptr;
      at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
        if (sgld_cpu_range_f64(wp, gp, ap, mp, b0 * kSgldBlock, std::min(numel, b1 * kSgldBlock), c)) bad.store(1);
      });
    } else {
      TORCH_CHECK(false, "sgld_step_ (cpu): params[", t, "] has dtype ", p.scalar_type(),
                  "; supported are float32 and float64");
    }
    if (!w.is_same(p)) p.copy_(w);
    flag_ptr[t] = bad.load();
  }
  return flags;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("sgld_step_", &sgld_step_cpu); }

}  // namespace pypattern
