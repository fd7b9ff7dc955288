// Raw-pointer CPU kernels of the SGNHT and RMSprop-SGLD steps (samplers_cpu_fast.cpp; no torch headers).
// Each updates elements [begin, end) of one contiguous tensor, begin a multiple of 128; mask may be null.
// They return the range's flags (kFlagGradNonfinite | kFlagUpdateNonfinite of sgld/sgld_kernel.h; the entries
// they concern are left as they were, their state too).
#pragma once
#include <cstdint>

#include "samplers/sampler_kernels.h"

namespace pypattern {

// Adds the range's sum of p^2 over the active entries (mask != 0) to *kinetic and their number to *count.
int sgnht_cpu_range_f32(float* w, float* p, const float* g, const float* w0, const float* mask, int64_t begin,
                        int64_t end, const SgnhtCoefs& c, double* kinetic, int64_t* count);
int sgnht_cpu_range_f64(double* w, double* p, const double* g, const double* w0, const double* mask, int64_t begin,
                        int64_t end, const SgnhtCoefs& c, double* kinetic, int64_t* count);
int rmsprop_sgld_cpu_range_f32(float* w, float* v, const float* g, const float* w0, const float* mask, int64_t begin,
                               int64_t end, const RmspropCoefs& c);
int rmsprop_sgld_cpu_range_f64(double* w, double* v, const double* g, const double* w0, const double* mask,
                               int64_t begin, int64_t end, const RmspropCoefs& c);

}  // namespace pypattern
