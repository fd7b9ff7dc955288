// CUDA registration of pypattern::row_dots (compiled only in CUDA builds; see setup.py): cuBLAS's batched GEMM of
// a against the concatenated rows of g. On a GPU the few-rows, many-terms shape that the CPU kernel is written for
// is one that cuBLAS serves (its split-K GEMMs), so no kernel of our own. Validation happens in pypattern/ops/dots/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

namespace pypattern {
namespace {

at::Tensor row_dots_cuda(const at::Tensor& a, at::TensorList g) {
  TORCH_CHECK(a.is_cuda(), "row_dots (cuda): a is not a CUDA tensor");
  TORCH_CHECK(a.dim() == 3, "row_dots: a must be 3-D (batch, rows, terms), got ", a.dim(), "-D");
  TORCH_CHECK(!g.empty(), "row_dots: g is empty");
  for (const auto& t : g) {
    TORCH_CHECK(t.is_cuda() && t.get_device() == a.get_device(), "row_dots (cuda): g is not on a's device");
    TORCH_CHECK(t.dim() == 3 && t.size(0) == a.size(0) && t.size(2) == a.size(2),
                "row_dots: every g must be (batch, rows, terms) with a's batch and terms");
    TORCH_CHECK(t.scalar_type() == a.scalar_type(), "row_dots: g has dtype ", t.scalar_type(), ", a has ",
                a.scalar_type());
  }
  c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor G = g.size() == 1 ? g[0] : at::cat(g, 1);
  return at::bmm(a, G.transpose(1, 2)).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) { m.impl("row_dots", &row_dots_cuda); }

}  // namespace pypattern
