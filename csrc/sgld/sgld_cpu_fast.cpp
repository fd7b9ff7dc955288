// Fused SGLD update on the CPU: one pass over w, g, w0 (and the mask), noise generated in registers.
// Compiled on its own (see setup.py) with -O3 -fno-math-errno -fno-trapping-math and no torch headers.
// Elements go in blocks of kSgldBlock = 128 (sgld_kernel.h): one block draws its 128 normals with normals_block()
// of philox_cpu.h (vectorised Philox with the ISA dispatch, shared with the SGNHT and RMSprop-SGLD kernels), then
// updates its 128 elements in one vector loop.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "philox_cpu.h"
#include "sgld_kernel.h"

namespace pypattern {
namespace {

constexpr int kBlock = static_cast<int>(kSgldBlock);  // elements per block
static_assert(kBlock == kNormalsBlock, "one SGLD block draws one block of normals");

// The mask and the bounding box are template parameters: a run-time test inside the loop (even a loop-invariant
// one) made gcc emit a loop about five times slower than this one (measured: 1.9 vs 0.33 ns per element in L2).
template <typename T, bool kMask, bool kBox>
int sgld_range_t(T* __restrict w, const T* __restrict g, const T* __restrict w0, const T* __restrict mask,
               int64_t begin, int64_t end, const SgldCoefs& c) {
  const T a = static_cast<T>(c.drift_grad), b = static_cast<T>(c.drift_loc), d = static_cast<T>(c.drift_wd);
  const T s = static_cast<T>(c.noise_std), box = static_cast<T>(c.box);
  const uint32_t k0 = static_cast<uint32_t>(c.seed), k1 = static_cast<uint32_t>(c.seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(c.step), c3 = static_cast<uint32_t>(c.step >> 32);
  alignas(64) float noise[kBlock];
  if (!c.has_noise) std::fill(noise, noise + kBlock, 0.0f);
  int bad = 0;
  for (int64_t base = begin; base < end; base += kBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kBlock, end - base));
    if (c.has_noise) normals_block(base, k0, k1, c.tensor_index, c2, c3, noise);
    T* __restrict wb = w + base;
    const T* __restrict gb = g + base;
    const T* __restrict ab = w0 + base;
    const T* __restrict mb = kMask ? mask + base : nullptr;
    int block_bad = 0;
#pragma omp simd reduction(| : block_bad)
    for (int i = 0; i < len; ++i) {
      const T wi = wb[i], gi = gb[i], ai = ab[i];
      const bool nf = nonfinite_bits(gi);
      const T m = kMask ? mb[i] : T(1);  // a constant 1 folds away (x * 1 is exact)
      T wn = wi + m * (-(a * gi + b * (wi - ai) + d * wi) + s * static_cast<T>(noise[i]));
      const bool frozen = kMask && m == T(0);
      // a finite gradient whose update is not finite (tested before the box, which would hide an inf)
      const bool over = nonfinite_bits(wn) & !nf & !frozen;
      block_bad |= (nf ? kFlagGradNonfinite : 0) | (over ? kFlagUpdateNonfinite : 0);
      if constexpr (kBox) wn = std::min(std::max(wn, ai - box), ai + box);
      wb[i] = (frozen | nf | over) ? wi : wn;
    }
    bad |= block_bad;
  }
  return bad;
}

template <typename T>
int sgld_range(T* w, const T* g, const T* w0, const T* mask, int64_t begin, int64_t end, const SgldCoefs& c) {
  if (mask) {
    return c.has_box ? sgld_range_t<T, true, true>(w, g, w0, mask, begin, end, c)
                     : sgld_range_t<T, true, false>(w, g, w0, mask, begin, end, c);
  }
  return c.has_box ? sgld_range_t<T, false, true>(w, g, w0, mask, begin, end, c)
                   : sgld_range_t<T, false, false>(w, g, w0, mask, begin, end, c);
}

}  // namespace

int sgld_cpu_range_f32(float* w, const float* g, const float* w0, const float* mask, int64_t begin, int64_t end,
                       const SgldCoefs& c) {
  return sgld_range<float>(w, g, w0, mask, begin, end, c);
}
int sgld_cpu_range_f64(double* w, const double* g, const double* w0, const double* mask, int64_t begin,
                       int64_t end, const SgldCoefs& c) {
  return sgld_range<double>(w, g, w0, mask, begin, end, c);
}

}  // namespace pypattern
