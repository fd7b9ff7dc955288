// The vector width of the build's instruction set and gcc vector types of it, for the raw-pointer kernels
// (*_fast.cpp, compiled on their own with the instruction set's flags): Vec<T>::v a vector of T, Vec<T>::u the same
// at any alignment (unaligned loads and stores; may alias T); keep_in_register.
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

// An empty asm that makes v live in a vector register: a vector loaded once and used by several multiply-adds
// stays one load (gcc would otherwise fold the load into each multiply-add as a memory operand, several loads where
// one does, and a loop of them becomes load-bound).
#if defined(__x86_64__) || defined(__i386__)
#define PYPATTERN_VREG "+v"
#elif defined(__aarch64__)
#define PYPATTERN_VREG "+w"
#endif

template <typename V>
inline void keep_in_register(V& v) {
#ifdef PYPATTERN_VREG
  __asm__("" : PYPATTERN_VREG(v));
#else
  (void)v;
#endif
}

}  // namespace simd
}  // namespace pypattern
