// Prefix attention: schema (a TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernel of pypattern::prefix_attention
// (maths in pypattern/ops/attention/):
//   out[c, b, r, h] = sum_j softmax_j(scale q[c, b, r, h] . k_j, masked) v_j
// over the keys k_j = kp[b, j, h / G] (j < P) and kn[c, b, j - P, h / G] (P <= j < P + Rk), G = H / Hkv. The
// Python layer validates; this file checks what would make memory access unsafe. Inputs whose last dimension does
// not have unit stride are copied; the tasks (example, cell) are split over torch's intra-op threads, each
// output element one task's, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "attention/attention_cpu.h"

namespace pypattern {
namespace {

at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T>
void run(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, const at::Tensor& kn, const at::Tensor& vn,
         const at::Tensor& mask, double scale, at::Tensor& out) {
  PrefixAttention<T> a{};
  a.q = q.const_data_ptr<T>();
  a.kp = kp.const_data_ptr<T>();
  a.vp = vp.const_data_ptr<T>();
  a.kn = kn.const_data_ptr<T>();
  a.vn = vn.const_data_ptr<T>();
  for (int d = 0; d < 4; ++d) a.sq[d] = q.stride(d), a.skn[d] = kn.stride(d), a.svn[d] = vn.stride(d);
  for (int d = 0; d < 3; ++d) a.skp[d] = kp.stride(d), a.svp[d] = vp.stride(d);
  a.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  a.out = out.mutable_data_ptr<T>();
  a.C = q.size(0), a.B = q.size(1), a.Rq = q.size(2), a.H = q.size(3), a.dh = q.size(4);
  a.Hkv = kn.size(3), a.P = kp.size(1), a.Rk = kn.size(2);
  a.scale = static_cast<T>(scale);
  int64_t work;
  if constexpr (std::is_same_v<T, float>)
    work = prefix_attention_work_f32(a);
  else
    work = prefix_attention_work_f64(a);
  at::parallel_for(0, a.B * a.C, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> w(work);
    if constexpr (std::is_same_v<T, float>)
      prefix_attention_cpu_f32(a, t0, t1, w.data());
    else
      prefix_attention_cpu_f64(a, t0, t1, w.data());
  });
}

at::Tensor prefix_attention_cpu(const at::Tensor& q_in, const at::Tensor& kp_in, const at::Tensor& vp_in,
                                const at::Tensor& kn_in, const at::Tensor& vn_in, const at::Tensor& mask_in,
                                double scale) {
  TORCH_CHECK_VALUE(q_in.dim() == 5 && kn_in.dim() == 5 && vn_in.dim() == 5 && kp_in.dim() == 4 && vp_in.dim() == 4,
                    "prefix_attention: q, k_new, v_new must be 5-D and k_prefix, v_prefix 4-D");
  const int64_t C = q_in.size(0), B = q_in.size(1), Rq = q_in.size(2), H = q_in.size(3), dh = q_in.size(4);
  const int64_t Rk = kn_in.size(2), Hkv = kn_in.size(3), P = kp_in.size(1);
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "prefix_attention: q's heads must be a multiple of k_new's");
  for (const at::Tensor* t : {&kn_in, &vn_in})
    TORCH_CHECK_VALUE(t->size(0) == C && t->size(1) == B && t->size(2) == Rk && t->size(3) == Hkv && t->size(4) == dh,
                      "prefix_attention: k_new and v_new must be (C, B, Rk, Hkv, dh) alike and match q");
  for (const at::Tensor* t : {&kp_in, &vp_in})
    TORCH_CHECK_VALUE(t->size(0) == B && t->size(1) == P && t->size(2) == Hkv && t->size(3) == dh,
                      "prefix_attention: k_prefix and v_prefix must be (B, P, Hkv, dh) alike and match q");
  TORCH_CHECK_VALUE(mask_in.dim() == 2 && mask_in.size(0) == Rq && mask_in.size(1) == P + Rk &&
                        mask_in.scalar_type() == at::kBool,
                    "prefix_attention: mask must be a bool tensor of shape (Rq, P + Rk)");
  const auto dt = q_in.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble,
                    "prefix_attention (cpu): q must be float32 or float64");
  for (const at::Tensor* t : {&q_in, &kp_in, &vp_in, &kn_in, &vn_in, &mask_in})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "prefix_attention (cpu): every tensor must be on the CPU");
  for (const at::Tensor* t : {&kp_in, &vp_in, &kn_in, &vn_in})
    TORCH_CHECK_VALUE(t->scalar_type() == dt, "prefix_attention: keys and values must have q's dtype");
  at::Tensor out = at::empty({C, B, Rq, H, dh}, q_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor q = unit_last(q_in), kp = unit_last(kp_in), vp = unit_last(vp_in), kn = unit_last(kn_in),
                   vn = unit_last(vn_in), mask = mask_in.contiguous();
  if (dt == at::kFloat)
    run<float>(q, kp, vp, kn, vn, mask, scale, out);
  else
    run<double>(q, kp, vp, kn, vn, mask, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  m.def(
      "prefix_attention(Tensor q, Tensor k_prefix, Tensor v_prefix, Tensor k_new, Tensor v_new, Tensor mask, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("prefix_attention", &prefix_attention_cpu); }

}  // namespace pypattern
