// Fused SGLD step: schema (a TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernel of pypattern::sgld_step_.
// Validation happens in Python (pypattern/ops/sgld/); this file checks only what would make memory access unsafe,
// then runs the raw kernel of sgld_cpu_fast.cpp in parallel blocks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include <cmath>

#include "math_bits.h"
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

  // Gather every tensor's contiguous buffers, then run all tensors' blocks in ONE parallel loop: many small
  // tensors (a model's weights and biases) then share the threads with a single fork, and a step over a small
  // model stays on the calling thread.
  struct Work {
    at::Tensor w, g, a, m;
    int64_t numel, first_block;
    int64_t index;
  };
  std::vector<Work> work;
  work.reserve(n);
  int64_t total_blocks = 0;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "sgld_step_ (cpu): params[", t, "] is not a CPU tensor");
    TORCH_CHECK(grads[t].sizes() == p.sizes() && anchors[t].sizes() == p.sizes(),
                "sgld_step_: shape mismatch at tensor ", t);
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && anchors[t].scalar_type() == p.scalar_type(),
                "sgld_step_: dtype mismatch at tensor ", t);
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, "sgld_step_ (cpu): params[", t,
                "] has dtype ", p.scalar_type(), "; supported are float32 and float64");
    check_writable(p, "sgld_step_", "params", t);
    const int64_t numel = p.numel();
    if (numel == 0) continue;
    Work wk;
    wk.w = p.is_contiguous() ? p : p.contiguous();
    wk.g = read_values(grads[t]).contiguous();
    wk.a = read_values(anchors[t]).contiguous();
    if (masks.size() > 0) {
      c10::optional<at::Tensor> mt = masks.get(t);
      if (mt.has_value() && mt->defined()) {
        TORCH_CHECK(mt->sizes() == p.sizes(), "sgld_step_: mask shape mismatch at tensor ", t);
        wk.m = read_values(*mt).to(p.scalar_type()).contiguous();
      }
    }
    wk.numel = numel;
    wk.first_block = total_blocks;
    wk.index = t;
    total_blocks += (numel + kSgldBlock - 1) / kSgldBlock;
    work.push_back(std::move(wk));
  }
  std::vector<std::atomic<int>> bad(work.size());
  for (auto& b : bad) b.store(0);
  // 32k elements per task at least
  at::parallel_for(0, total_blocks, 32768 / kSgldBlock, [&](int64_t b0, int64_t b1) {
    // the first tensor whose blocks reach past b0
    size_t i = std::upper_bound(work.begin(), work.end(), b0,
                                [](int64_t b, const Work& wk) { return b < wk.first_block; }) -
               work.begin() - 1;
    for (; i < work.size() && work[i].first_block < b1; ++i) {
      const Work& wk = work[i];
      const int64_t lo = std::max<int64_t>(b0 - wk.first_block, 0) * kSgldBlock;
      const int64_t hi = std::min(wk.numel, (b1 - wk.first_block) * kSgldBlock);
      if (lo >= hi) continue;
      SgldCoefs c = base;
      c.tensor_index = static_cast<uint32_t>(wk.index);
      int r;
      if (wk.w.scalar_type() == at::kFloat) {
        r = sgld_cpu_range_f32(wk.w.data_ptr<float>(), wk.g.data_ptr<float>(), wk.a.data_ptr<float>(),
                               wk.m.defined() ? wk.m.data_ptr<float>() : nullptr, lo, hi, c);
      } else {
        r = sgld_cpu_range_f64(wk.w.data_ptr<double>(), wk.g.data_ptr<double>(), wk.a.data_ptr<double>(),
                               wk.m.defined() ? wk.m.data_ptr<double>() : nullptr, lo, hi, c);
      }
      if (r) bad[i].fetch_or(r);
    }
  });
  for (size_t i = 0; i < work.size(); ++i) {
    const at::Tensor& p = params[work[i].index];
    if (!work[i].w.is_same(p)) p.copy_(work[i].w);
    flag_ptr[work[i].index] = bad[i].load();
  }
  return flags;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  // Returns one int32 per tensor, its flags (sgld_kernel.h): 1 when its gradient held a NaN or Inf, 2 when a
  // finite gradient gave a non-finite update, 3 both, else 0; the entries flagged were left as they were.
  m.def(
      "sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] anchors, Tensor?[] masks, float step_size, "
      "float nbeta, float localization, float weight_decay, float noise_scale, float? bounding_box, int seed, "
      "int step) -> Tensor");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("sgld_step_", &sgld_step_cpu); }

// the lazy negation and conjugation bits reach the kernels, which resolve what they read (math_bits.h)
PYPATTERN_MATH_BITS_FALLTHROUGH("sgld_step_")

}  // namespace pypattern
