// Launchers of the CUDA SGNHT and RMSprop-SGLD kernels (samplers.cu), called by samplers_cuda.cpp.
#pragma once
#include <cstdint>

#include "samplers/sampler_kernels.h"

namespace pypattern {

// Number of CUDA blocks the SGNHT launcher uses for n elements: partials must hold 2 doubles per block.
int64_t sgnht_cuda_blocks(int64_t n);

// SGNHT over one tensor: writes (sum of p^2, count of active entries) per CUDA block to partials; xi points to
// the thermostat (one device double) at the start of the step. flag: one device int32, OR-ed
// with the tensor's flags (kFlagGradNonfinite | kFlagUpdateNonfinite of sgld/sgld_kernel.h).
void sgnht_cuda_f32(float* w, float* p, const float* g, const float* w0, const float* mask, int64_t n,
                    const SgnhtCoefs& c, const double* xi, double* partials, int* flag, void* stream);
void sgnht_cuda_f64(double* w, double* p, const double* g, const double* w0, const double* mask, int64_t n,
                    const SgnhtCoefs& c, const double* xi, double* partials, int* flag, void* stream);

void rmsprop_sgld_cuda_f32(float* w, float* v, const float* g, const float* w0, const float* mask, int64_t n,
                           const RmspropCoefs& c, int* flag, void* stream);
void rmsprop_sgld_cuda_f64(double* w, double* v, const double* g, const double* w0, const double* mask, int64_t n,
                           const RmspropCoefs& c, int* flag, void* stream);

}  // namespace pypattern
