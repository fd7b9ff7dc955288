// Streaming cross-covariance: schema (a TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernel of
// pypattern::covariance_update_. The maths and the state are documented in pypattern/ops/covariance/.
//
// The chunk is processed in row panels of kPanel draws, each a complete Chan update. One pass over the panel
// casts it to float64 (any dtype and strides), subtracts the shift and the running mean, and gathers the column
// sums and sums of squares; one extra row carries the rank-one Chan correction, so that a single BLAS dgemm
// (at::addmm_, MKL) updates the co-moment. Workspace: (kPanel + 1) * (K + N) doubles, whatever the chunk size.
// No -ffast-math here: the order of float64 operations is what keeps the large-mean case exact.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "math_bits.h"

namespace pypattern {
namespace {

constexpr int64_t kPanel = 512;

struct Strided {
  const void* data;
  int64_t s0, s1;
  bool is_double;
};

template <typename T>
void col_sums_impl(const T* x, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                   const double* shift, double* out) {
  for (int64_t c = c0; c < c1; ++c) out[c] = 0.0;
  if (s1 == 1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * s0;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) out[c] += static_cast<double>(row[c]) - shift[c];
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * s0;
      for (int64_t c = c0; c < c1; ++c) out[c] += static_cast<double>(row[c * s1]) - shift[c];
    }
  }
}

// out[c] = sum_{r in [r0, r1)} (x[r, c] - shift[c])
void col_sums(const Strided& x, int64_t r0, int64_t r1, int64_t cols, const double* shift, double* out) {
  const int64_t grain = std::max<int64_t>(64, 65536 / std::max<int64_t>(1, r1 - r0));
  at::parallel_for(0, cols, grain, [&](int64_t c0, int64_t c1) {
    if (x.is_double)
      col_sums_impl(static_cast<const double*>(x.data), x.s0, x.s1, r0, r1, c0, c1, shift, out);
    else
      col_sums_impl(static_cast<const float*>(x.data), x.s0, x.s1, r0, r1, c0, c1, shift, out);
  });
}

template <typename T>
void centre_impl(const T* x, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t cols,
                 const double* shift, const double* mean, double* out, double* sums, double* sqs) {
  for (int64_t c = c0; c < c1; ++c) sums[c] = 0.0, sqs[c] = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * s0;
    double* o = out + (r - r0) * cols;
    if (s1 == 1) {
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const double v = (static_cast<double>(row[c]) - shift[c]) - mean[c];
        o[c] = v;
        sums[c] += v;
        sqs[c] += v * v;
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) {
        const double v = (static_cast<double>(row[c * s1]) - shift[c]) - mean[c];
        o[c] = v;
        sums[c] += v;
        sqs[c] += v * v;
      }
    }
  }
}

// One pass: out[(r - r0), c] = (x[r, c] - shift[c]) - mean[c] (mean: the running mean), with the column sums
// and sums of squares of these values.
void centre(const Strided& x, int64_t r0, int64_t r1, int64_t cols, const double* shift, const double* mean,
            double* out, double* sums, double* sqs) {
  const int64_t grain = std::max<int64_t>(64, 65536 / std::max<int64_t>(1, r1 - r0));
  at::parallel_for(0, cols, grain, [&](int64_t c0, int64_t c1) {
    if (x.is_double)
      centre_impl(static_cast<const double*>(x.data), x.s0, x.s1, r0, r1, c0, c1, cols, shift, mean, out, sums, sqs);
    else
      centre_impl(static_cast<const float*>(x.data), x.s0, x.s1, r0, r1, c0, c1, cols, shift, mean, out, sums, sqs);
  });
}

Strided strided(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "covariance_update_: chunks must be float32 or float64, got ", x.scalar_type());
  return Strided{x.data_ptr(), x.stride(0), x.stride(1), x.scalar_type() == at::kDouble};
}

void check_state(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous(), "covariance_update_: ",
              name, " must be a contiguous float64 CPU tensor");
}

