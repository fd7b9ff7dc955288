// CUDA registration of pypattern::grad_gram_pairwise (compiled only in CUDA builds; see setup.py). The kernel
// and its launcher are in grad_gram.cu; validation happens in pypattern/ops/grad_gram/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grad_gram_kernel.h"

namespace pypattern {
namespace {

at::Tensor grad_gram_pairwise_cuda_op(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& ids,
                                      int64_t batch) {
  TORCH_CHECK(y.dim() == 2 && y.is_cuda(), "grad_gram_pairwise (cuda): y must be a 2-D CUDA tensor");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "grad_gram_pairwise: y must be float32 or float64, got ", y.scalar_type());
  TORCH_CHECK(batch >= 0, "grad_gram_pairwise: batch must be >= 0");
  c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.size(0);
  auto g = at::zeros({batch, batch}, y.options().dtype(at::kDouble));
  if (batch == 0 || rows == 0) return g;
  TORCH_CHECK(rows % batch == 0, "grad_gram_pairwise: rows of y (", rows, ") not a multiple of batch (", batch, ")");
  const bool use_ids = ids.has_value() && ids->defined();
  at::Tensor yc = y.contiguous(), xc, idc;
  if (use_ids) {
    idc = ids->contiguous();
    TORCH_CHECK(idc.device() == y.device() && idc.scalar_type() == at::kLong && idc.numel() == rows,
                "grad_gram_pairwise: ids must be an int64 tensor on y's device with one entry per row");
  } else {
    TORCH_CHECK(x.device() == y.device() && x.dim() == 2 && x.size(0) == rows && x.scalar_type() == y.scalar_type(),
                "grad_gram_pairwise: x must be a 2-D tensor with the rows, dtype and device of y");
    xc = x.contiguous();
  }
  grad_gram_pairwise_cuda(use_ids ? nullptr : xc.data_ptr(), yc.data_ptr(), use_ids ? idc.data_ptr<int64_t>() : nullptr,
                          y.scalar_type() == at::kDouble, rows, use_ids ? 0 : xc.size(1), yc.size(1), batch,
                          g.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) { m.impl("grad_gram_pairwise", &grad_gram_pairwise_cuda_op); }

}  // namespace pypattern
