// Test driver for tests/test_prefix_attention.py: runs the raw CPU prefix-attention kernel
// (csrc/attention/attention_cpu_fast.cpp, compiled by the test with one instruction set's flags) over a grid of
// shapes (query rows around its blocks of four, head sizes and key counts around the vector widths, grouped heads,
// no shared or no own keys) in float32 and float64, with operands at padded strides and a mask with a fully masked
// row, and compares every output with a scalar long-double loop: |got - want| <= tol * max |v| (tol 2e-5 in float32,
// 1e-13 in float64); a fully masked row must be NaN, every element outside the output untouched.
// Exit status: 0 when every output agrees (prints "checked N cases"), 1 when one does not (named on stderr).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "attention_cpu.h"

namespace {

uint64_t state = 12345;
double next_value() {  // a value in [-2, 2)
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (static_cast<double>(state >> 11) / 9007199254740992.0 - 0.5) * 4.0;
}

template <typename T>
int check(int64_t C, int64_t B, int64_t Rq, int64_t Hkv, int64_t G, int64_t dh, int64_t P, int64_t Rk) {
  const int64_t H = Hkv * G, Tk = P + Rk, pad = 3;  // every row of dh padded by 3 elements
  const int64_t row = dh + pad;
  std::vector<T> q(C * B * Rq * H * row), kp(B * P * Hkv * row), vp(B * P * Hkv * row), kn(C * B * Rk * Hkv * row),
      vn(C * B * Rk * Hkv * row);
  for (auto* v : {&q, &kp, &vp, &kn, &vn})
    for (auto& x : *v) x = static_cast<T>(next_value());
  std::vector<uint8_t> mask(Rq * Tk);
  for (int64_t r = 0; r < Rq; ++r)
    for (int64_t j = 0; j < Tk; ++j) mask[r * Tk + j] = (r == 1) || (j > P + r) || (next_value() > 1.5);
  const int64_t extra = 16;
  std::vector<T> out(C * B * Rq * H * dh + extra, T(7));
  pypattern::PrefixAttention<T> a{};
  a.q = q.data();
  a.sq[3] = row, a.sq[2] = H * row, a.sq[1] = Rq * H * row, a.sq[0] = B * Rq * H * row;
  a.kp = kp.data(), a.vp = vp.data();
  a.skp[2] = a.svp[2] = row, a.skp[1] = a.svp[1] = Hkv * row, a.skp[0] = a.svp[0] = P * Hkv * row;
  a.kn = kn.data(), a.vn = vn.data();
  a.skn[3] = a.svn[3] = row, a.skn[2] = a.svn[2] = Hkv * row, a.skn[1] = a.svn[1] = Rk * Hkv * row;
  a.skn[0] = a.svn[0] = B * Rk * Hkv * row;
  a.mask = mask.data();
  a.out = out.data();
  a.C = C, a.B = B, a.Rq = Rq, a.H = H, a.Hkv = Hkv, a.dh = dh, a.P = P, a.Rk = Rk;
  a.scale = static_cast<T>(0.37);
  int64_t work;
  if constexpr (sizeof(T) == 4)
    work = pypattern::prefix_attention_work_f32(a);
  else
    work = pypattern::prefix_attention_work_f64(a);
  std::vector<T> w(work);
  // the tasks in two calls, as two threads would take them
  const int64_t tasks = B * C, half = tasks / 2;
  if constexpr (sizeof(T) == 4) {
    pypattern::prefix_attention_cpu_f32(a, 0, half, w.data());
    pypattern::prefix_attention_cpu_f32(a, half, tasks, w.data());
  } else {
    pypattern::prefix_attention_cpu_f64(a, 0, half, w.data());
    pypattern::prefix_attention_cpu_f64(a, half, tasks, w.data());
  }
  const long double tol = sizeof(T) == 4 ? 2e-5L : 1e-13L;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < Rq; ++r)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / G;
          const T* qr = q.data() + (((c * B + b) * Rq + r) * H + h) * row;
          auto key = [&](int64_t j) {
            return j < P ? kp.data() + ((b * P + j) * Hkv + hk) * row
                         : kn.data() + (((c * B + b) * Rk + (j - P)) * Hkv + hk) * row;
          };
          auto val = [&](int64_t j) {
            return j < P ? vp.data() + ((b * P + j) * Hkv + hk) * row
                         : vn.data() + (((c * B + b) * Rk + (j - P)) * Hkv + hk) * row;
          };
          std::vector<long double> s(Tk), z(dh, 0.0L);
          long double mx = -std::numeric_limits<long double>::infinity(), vmax = 0, sum = 0;
          for (int64_t j = 0; j < Tk; ++j) {
            long double d = 0;
            for (int64_t k = 0; k < dh; ++k) d += static_cast<long double>(qr[k]) * key(j)[k];
            s[j] = static_cast<long double>(a.scale) * d;
            if (!mask[r * Tk + j]) mx = std::max(mx, s[j]);
            for (int64_t k = 0; k < dh; ++k) vmax = std::max(vmax, std::fabs(static_cast<long double>(val(j)[k])));
          }
          const T* o = out.data() + (((c * B + b) * Rq + r) * H + h) * dh;
          const bool none = mx == -std::numeric_limits<long double>::infinity();
          for (int64_t j = 0; j < Tk && !none; ++j)
            if (!mask[r * Tk + j]) sum += std::exp(s[j] - mx);
          for (int64_t j = 0; j < Tk && !none; ++j)
            if (!mask[r * Tk + j])
              for (int64_t k = 0; k < dh; ++k) z[k] += std::exp(s[j] - mx) / sum * val(j)[k];
          for (int64_t k = 0; k < dh; ++k) {
            const bool ok = Tk == 0 ? o[k] == T(0)
                            : none  ? std::isnan(o[k])
                                    : std::fabs(static_cast<long double>(o[k]) - z[k]) <= tol * std::max(vmax, 1.0L);
            if (!ok) {
              std::fprintf(stderr, "%s C=%ld B=%ld Rq=%ld Hkv=%ld G=%ld dh=%ld P=%ld Rk=%ld: out[%ld,%ld,%ld,%ld,%ld] = "
                           "%.17Lg, want %.17Lg\n",
                           sizeof(T) == 4 ? "float32" : "float64", (long)C, (long)B, (long)Rq, (long)Hkv, (long)G,
                           (long)dh, (long)P, (long)Rk, (long)c, (long)b, (long)r, (long)h, (long)k,
                           static_cast<long double>(o[k]), none ? NAN : z[k]);
              return 1;
            }
          }
        }
  for (int64_t i = C * B * Rq * H * dh; i < static_cast<int64_t>(out.size()); ++i)
    if (out[i] != T(7)) {
      std::fprintf(stderr, "wrote past the output\n");
      return 1;
    }
  return 0;
}

}  // namespace

int main() {
  const int64_t Rqs[] = {1, 3, 4, 5, 9};
  const int64_t dhs[] = {1, 7, 8, 16, 17, 64, 80, 129};
  const int64_t Ps[] = {0, 1, 15, 33};
  const int64_t Rks[] = {0, 1, 16, 17};
  const int64_t Gs[] = {1, 3};
  int64_t n = 0;
  for (int64_t Rq : Rqs)
    for (int64_t dh : dhs)
      for (int64_t P : Ps)
        for (int64_t Rk : Rks)
          for (int64_t G : Gs) {
            if (check<float>(2, 2, Rq, 2, G, dh, P, Rk) || check<double>(2, 2, Rq, 2, G, dh, P, Rk)) return 1;
            n += 2;
          }
  std::printf("checked %ld cases\n", static_cast<long>(n));
  return 0;
}