// The columns whose running mean came out inf or NaN: a draw of the column held inf or NaN (now or in an earlier
// chunk). Their centred draws hold inf - inf, so, as in the specification (pypattern/ops/covariance/
// reference.py), every co-moment entry of such a column is NaN, and its mean is old + (m / n) (chunk mean - old)
// over the whole chunk at once. The panel updates above centre with the running mean and add Chan's correction as
// a separate rank-one term, which gives +-inf instead of NaN where the signs happen to agree, and a NaN mean where
// an inf in one panel meets the next panel. O(K + N) when every mean is finite.
void not_finite_columns(const Strided& x, int64_t m, int64_t cols, int64_t other, int64_t count,
                        const double* shift, const double* old, double* mean, const at::Tensor& comoment,
                        const at::Tensor& m2, int mode, bool rows) {
  double* C = comoment.data_ptr<double>();
  double* q = mode == 0 ? nullptr : m2.data_ptr<double>();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double f = static_cast<double>(m) / (static_cast<double>(count) + static_cast<double>(m));
  for (int64_t c = 0; c < cols; ++c) {
    if (std::isfinite(mean[c])) continue;
    double s = 0.0;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t at = r * x.s0 + c * x.s1;
      const double v = x.is_double ? static_cast<const double*>(x.data)[at]
                                   : static_cast<double>(static_cast<const float*>(x.data)[at]);
      s += v - shift[c];
    }
    mean[c] = old[c] + f * (s / static_cast<double>(m) - old[c]);
    if (rows)
      for (int64_t j = 0; j < other; ++j) C[c * other + j] = nan;
    else
      for (int64_t i = 0; i < other; ++i) C[i * cols + c] = nan;
    if (mode == 1) {
      q[c] = nan;
    } else if (mode == 2) {
      for (int64_t j = 0; j < cols; ++j) q[c * cols + j] = nan, q[j * cols + c] = nan;
    }
  }
}

