// Fused SGNHT and RMSprop-SGLD steps: schemas (TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernels of
// pypattern::sgnht_step_ and pypattern::rmsprop_sgld_step_. Validation happens in Python (pypattern/ops/sgnht/,
// pypattern/ops/rmsprop_sgld/); this file checks only what would make memory access unsafe. All tensors' blocks
// run in one parallel loop of blocks of 1024 (the vectorised kernels of samplers_cpu_fast.cpp); the SGNHT thermostat's sum of p^2 is accumulated per block in float64 and added up
// in block order after the loop (phase two), so it does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "math_bits.h"
#include "samplers/samplers_cpu.h"

namespace pypattern {
namespace {

constexpr int64_t kBlock = 1024;  // elements per block (a multiple of the fast kernels' 128)

struct Work {
  at::Tensor w, s, g, a, m;  // s: the state (momentum or V)
  int64_t numel, first_block, index;
};

std::vector<Work> gather(const char* op, at::TensorList params, at::TensorList grads, at::TensorList anchors,
                         at::TensorList states, const char* state_name,
                         const c10::List<c10::optional<at::Tensor>>& masks, int64_t* total_blocks) {
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n &&
                  static_cast<int64_t>(states.size()) == n,
              op, ": params, grads, anchors and the state tensors must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n, op,
              ": masks must be empty or have one entry per tensor");
  std::vector<Work> work;
  work.reserve(n);
  *total_blocks = 0;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), op, " (cpu): params[", t, "] is not a CPU tensor");
    for (const at::Tensor* x : {&grads[t], &anchors[t], &states[t]}) {
      TORCH_CHECK(x->sizes() == p.sizes(), op, ": shape mismatch at tensor ", t);
      TORCH_CHECK(x->scalar_type() == p.scalar_type(), op, ": dtype mismatch at tensor ", t);
      TORCH_CHECK(x->device().is_cpu(), op, " (cpu): tensor ", t, " is not a CPU tensor");
    }
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, op, " (cpu): params[", t,
                "] has dtype ", p.scalar_type(), "; supported are float32 and float64");
    check_writable(p, op, "params", t);
    check_writable(states[t], op, state_name, t);
    if (p.numel() == 0) continue;
    Work wk;
    wk.w = p.is_contiguous() ? p : p.contiguous();
    wk.s = states[t].is_contiguous() ? states[t] : states[t].contiguous();
    wk.g = read_values(grads[t]).contiguous();
    wk.a = read_values(anchors[t]).contiguous();
    if (masks.size() > 0) {
      c10::optional<at::Tensor> mt = masks.get(t);
      if (mt.has_value() && mt->defined()) {
        TORCH_CHECK(mt->sizes() == p.sizes(), op, ": mask shape mismatch at tensor ", t);
        wk.m = read_values(*mt).to(p.scalar_type()).contiguous();
      }
    }
    wk.numel = p.numel();
    wk.first_block = *total_blocks;
    wk.index = t;
    *total_blocks += (wk.numel + kBlock - 1) / kBlock;
    work.push_back(std::move(wk));
  }
  return work;
}

void write_back(const std::vector<Work>& work, at::TensorList params, at::TensorList states) {
  for (const Work& wk : work) {
    if (!wk.w.is_same(params[wk.index])) params[wk.index].copy_(wk.w);
    if (!wk.s.is_same(states[wk.index])) states[wk.index].copy_(wk.s);
  }
}

// Runs fn(work item, lo, hi, block) over every block of every tensor, blocks spread over the threads.
template <typename Fn>
void for_blocks(const std::vector<Work>& work, int64_t total_blocks, const Fn& fn) {
  at::parallel_for(0, total_blocks, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const size_t i = std::upper_bound(work.begin(), work.end(), b,
                                        [](int64_t x, const Work& wk) { return x < wk.first_block; }) -
                       work.begin() - 1;
      const Work& wk = work[i];
      const int64_t lo = (b - wk.first_block) * kBlock;
      const int64_t hi = std::min(wk.numel, lo + kBlock);
      fn(wk, lo, hi, b);
    }
  });
}

