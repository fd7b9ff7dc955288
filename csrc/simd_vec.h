// The vector width of the build's instruction set and gcc vector types of it, for the raw-pointer kernels
// (*_fast.cpp, compiled on their own with the instruction set's flags): Vec<T>::v a vector of T, Vec<T>::u the same
// at any alignment (unaligned loads and stores; may alias T).
#pragma once

namespace pypattern {
namespace simd {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Vec {
  typedef T v __attribute__((vector_size(kVecBytes)));
  typedef T u __attribute__((vector_size(kVecBytes), aligned(sizeof(T)), may_alias));
};

}  // namespace simd
}  // namespace pypattern