void covariance_update_cpu(const at::Tensor& shift_a, const at::Tensor& shift_b, const at::Tensor& mean_a,
                           const at::Tensor& mean_b, const at::Tensor& comoment, const at::Tensor& m2_a,
                           const at::Tensor& m2_b, const at::Tensor& a_in, const at::Tensor& b_in, int64_t count) {
  const char* names[] = {"shift_a", "shift_b", "mean_a", "mean_b", "comoment", "m2_a", "m2_b"};
  const at::Tensor* states[] = {&shift_a, &shift_b, &mean_a, &mean_b, &comoment, &m2_a, &m2_b};
  for (int i = 0; i < 7; ++i) check_writable(*states[i], "covariance_update_", names[i]);
  const at::Tensor a = read_values(a_in), b = read_values(b_in);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && comoment.dim() == 2, "covariance_update_: a, b, comoment must be 2-D");
  const int64_t m = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == m, "covariance_update_: a and b hold different numbers of draws");
  TORCH_CHECK(comoment.size(0) == K && comoment.size(1) == N, "covariance_update_: comoment shape mismatch");
  TORCH_CHECK(shift_a.numel() == K && mean_a.numel() == K && shift_b.numel() == N && mean_b.numel() == N,
              "covariance_update_: shift/mean size mismatch");
  TORCH_CHECK(count >= 0, "covariance_update_: count must be >= 0");
  for (auto* p : {&shift_a, &shift_b, &mean_a, &mean_b, &comoment, &m2_a, &m2_b}) check_state(*p, "state");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "covariance_update_ (cpu): chunks must be CPU tensors");
  const int mode_a = m2_a.numel() == 0 ? 0 : static_cast<int>(m2_a.dim());
  const int mode_b = m2_b.numel() == 0 ? 0 : static_cast<int>(m2_b.dim());
  TORCH_CHECK(mode_a == 0 || m2_a.size(0) == K, "covariance_update_: m2_a shape mismatch");
  TORCH_CHECK(mode_b == 0 || m2_b.size(0) == N, "covariance_update_: m2_b shape mismatch");
  if (m == 0) return;
  const Strided xa = strided(a), xb = strided(b);
  double* sa = shift_a.data_ptr<double>();
  double* sb = shift_b.data_ptr<double>();
  double* mua = mean_a.data_ptr<double>();
  double* mub = mean_b.data_ptr<double>();
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor scratch = at::empty({3 * (K + N)}, f64);
  double* d_a = scratch.data_ptr<double>();  // column sums, then delta = chunk mean - running mean
  double* d_b = d_a + K;
  double* q_a = d_b + N;  // column sums of squares
  double* q_b = q_a + K;
  double* old_a = q_b + N;  // the running means before this chunk
  double* old_b = old_a + K;
  if (count == 0) {
    std::fill(d_a, d_a + K + N, 0.0);
    col_sums(xa, 0, m, K, d_a /*zeros*/, sa);
    col_sums(xb, 0, m, N, d_b /*zeros*/, sb);
    for (int64_t c = 0; c < K; ++c) sa[c] /= static_cast<double>(m), mua[c] = 0.0;
    for (int64_t c = 0; c < N; ++c) sb[c] /= static_cast<double>(m), mub[c] = 0.0;
  }
  std::copy(mua, mua + K, old_a);
  std::copy(mub, mub + N, old_b);
  const int64_t panel = std::min(kPanel, m);
  // The panel buffers are kept between calls (per thread): a fresh multi-MB allocation on every update would be
  // returned to the system and page-faulted back in each time.
  thread_local at::Tensor ws;
  const int64_t need = (panel + 1) * (K + N);
  if (!ws.defined() || ws.numel() < need) ws = at::empty({need}, f64);
  at::Tensor pa = ws.narrow(0, 0, (panel + 1) * K).view({panel + 1, K});
  at::Tensor pb = ws.narrow(0, (panel + 1) * K, (panel + 1) * N).view({panel + 1, N});
  int64_t n = count;
  for (int64_t r0 = 0; r0 < m; r0 += panel) {
    const int64_t r1 = std::min(m, r0 + panel), mp = r1 - r0;
    const int64_t n_new = n + mp;
    // u = x - shift - running mean. With delta = mean(u) over the panel, Chan's update is
    //   C += sum u v^T - (mp^2 / n_new) delta_a delta_b^T,  mean += (mp / n_new) delta;
    // the rank-one term rides in the GEMM as one extra row (-(mp^2 / n_new) delta_a, delta_b).
    at::Tensor va = pa.narrow(0, 0, mp + 1), vb = pb.narrow(0, 0, mp + 1);
    double* pa_ptr = va.data_ptr<double>();
    double* pb_ptr = vb.data_ptr<double>();
    centre(xa, r0, r1, K, sa, mua, pa_ptr, d_a, q_a);
    centre(xb, r0, r1, N, sb, mub, pb_ptr, d_b, q_b);
    const double inv = 1.0 / static_cast<double>(mp);
    const double corr = static_cast<double>(mp) * static_cast<double>(mp) / static_cast<double>(n_new);
    for (int64_t c = 0; c < K; ++c) d_a[c] *= inv, pa_ptr[mp * K + c] = -corr * d_a[c];
    for (int64_t c = 0; c < N; ++c) d_b[c] *= inv, pb_ptr[mp * N + c] = d_b[c];
    if (K > 0 && N > 0) comoment.addmm_(va.t(), vb);
    for (int side = 0; side < 2; ++side) {
      const int mode = side == 0 ? mode_a : mode_b;
      const at::Tensor& m2 = side == 0 ? m2_a : m2_b;
      const at::Tensor& v = side == 0 ? va : vb;
      const double* d = side == 0 ? d_a : d_b;
      const double* q = side == 0 ? q_a : q_b;
      const int64_t cols = side == 0 ? K : N;
      if (mode == 0 || cols == 0) continue;
      double* out = m2.data_ptr<double>();
      if (mode == 1) {
        for (int64_t c = 0; c < cols; ++c) out[c] += q[c] - corr * d[c] * d[c];
      } else {
        at::Tensor u = v.narrow(0, 0, mp);
        m2.addmm_(u.t(), u);
        for (int64_t i = 0; i < cols; ++i)
          for (int64_t j = 0; j < cols; ++j) out[i * cols + j] -= corr * d[i] * d[j];
      }
    }
    const double f = static_cast<double>(mp) / static_cast<double>(n_new);
    for (int64_t c = 0; c < K; ++c) mua[c] += f * d_a[c];
    for (int64_t c = 0; c < N; ++c) mub[c] += f * d_b[c];
    n = n_new;
  }
  not_finite_columns(xa, m, K, N, count, sa, old_a, mua, comoment, m2_a, mode_a, /*rows=*/true);
  not_finite_columns(xb, m, N, K, count, sb, old_b, mub, comoment, m2_b, mode_b, /*rows=*/false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  // One chunk of draws into a streaming cross-covariance accumulator (pypattern/ops/covariance/). m2_a/m2_b
  // have shape (0,) (not tracked), (K,)/(N,) (diagonal) or (K,K)/(N,N) (full). count = draws already added.
  m.def(
      "covariance_update_(Tensor(a!) shift_a, Tensor(b!) shift_b, Tensor(c!) mean_a, Tensor(d!) mean_b, "
      "Tensor(e!) comoment, Tensor(f!) m2_a, Tensor(g!) m2_b, Tensor a, Tensor b, int count) -> ()");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("covariance_update_", &covariance_update_cpu); }

// the lazy negation and conjugation bits reach the kernels, which resolve what they read (math_bits.h)
PYPATTERN_MATH_BITS_FALLTHROUGH("covariance_update_")

}  // namespace pypattern
