// CUDA registration of pypattern::covariance_update_ (compiled only in CUDA builds; see setup.py). The kernels
// and their launcher are in covariance.cu; validation happens in pypattern/ops/covariance/.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "covariance_kernel.h"
#include "math_bits.h"

namespace pypattern {
namespace {

void check_state(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kDouble && t.is_contiguous(), "covariance_update_ (cuda): ",
              name, " must be a contiguous float64 CUDA tensor");
}

void covariance_update_cuda_op(const at::Tensor& shift_a, const at::Tensor& shift_b, const at::Tensor& mean_a,
                               const at::Tensor& mean_b, const at::Tensor& comoment, const at::Tensor& m2_a,
                               const at::Tensor& m2_b, const at::Tensor& a_in, const at::Tensor& b_in,
                               int64_t count) {
  const char* names[] = {"shift_a", "shift_b", "mean_a", "mean_b", "comoment", "m2_a", "m2_b"};
  const at::Tensor* states[] = {&shift_a, &shift_b, &mean_a, &mean_b, &comoment, &m2_a, &m2_b};
  for (int i = 0; i < 7; ++i) check_writable(*states[i], "covariance_update_", names[i]);
  const at::Tensor a = read_values(a_in), b = read_values(b_in);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && comoment.dim() == 2, "covariance_update_: a, b, comoment must be 2-D");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == M, "covariance_update_: a and b hold different numbers of draws");
  TORCH_CHECK(comoment.size(0) == K && comoment.size(1) == N, "covariance_update_: comoment shape mismatch");
  TORCH_CHECK(shift_a.numel() == K && mean_a.numel() == K && shift_b.numel() == N && mean_b.numel() == N,
              "covariance_update_: shift/mean size mismatch");
  TORCH_CHECK(count >= 0, "covariance_update_: count must be >= 0");
  check_state(shift_a, "shift_a");
  check_state(shift_b, "shift_b");
  check_state(mean_a, "mean_a");
  check_state(mean_b, "mean_b");
  check_state(comoment, "comoment");
  check_state(m2_a, "m2_a");
  check_state(m2_b, "m2_b");
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "covariance_update_ (cuda): chunks must be CUDA tensors");
  // the kernels run on comoment's device (the guard below): a pointer into another GPU's memory is an illegal
  // address there
  const at::Device device = comoment.device();
  for (const at::Tensor* x : {&shift_a, &shift_b, &mean_a, &mean_b, &m2_a, &m2_b, &a, &b})
    TORCH_CHECK(x->device() == device, "covariance_update_ (cuda): every tensor must be on comoment's device ",
                device, ", got one on ", x->device());
  for (const at::Tensor* x : {&a, &b})
    TORCH_CHECK(x->scalar_type() == at::kFloat || x->scalar_type() == at::kDouble,
                "covariance_update_: chunks must be float32 or float64, got ", x->scalar_type());
  const int mode_a = m2_a.numel() == 0 ? 0 : static_cast<int>(m2_a.dim());
  const int mode_b = m2_b.numel() == 0 ? 0 : static_cast<int>(m2_b.dim());
  // (K,) or (K, K): the full co-moment kernel writes K * K entries, and a 3-D m2 would be silently skipped
  TORCH_CHECK(mode_a <= 2 && (mode_a == 0 || m2_a.size(0) == K) && (mode_a != 2 || m2_a.size(1) == K),
              "covariance_update_: m2_a must have shape (0,), (K,) or (K, K), got ", m2_a.sizes());
  TORCH_CHECK(mode_b <= 2 && (mode_b == 0 || m2_b.size(0) == N) && (mode_b != 2 || m2_b.size(1) == N),
              "covariance_update_: m2_b must have shape (0,), (N,) or (N, N), got ", m2_b.sizes());
  if (M == 0) return;
  c10::cuda::CUDAGuard guard(device);
  at::Tensor ws = at::empty({2 * (K + N) + 1}, comoment.options());
  covariance_update_cuda(a.data_ptr(), a.scalar_type() == at::kDouble, a.stride(0), a.stride(1), b.data_ptr(),
                         b.scalar_type() == at::kDouble, b.stride(0), b.stride(1), M, K, N,
                         shift_a.data_ptr<double>(), shift_b.data_ptr<double>(), mean_a.data_ptr<double>(),
                         mean_b.data_ptr<double>(), comoment.data_ptr<double>(), m2_a.data_ptr<double>(), mode_a,
                         m2_b.data_ptr<double>(), mode_b, ws.data_ptr<double>(), count,
                         c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(pypattern, CUDA, m) { m.impl("covariance_update_", &covariance_update_cuda_op); }

}  // namespace pypattern
