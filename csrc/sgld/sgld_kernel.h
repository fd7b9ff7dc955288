// Raw-pointer SGLD kernels (no torch headers). The C++ ones live in sgld_cpu_fast.cpp (compiled on its own,
// without -ffast-math: see setup.py); the CUDA launchers live in sgld.cu.
#pragma once
#include <cstdint>

namespace pypattern {

// Elements per block of the CPU kernel: every range it is given must start at a multiple of this. 128 (two
// Philox chains of 16 counters) keeps a block's loads close enough to its noise arithmetic in the instruction
// stream for the core to overlap them; 256 was about 15% slower at 1e7 elements, one thread (measured).
constexpr int64_t kSgldBlock = 128;

// The per-tensor flags every fused step kernel (SGLD, SGNHT, RMSprop-SGLD; C++, CUDA and Triton) returns, OR-ed
// over the tensor's entries. An entry with either is not written: it and its state keep their old values.
constexpr int kFlagGradNonfinite = 1;    // its gradient was NaN or Inf
constexpr int kFlagUpdateNonfinite = 2;  // finite gradient, but the new value (or new state) would be NaN or Inf

struct SgldCoefs {
  double drift_grad;   // eps/2 * nbeta
  double drift_loc;    // eps/2 * localization
  double drift_wd;     // eps/2 * weight_decay
  double noise_std;    // sqrt(eps) * noise_scale
  double box;          // half-width of the bounding box (used when has_box)
  uint64_t seed;
  uint64_t step;
  uint32_t tensor_index;
  bool has_box;
  bool has_noise;
};

// Elements [begin, end) of one contiguous tensor; begin must be a multiple of kSgldBlock.
// mask may be null. Returns the range's flags (kFlagGradNonfinite | kFlagUpdateNonfinite; the entries they
// concern are left unchanged).
int sgld_cpu_range_f32(float* w, const float* g, const float* w0, const float* mask, int64_t begin, int64_t end,
                       const SgldCoefs& c);
int sgld_cpu_range_f64(double* w, const double* g, const double* w0, const double* mask, int64_t begin,
                       int64_t end, const SgldCoefs& c);

// CUDA launchers (sgld.cu). flag points to one device int32 that is OR-ed with the tensor's flags.
void sgld_cuda_f32(float* w, const float* g, const float* w0, const float* mask, int64_t n, const SgldCoefs& c,
                   int* flag, void* stream);
void sgld_cuda_f64(double* w, const double* g, const double* w0, const double* mask, int64_t n,
                   const SgldCoefs& c, int* flag, void* stream);

}  // namespace pypattern
