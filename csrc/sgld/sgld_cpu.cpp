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


// pypattern::sgld_chains_step_: C chains at once. params[t] and grads[t] are (C, *shape_t), chain c's tensor t is
// row c; anchors[t] and masks[t] (shape_t) are shared by every chain. Row c of tensor t gets exactly the update
// that sgld_step_ gives tensor t of chain c's list with seed seeds[c] (same Philox key and counters), so a chain
// stepped here is the chain stepped alone. Returns (C, n) int32 flags.
at::Tensor sgld_chains_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList anchors,
                                const c10::List<c10::optional<at::Tensor>>& masks, double step_size, double nbeta,
                                double localization, double weight_decay, double noise_scale,
                                c10::optional<double> bounding_box, at::IntArrayRef seeds, int64_t step) {
  const auto n = static_cast<int64_t>(params.size());
  const auto C = static_cast<int64_t>(seeds.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(anchors.size()) == n,
              "sgld_chains_step_: params, grads and anchors must have the same length");
  TORCH_CHECK(masks.size() == 0 || static_cast<int64_t>(masks.size()) == n,
              "sgld_chains_step_: masks must be empty or have one entry per tensor");
  auto flags = at::zeros({C, n}, at::TensorOptions().dtype(at::kInt));
  auto* flag_ptr = flags.data_ptr<int32_t>();
  SgldCoefs base = make_coefs(step_size, nbeta, localization, weight_decay, noise_scale, bounding_box, 0, step);

  struct Work {
    at::Tensor w, g, a, m;
    int64_t numel;  // of one chain's row
    int64_t index;
  };
  std::vector<Work> work;
  work.reserve(n);
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "sgld_chains_step_ (cpu): params[", t, "] is not a CPU tensor");
    TORCH_CHECK(p.dim() >= 1 && p.size(0) == C, "sgld_chains_step_: params[", t, "] must have ", C,
                " rows (one per seed), got shape ", p.sizes());
    TORCH_CHECK(grads[t].sizes() == p.sizes(), "sgld_chains_step_: grads[", t, "] shape mismatch");
    TORCH_CHECK(anchors[t].sizes() == p.sizes().slice(1), "sgld_chains_step_: anchors[", t,
                "] must have the shape of one row of params[", t, "]");
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && anchors[t].scalar_type() == p.scalar_type(),
                "sgld_chains_step_: dtype mismatch at tensor ", t);
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, "sgld_chains_step_ (cpu): params[",
                t, "] has dtype ", p.scalar_type(), "; supported are float32 and float64");
    TORCH_CHECK(grads[t].device().is_cpu() && anchors[t].device().is_cpu(), "sgld_chains_step_ (cpu): tensor ", t,
                " is not on the CPU");
    check_writable(p, "sgld_chains_step_", "params", t);
    const int64_t row = anchors[t].numel();
    if (row == 0 || C == 0) continue;
    Work wk;
    wk.w = p.is_contiguous() ? p : p.contiguous();
    wk.g = read_values(grads[t]).contiguous();
    wk.a = read_values(anchors[t]).contiguous();
    if (masks.size() > 0) {
      c10::optional<at::Tensor> mt = masks.get(t);
      if (mt.has_value() && mt->defined()) {
        TORCH_CHECK(mt->sizes() == anchors[t].sizes(), "sgld_chains_step_: mask shape mismatch at tensor ", t);
        TORCH_CHECK(mt->device().is_cpu(), "sgld_chains_step_ (cpu): mask ", t, " is not on the CPU");
        wk.m = read_values(*mt).to(p.scalar_type()).contiguous();
      }
    }
    wk.numel = row;
    wk.index = t;
    work.push_back(std::move(wk));
  }
  // blocks of (tensor, chain) rows, all in one parallel loop, as sgld_step_ runs a list's tensors
  struct Row {
    int64_t work, chain, first_block;
  };
  std::vector<Row> rows;
  rows.reserve(work.size() * static_cast<size_t>(C));
  int64_t total_blocks = 0;
  for (size_t i = 0; i < work.size(); ++i) {
    for (int64_t c = 0; c < C; ++c) {
      rows.push_back({static_cast<int64_t>(i), c, total_blocks});
      total_blocks += (work[i].numel + kSgldBlock - 1) / kSgldBlock;
    }
  }
  std::vector<std::atomic<int>> bad(rows.size());
  for (auto& b : bad) b.store(0);
  at::parallel_for(0, total_blocks, 32768 / kSgldBlock, [&](int64_t b0, int64_t b1) {
    size_t r = std::upper_bound(rows.begin(), rows.end(), b0,
                                [](int64_t b, const Row& x) { return b < x.first_block; }) -
               rows.begin() - 1;
    for (; r < rows.size() && rows[r].first_block < b1; ++r) {
      const Work& wk = work[rows[r].work];
      const int64_t c = rows[r].chain;
      const int64_t lo = std::max<int64_t>(b0 - rows[r].first_block, 0) * kSgldBlock;
      const int64_t hi = std::min(wk.numel, (b1 - rows[r].first_block) * kSgldBlock);
      if (lo >= hi) continue;
      SgldCoefs k = base;
      k.seed = static_cast<uint64_t>(seeds[c]);
      k.tensor_index = static_cast<uint32_t>(wk.index);
      const int64_t off = c * wk.numel;
      int res;
      if (wk.w.scalar_type() == at::kFloat) {
        res = sgld_cpu_range_f32(wk.w.data_ptr<float>() + off, wk.g.data_ptr<float>() + off, wk.a.data_ptr<float>(),
                                 wk.m.defined() ? wk.m.data_ptr<float>() : nullptr, lo, hi, k);
      } else {
        res = sgld_cpu_range_f64(wk.w.data_ptr<double>() + off, wk.g.data_ptr<double>() + off,
                                 wk.a.data_ptr<double>(), wk.m.defined() ? wk.m.data_ptr<double>() : nullptr, lo,
                                 hi, k);
      }
      if (res) bad[r].fetch_or(res);
    }
  });
  for (size_t r = 0; r < rows.size(); ++r) {
    const Work& wk = work[rows[r].work];
    flag_ptr[rows[r].chain * n + wk.index] |= bad[r].load();
  }
  for (const Work& wk : work) {
    const at::Tensor& p = params[wk.index];
    if (!wk.w.is_same(p)) p.copy_(wk.w);
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
  // C chains at once: params[t], grads[t] (C, *shape_t), anchors[t], masks[t] (shape_t); chain c's noise is
  // sgld_step_'s with seed seeds[c]. Returns (C, len(params)) int32 flags.
  m.def(
      "sgld_chains_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] anchors, Tensor?[] masks, float step_size, "
      "float nbeta, float localization, float weight_decay, float noise_scale, float? bounding_box, int[] seeds, "
      "int step) -> Tensor");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) {
  m.impl("sgld_step_", &sgld_step_cpu);
  m.impl("sgld_chains_step_", &sgld_chains_step_cpu);
}

// the lazy negation and conjugation bits reach the kernels, which resolve what they read (math_bits.h)
PYPATTERN_MATH_BITS_FALLTHROUGH("sgld_step_")
PYPATTERN_MATH_BITS_FALLTHROUGH("sgld_chains_step_")

}  // namespace pypattern
