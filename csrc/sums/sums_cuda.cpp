// CUDA registration of pypattern::signed_sums_ (compiled only in CUDA builds; see setup.py): torch's multi-tensor
// (foreach) kernels, no kernel of our own. Each output starts as its base (one multi-tensor copy), then takes the
// j-th of its terms in round j: one multi-tensor add per sign and round, so a call makes about twice as many
// launches as its largest number of terms per output, and sums each output left to right as the CPU kernel does.
// Validation happens in pypattern/ops/sums/; this file checks what would make memory access unsafe.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_copy.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "math_bits.h"

namespace pypattern {
namespace {

void signed_sums_cuda(at::TensorList out, at::TensorList base, at::TensorList terms, at::IntArrayRef offsets,
                      at::IntArrayRef signs) {
  const size_t P = base.size(), N = terms.size();
  TORCH_CHECK_VALUE(out.size() == P && offsets.size() == P + 1 && signs.size() == N,
                    "signed_sums (cuda): out, offsets and signs must have ", P, ", ", P + 1, " and ", N, " entries");
  if (P == 0) return;
  TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[P] == static_cast<int64_t>(N),
                    "signed_sums (cuda): offsets must run from 0 to the number of terms");
  const at::Tensor& ref = base[0];
  TORCH_CHECK_VALUE(ref.is_cuda(), "signed_sums (cuda): base[0] is not a CUDA tensor");
  auto check = [&](const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device() == ref.device() && t.scalar_type() == ref.scalar_type() && t.sizes() == ref.sizes(),
                      "signed_sums (cuda): every tensor must have base[0]'s shape, dtype and device");
  };
  int64_t rounds = 0;
  for (size_t p = 0; p < P; ++p) {
    check(out[p]);
    check_writable(out[p], "signed_sums", "out", static_cast<int64_t>(p));
    check(base[p]);
    TORCH_CHECK_VALUE(offsets[p + 1] >= offsets[p], "signed_sums (cuda): offsets must not decrease");
    rounds = std::max(rounds, offsets[p + 1] - offsets[p]);
  }
  for (size_t i = 0; i < N; ++i) {
    check(terms[i]);
    TORCH_CHECK_VALUE(signs[i] == 1 || signs[i] == -1, "signed_sums (cuda): each sign must be 1 or -1");
  }
  c10::cuda::CUDAGuard guard(ref.device());
  std::vector<at::Tensor> dst, src;
  for (size_t p = 0; p < P; ++p) {
    if (out[p].data_ptr() == base[p].data_ptr() && out[p].strides() == base[p].strides()) continue;  // in place
    dst.push_back(out[p]);
    src.push_back(base[p]);
  }
  if (!dst.empty()) at::_foreach_copy_(dst, src);
  for (int64_t j = 0; j < rounds; ++j) {
    for (const int64_t sign : {1, -1}) {
      dst.clear();
      src.clear();
      for (size_t p = 0; p < P; ++p) {
        const int64_t i = offsets[p] + j;
        if (i < offsets[p + 1] && signs[i] == sign) {
          dst.push_back(out[p]);
          src.push_back(terms[i]);
        }
      }
      if (!dst.empty()) at::_foreach_add_(dst, src, sign);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) { m.impl("signed_sums_", &signed_sums_cuda); }

}  // namespace pypattern
