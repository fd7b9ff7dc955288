// Raw-pointer CPU kernel of the prefix attention (attention_cpu_fast.cpp; no torch headers).
#pragma once
#include <cstdint>

namespace pypattern {

// The operands of one call (strides in elements; every last dimension has unit stride):
//   q       (C, B, Rq, H, dh)    queries of C cells
//   kp, vp  (B, P, Hkv, dh)      keys and values at positions 0 .. P - 1, shared by every cell
//   kn, vn  (C, B, Rk, Hkv, dh)  each cell's keys and values at positions P .. P + Rk - 1
//   mask    (Rq, P + Rk)         contiguous; nonzero where a query may not attend a key
//   out     (C, B, Rq, H, dh)    contiguous
// Query head h reads key/value head h / (H / Hkv).
template <typename T>
struct PrefixAttention {
  const T* q;
  int64_t sq[4];  // strides of q's first four dimensions
  const T* kp;
  const T* vp;
  int64_t skp[3], svp[3];
  const T* kn;
  const T* vn;
  int64_t skn[4], svn[4];
  const uint8_t* mask;
  T* out;
  int64_t C, B, Rq, H, Hkv, dh, P, Rk;
  T scale;
};

// Elements of the workspace that one task of a call needs (see prefix_attention_cpu_*).
int64_t prefix_attention_work_f32(const PrefixAttention<float>& a);
int64_t prefix_attention_work_f64(const PrefixAttention<double>& a);

// out for the tasks t0 <= t < t1 of the flattened (B, C) (task t: example t / C, cell t % C), every head: z = softmax(scale q . k over the keys not masked) @ v, the keys' scores in the
// element type; a query that may attend no key gets NaN (as softmax over only -inf gives), and with no keys at all
// (P + Rk == 0) zeros. `work` holds prefix_attention_work_* elements.
void prefix_attention_cpu_f32(const PrefixAttention<float>& a, int64_t t0, int64_t t1, float* work);
void prefix_attention_cpu_f64(const PrefixAttention<double>& a, int64_t t0, int64_t t1, double* work);

}  // namespace pypattern