at::Tensor sgnht_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                          at::TensorList momenta, at::Tensor thermostat,
                          const c10::List<c10::optional<at::Tensor>>& masks, double step_size, double nbeta,
                          double localization, double weight_decay, double diffusion_factor, double noise_scale,
                          c10::optional<double> bounding_box, int64_t seed, int64_t step) {
  const char* op = "sgnht_step_";
  TORCH_CHECK(thermostat.device().is_cpu() && thermostat.scalar_type() == at::kDouble && thermostat.numel() == 1,
              op, " (cpu): thermostat must be a CPU float64 tensor with one element");
  check_writable(thermostat, op, "thermostat");
  int64_t total_blocks = 0;
  std::vector<Work> work = gather(op, params, grads, anchors, momenta, "momenta", masks, &total_blocks);
  auto flags = at::zeros({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kInt));
  double* xi_ptr = thermostat.data_ptr<double>();
  SgnhtCoefs base{};
  base.xi = *xi_ptr;
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
  std::vector<double> kinetic(total_blocks, 0.0);
  std::vector<int64_t> count(total_blocks, 0);
  std::vector<int> bad(total_blocks, 0);
  for_blocks(work, total_blocks, [&](const Work& wk, int64_t lo, int64_t hi, int64_t b) {
    SgnhtCoefs c = base;
    c.tensor_index = static_cast<uint32_t>(wk.index);
    const bool masked = wk.m.defined();
    if (wk.w.scalar_type() == at::kFloat)
      bad[b] = sgnht_cpu_range_f32(wk.w.data_ptr<float>(), wk.s.data_ptr<float>(), wk.g.data_ptr<float>(),
                                   wk.a.data_ptr<float>(), masked ? wk.m.data_ptr<float>() : nullptr, lo, hi, c,
                                   &kinetic[b], &count[b]);
    else
      bad[b] = sgnht_cpu_range_f64(wk.w.data_ptr<double>(), wk.s.data_ptr<double>(), wk.g.data_ptr<double>(),
                                   wk.a.data_ptr<double>(), masked ? wk.m.data_ptr<double>() : nullptr, lo, hi, c,
                                   &kinetic[b], &count[b]);
  });
  write_back(work, params, momenta);
  // Phase two: the thermostat from the sum of p^2 over the active entries, added up in block order.
  double sum = 0.0;
  int64_t n_active = 0;
  int32_t* flag_ptr = flags.data_ptr<int32_t>();
  for (const Work& wk : work) {
    const int64_t nb = (wk.numel + kBlock - 1) / kBlock;
    for (int64_t b = wk.first_block; b < wk.first_block + nb; ++b) {
      sum += kinetic[b];
      n_active += count[b];
      flag_ptr[wk.index] |= bad[b];
    }
  }
  if (n_active > 0) *xi_ptr += sum / static_cast<double>(n_active) - step_size * noise_scale * noise_scale;
  return flags;
}

at::Tensor rmsprop_sgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                                 at::TensorList square_avgs, const c10::List<c10::optional<at::Tensor>>& masks,
                                 double step_size, double nbeta, double localization, double weight_decay,
                                 double alpha, double eps, double noise_scale, c10::optional<double> bounding_box,
                                 int64_t seed, int64_t step) {
  const char* op = "rmsprop_sgld_step_";
  int64_t total_blocks = 0;
  std::vector<Work> work = gather(op, params, grads, anchors, square_avgs, "square_avgs", masks, &total_blocks);
  auto flags = at::zeros({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kInt));
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
  std::vector<int> bad(total_blocks, 0);
  for_blocks(work, total_blocks, [&](const Work& wk, int64_t lo, int64_t hi, int64_t b) {
    RmspropCoefs c = base;
    c.tensor_index = static_cast<uint32_t>(wk.index);
    const bool masked = wk.m.defined();
    if (wk.w.scalar_type() == at::kFloat)
      bad[b] = rmsprop_sgld_cpu_range_f32(wk.w.data_ptr<float>(), wk.s.data_ptr<float>(), wk.g.data_ptr<float>(),
                                          wk.a.data_ptr<float>(), masked ? wk.m.data_ptr<float>() : nullptr, lo, hi,
                                          c);
    else
      bad[b] = rmsprop_sgld_cpu_range_f64(wk.w.data_ptr<double>(), wk.s.data_ptr<double>(),
                                          wk.g.data_ptr<double>(), wk.a.data_ptr<double>(),
                                          masked ? wk.m.data_ptr<double>() : nullptr, lo, hi, c);
  });
  write_back(work, params, square_avgs);
  int32_t* flag_ptr = flags.data_ptr<int32_t>();
  for (const Work& wk : work) {
    const int64_t nb = (wk.numel + kBlock - 1) / kBlock;
    for (int64_t b = wk.first_block; b < wk.first_block + nb; ++b)
      flag_ptr[wk.index] |= bad[b];
  }
  return flags;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  // Both return one int32 per tensor, its flags (sgld/sgld_kernel.h): 1 when its gradient held a NaN or Inf, 2
  // when a finite gradient gave a non-finite update (weight or state), 3 both, else 0; the entries flagged were
  // left as they were, their state too.
  m.def(
      "sgnht_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] anchors, Tensor(b!)[] momenta, "
      "Tensor(c!) thermostat, Tensor?[] masks, float step_size, float nbeta, float localization, "
      "float weight_decay, float diffusion_factor, float noise_scale, float? bounding_box, int seed, int step) "
      "-> Tensor");
  m.def(
      "rmsprop_sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] anchors, Tensor(b!)[] square_avgs, "
      "Tensor?[] masks, float step_size, float nbeta, float localization, float weight_decay, float alpha, "
      "float eps, float noise_scale, float? bounding_box, int seed, int step) -> Tensor");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) {
  m.impl("sgnht_step_", &sgnht_step_cpu);
  m.impl("rmsprop_sgld_step_", &rmsprop_sgld_step_cpu);
}

// the lazy negation and conjugation bits reach the kernels, which resolve what they read (math_bits.h)
PYPATTERN_MATH_BITS_FALLTHROUGH("sgnht_step_")
PYPATTERN_MATH_BITS_FALLTHROUGH("rmsprop_sgld_step_")

}  // namespace pypattern
