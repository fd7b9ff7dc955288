// Raw-pointer CPU kernel of the signed sums (sums_cpu_fast.cpp; no torch headers).
#pragma once
#include <cstdint>

namespace pypattern {

// For p < P and k0 <= k < k1:
//   out[p][k] = base[p][k] + signs[i0] * terms[i0][k] + ... + signs[i1 - 1] * terms[i1 - 1][k]
// with i0 = offsets[p], i1 = offsets[p + 1], summed left to right in the element type. Each sign is +1 or -1, so
// each step is one exact add or subtract rounded once (as a chain of torch adds). out[p] may be base[p] itself
// (same elements); it must not overlap any term or any other base or output. `stream`: the outputs are written
// past the cache where aligned (for outputs larger than the caches; see sums_cpu_fast.cpp).
void signed_sums_cpu_f32(float* const* out, const float* const* base, const float* const* terms,
                         const int64_t* offsets, const float* signs, int64_t P, int64_t k0, int64_t k1,
                         bool stream);
void signed_sums_cpu_f64(double* const* out, const double* const* base, const double* const* terms,
                         const int64_t* offsets, const double* signs, int64_t P, int64_t k0, int64_t k1,
                         bool stream);

}  // namespace pypattern
