// Row dot products: schema (a TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernel of pypattern::row_dots
// (maths in pypattern/ops/dots/):
//   out[b, m, n0 + n] = sum_k a[b, m, k] * g_i[b, n, k]     (n0: the rows of g_0 .. g_{i-1})
// for a (B, M, K) and a list of g_i (B, N_i, K), every tensor with unit stride along k (any other strides): the
// products of a batched matmul a @ cat(g)^T without forming the concatenation. Validation happens in Python; this
// file checks what would make memory access unsafe. The (b, row block) pairs are split over torch's intra-op
// threads; each output element is one thread's sum, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "dots/dots_cpu.h"

namespace pypattern {
namespace {

constexpr int64_t kRowsPerTask = 256;

void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "row_dots (cpu): ", name, " is not a CPU tensor");
  TORCH_CHECK(t.dim() == 3, "row_dots: ", name, " must be 3-D (batch, rows, terms), got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == dtype, "row_dots: ", name, " has dtype ", t.scalar_type(), ", a has ", dtype);
  TORCH_CHECK(t.size(0) == B && t.size(2) == K, "row_dots: ", name, " has shape ", t.sizes(), "; expected (", B,
              ", rows, ", K, ")");
  TORCH_CHECK(K <= 1 || t.stride(2) == 1, "row_dots: ", name, " must have unit stride along its last dimension");
}

template <typename T>
void run(const at::Tensor& a, const std::vector<at::Tensor>& gs, at::Tensor& out, int64_t N, int64_t K) {
  const int64_t B = a.size(0), M = a.size(1);
  std::vector<const T*> arows(B * M), grows(B * N);
  const T* ap = a.const_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) arows[b * M + m] = ap + b * a.stride(0) + m * a.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    int64_t n0 = 0;
    for (const auto& g : gs) {
      const T* gp = g.const_data_ptr<T>();
      for (int64_t n = 0; n < g.size(1); ++n) grows[b * N + n0 + n] = gp + b * g.stride(0) + n * g.stride(1);
      n0 += g.size(1);
    }
  }
  T* op = out.mutable_data_ptr<T>();
  const int64_t blocks = (M + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, B * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, m0 = (t % blocks) * kRowsPerTask;
      const int64_t mn = std::min(kRowsPerTask, M - m0);
      T* o = op + (b * M + m0) * N;
      if constexpr (std::is_same_v<T, float>)
        row_dots_cpu_f32(arows.data() + b * M + m0, mn, grows.data() + b * N, N, K, o, N);
      else
        row_dots_cpu_f64(arows.data() + b * M + m0, mn, grows.data() + b * N, N, K, o, N);
    }
  });
}

at::Tensor row_dots_cpu(const at::Tensor& a, at::TensorList g) {
  TORCH_CHECK(a.device().is_cpu(), "row_dots (cpu): a is not a CPU tensor");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, "row_dots (cpu): a has dtype ",
              a.scalar_type(), "; supported are float32 and float64");
  TORCH_CHECK(a.dim() == 3, "row_dots: a must be 3-D (batch, rows, terms), got ", a.dim(), "-D");
  const int64_t B = a.size(0), M = a.size(1), K = a.size(2);
  TORCH_CHECK(K <= 1 || a.stride(2) == 1, "row_dots: a must have unit stride along its last dimension");
  std::vector<at::Tensor> gs(g.begin(), g.end());
  int64_t N = 0;
  for (size_t i = 0; i < gs.size(); ++i) {
    check_rows(gs[i], "g", B, K, a.scalar_type());
    N += gs[i].size(1);
  }
  at::Tensor out = at::empty({B, M, N}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (a.scalar_type() == at::kFloat)
    run<float>(a, gs, out, N, K);
  else
    run<double>(a, gs, out, N, K);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) { m.def("row_dots(Tensor a, Tensor[] g) -> Tensor"); }

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("row_dots", &row_dots_cpu); }

}  // namespace pypattern
