// CUDA registration of pypattern::prefix_attention (compiled only in CUDA builds; see setup.py): the reference's
// arithmetic in ATen's ops (the shared keys broadcast to every cell beside its own, batched products for the
// scores and the mix, softmax of the masked scores), no kernel of our own: on a GPU these batched products are
// cuBLAS's. Validation happens in pypattern/ops/attention/; this file checks the shapes it relies on.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>

namespace pypattern {
namespace {

at::Tensor prefix_attention_cuda(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp,
                                 const at::Tensor& kn, const at::Tensor& vn, const at::Tensor& mask, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 5 && kn.dim() == 5 && vn.dim() == 5 && kp.dim() == 4 && vp.dim() == 4,
                    "prefix_attention: q, k_new, v_new must be 5-D and k_prefix, v_prefix 4-D");
  TORCH_CHECK_VALUE(q.is_cuda(), "prefix_attention (cuda): q is not a CUDA tensor");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t C = q.size(0), B = q.size(1), Rq = q.size(2), H = q.size(3), dh = q.size(4);
  const int64_t Hkv = kn.size(3), P = kp.size(1), Tk = P + kn.size(2);
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "prefix_attention: q's heads must be a multiple of k_new's");
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == Rq && mask.size(1) == Tk,
                    "prefix_attention: mask must be (Rq, P + Rk)");
  if (Tk == 0) return at::zeros({C, B, Rq, H, dh}, q.options());
  const int64_t G = H / Hkv;
  // keys and values (C, B, Hkv, Tk, dh): the shared ones broadcast to every cell, then the cell's own
  auto keys = [&](const at::Tensor& shared, const at::Tensor& own) {
    return at::cat({shared.permute({0, 2, 1, 3}).unsqueeze(0).expand({C, B, Hkv, P, dh}), own.permute({0, 1, 3, 2, 4})},
                   3);
  };
  const at::Tensor K = keys(kp, kn), V = keys(vp, vn);
  // queries (C, B, Hkv, G * Rq, dh), query head hk * G + g
  const at::Tensor Q = q.reshape({C, B, Rq, Hkv, G, dh}).permute({0, 1, 3, 4, 2, 5}).reshape({C, B, Hkv, G * Rq, dh});
  at::Tensor s = at::matmul(Q, K.transpose(-1, -2)).mul_(scale).view({C, B, Hkv, G, Rq, Tk});
  s.masked_fill_(mask.to(s.device()), -std::numeric_limits<double>::infinity());
  const at::Tensor pat = at::softmax(s, -1).view({C, B, Hkv, G * Rq, Tk});
  return at::matmul(pat, V).view({C, B, Hkv, G, Rq, dh}).permute({0, 1, 4, 2, 3, 5}).reshape({C, B, Rq, H, dh});
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) { m.impl("prefix_attention", &prefix_attention_cuda); }

}  // namespace pypattern
