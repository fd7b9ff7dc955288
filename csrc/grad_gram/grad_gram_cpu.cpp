// Per-sample gradient Gram, pairwise contraction: schema (a TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU
// kernel of pypattern::grad_gram_pairwise (maths in pypattern/ops/grad_gram/):
//   G[i, j] = sum_{s,t} K[iT+s, jT+t] * (y[iT+s] . y[jT+t]),  K = x x^T, or K[r, c] = [ids[r] == ids[c] >= 0].
// Rows are cut into blocks of whole samples (about 512 rows). For each block pair I <= J: two GEMMs (at::mm, MKL,
// in the input dtype) give the row-pair dot products, then one fused OpenMP pass multiplies them and sums every
// T x T sub-block in float64 into G[I, J]; G[J, I] is its mirror. Workspace: two (512 x 512) blocks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

namespace pypattern {
namespace {

constexpr int64_t kRowsPerBlock = 512;

template <typename T>
void reduce_block(const T* kd, const T* ka, const int64_t* ids_i, const int64_t* ids_j, int64_t ni, int64_t nj,
                  int64_t t, int64_t i0, int64_t j0, int64_t batch, double* g) {
  // an off-diagonal block writes G[J, I] as the mirror of G[I, J]; a diagonal block (i0 == j0) computes its upper
  // triangle and mirrors it, so that G is exactly symmetric (the two GEMM products of a pair need not round alike)
  const bool diag = i0 == j0;
  const int64_t cols = nj * t;
  if (t == 1 && ka != nullptr) {  // one position: G[i, j] = ka[i, j] * kd[i, j]
    at::parallel_for(0, ni, 16, [&](int64_t a0, int64_t a1) {
      for (int64_t i = a0; i < a1; ++i) {
        const T* kar = ka + i * cols;
        const T* kdr = kd + i * cols;
        double* gr = g + (i0 + i) * batch + j0;
        const int64_t jstart = diag ? i : 0;
#pragma omp simd
        for (int64_t j = jstart; j < nj; ++j) gr[j] = static_cast<double>(kar[j]) * static_cast<double>(kdr[j]);
        for (int64_t j = diag ? i + 1 : 0; j < nj; ++j) g[(j0 + j) * batch + (i0 + i)] = gr[j];
      }
    });
    return;
  }
  at::parallel_for(0, ni, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t i = a0; i < a1; ++i) {
      for (int64_t j = diag ? i : 0; j < nj; ++j) {
        double acc = 0.0;
        for (int64_t s = 0; s < t; ++s) {
          const int64_t r = i * t + s;
          const T* kdr = kd + r * cols + j * t;
          if (ka != nullptr) {
            const T* kar = ka + r * cols + j * t;
            T part = 0;
#pragma omp simd reduction(+ : part)
            for (int64_t u = 0; u < t; ++u) part += kar[u] * kdr[u];
            acc += static_cast<double>(part);
          } else {
            const int64_t id = ids_i[r];
            if (id < 0) continue;
            const int64_t* idc = ids_j + j * t;
            T part = 0;
#pragma omp simd reduction(+ : part)
            for (int64_t u = 0; u < t; ++u) part += idc[u] == id ? kdr[u] : T(0);
            acc += static_cast<double>(part);
          }
        }
        g[(i0 + i) * batch + (j0 + j)] = acc;
        if (!diag || j != i) g[(j0 + j) * batch + (i0 + i)] = acc;
      }
    }
  });
}

at::Tensor grad_gram_pairwise_cpu(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& ids,
                                  int64_t batch) {
  TORCH_CHECK(y.dim() == 2 && y.device().is_cpu(), "grad_gram_pairwise (cpu): y must be a 2-D CPU tensor");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "grad_gram_pairwise: y must be float32 or float64, got ", y.scalar_type());
  TORCH_CHECK(batch >= 0, "grad_gram_pairwise: batch must be >= 0");
  const int64_t rows = y.size(0);
  auto g = at::zeros({batch, batch}, at::TensorOptions().dtype(at::kDouble));
  if (batch == 0 || rows == 0) return g;
  TORCH_CHECK(rows % batch == 0, "grad_gram_pairwise: rows of y (", rows, ") not a multiple of batch (", batch, ")");
  const int64_t t = rows / batch;
  const bool use_ids = ids.has_value() && ids->defined();
  at::Tensor yc = y.contiguous(), xc, idc;
  if (use_ids) {
    idc = ids->contiguous();
    TORCH_CHECK(idc.scalar_type() == at::kLong && idc.numel() == rows,
                "grad_gram_pairwise: ids must be int64 with one entry per row");
  } else {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.scalar_type() == y.scalar_type(),
                "grad_gram_pairwise: x must be 2-D, with the rows and dtype of y");
    xc = x.contiguous();
  }
  const int64_t spb = std::max<int64_t>(1, kRowsPerBlock / t);  // samples per block
  double* gp = g.data_ptr<double>();
  const int64_t* idp = use_ids ? idc.data_ptr<int64_t>() : nullptr;
  for (int64_t i0 = 0; i0 < batch; i0 += spb) {
    const int64_t ni = std::min(spb, batch - i0);
    at::Tensor yi = yc.narrow(0, i0 * t, ni * t);
    at::Tensor xi = use_ids ? at::Tensor() : xc.narrow(0, i0 * t, ni * t);
    for (int64_t j0 = i0; j0 < batch; j0 += spb) {
      const int64_t nj = std::min(spb, batch - j0);
      at::Tensor kd = at::mm(yi, yc.narrow(0, j0 * t, nj * t).t());
      at::Tensor ka = use_ids ? at::Tensor() : at::mm(xi, xc.narrow(0, j0 * t, nj * t).t());
      if (yc.scalar_type() == at::kFloat) {
        reduce_block<float>(kd.data_ptr<float>(), use_ids ? nullptr : ka.data_ptr<float>(),
                            use_ids ? idp + i0 * t : nullptr, use_ids ? idp + j0 * t : nullptr, ni, nj, t, i0, j0,
                            batch, gp);
      } else {
        reduce_block<double>(kd.data_ptr<double>(), use_ids ? nullptr : ka.data_ptr<double>(),
                             use_ids ? idp + i0 * t : nullptr, use_ids ? idp + j0 * t : nullptr, ni, nj, t, i0, j0,
                             batch, gp);
      }
    }
  }
  return g;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  // G[i,j] = sum_{s,t} K[iT+s, jT+t] (y[iT+s] . y[jT+t]) with K = x x^T, or [ids equal and >= 0] when ids is
  // given (x is then ignored). y (B*T, q), x (B*T, p); returns (B, B) float64. See pypattern/ops/grad_gram/.
  m.def("grad_gram_pairwise(Tensor x, Tensor y, Tensor? ids, int batch) -> Tensor");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("grad_gram_pairwise", &grad_gram_pairwise_cpu); }

}  // namespace pypattern
