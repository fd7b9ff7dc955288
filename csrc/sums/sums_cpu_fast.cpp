// Signed sums of same-shaped blocks, out[p] = base[p] + sum_i signs[i] * terms[i] over each output's own terms, in
// one pass per output: each element of a term and of a base is read once and each output element written once,
// where a chain of torch adds reads and writes each output once per term. Compiled on its own (see setup.py) with
// -O3 and no torch headers.
//
// The elements are taken in chunks of kChunkBytes per tensor, all outputs of a chunk before the next chunk: a term
// (or base) read by several outputs is read from memory once per chunk and from the cache by the others (the
// inputs of one stage of exact edge patching share sources: at a pruning point about half of a call's terms repeat
// a block that another of its outputs reads). Within a chunk, each output is
// accumulated kUnroll vectors at a time in registers over its terms, left to right; a sign of +1 or -1 times a
// term is exact, so the multiply-add is the add or subtract of the chain, rounded once.
//
// With `stream` (outputs larger than the caches), the whole vectors of an output aligned to the vector width are
// written with non-temporal stores: past the cache, without first reading the lines they overwrite (a third of the
// memory traffic of a sum with few terms, most of whose terms other outputs also read).
#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYPATTERN_STREAM_STORES 1
#endif

#include "simd_vec.h"
#include "sums/sums_cpu.h"

#pragma GCC optimize("fp-contract=fast")

namespace pypattern {
namespace {

constexpr int kUnroll = 4;
// each tensor's share of a chunk (2 and 4 KiB were the fastest on a pruning point's sums, 8 KiB 5-10% slower and
// no chunks at all a third slower); a build may set another with -DPYPATTERN_SUMS_CHUNK_BYTES=...
#ifndef PYPATTERN_SUMS_CHUNK_BYTES
#define PYPATTERN_SUMS_CHUNK_BYTES 4096
#endif
constexpr int64_t kChunkBytes = PYPATTERN_SUMS_CHUNK_BYTES;

using simd::kVecBytes;
using simd::Vec;

// a whole vector to an address aligned to the vector width, past the cache
template <typename V>
inline void store_stream(float* o, V v) {
#if !defined(PYPATTERN_STREAM_STORES)
  *reinterpret_cast<typename Vec<float>::u*>(o) = v;
#elif defined(__AVX512F__)
  _mm512_stream_ps(o, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  _mm256_stream_ps(o, reinterpret_cast<__m256>(v));
#else
  _mm_stream_ps(o, reinterpret_cast<__m128>(v));
#endif
}
template <typename V>
inline void store_stream(double* o, V v) {
#if !defined(PYPATTERN_STREAM_STORES)
  *reinterpret_cast<typename Vec<double>::u*>(o) = v;
#elif defined(__AVX512F__)
  _mm512_stream_pd(o, reinterpret_cast<__m512d>(v));
#elif defined(__AVX__)
  _mm256_stream_pd(o, reinterpret_cast<__m256d>(v));
#else
  _mm_stream_pd(o, reinterpret_cast<__m128d>(v));
#endif
}

// one output's elements [c0, c1): whole steps of kUnroll vectors (STREAM: written past the cache), then single
// vectors and single elements
template <typename T, bool STREAM>
inline void one_output(T* o, const T* b, const T* const* terms, const T* signs, int64_t i0, int64_t i1,
                       int64_t c0, int64_t c1) {
  using V = typename Vec<T>::v;
  using U = typename Vec<T>::u;
  constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
  int64_t k = c0;
  for (; k + kUnroll * L <= c1; k += kUnroll * L) {
    V acc[kUnroll];
#pragma GCC unroll 8
    for (int u = 0; u < kUnroll; ++u) acc[u] = *reinterpret_cast<const U*>(b + k + u * L);
    for (int64_t i = i0; i < i1; ++i) {
      const T* t = terms[i] + k;
      const V s = V{} + signs[i];
#pragma GCC unroll 8
      for (int u = 0; u < kUnroll; ++u) acc[u] += s * *reinterpret_cast<const U*>(t + u * L);
    }
#pragma GCC unroll 8
    for (int u = 0; u < kUnroll; ++u) {
      if constexpr (STREAM)
        store_stream(o + k + u * L, acc[u]);
      else
        *reinterpret_cast<U*>(o + k + u * L) = acc[u];
    }
  }
  for (; k + L <= c1; k += L) {
    V acc = *reinterpret_cast<const U*>(b + k);
    for (int64_t i = i0; i < i1; ++i) acc += (V{} + signs[i]) * *reinterpret_cast<const U*>(terms[i] + k);
    *reinterpret_cast<U*>(o + k) = acc;
  }
  for (; k < c1; ++k) {
    T acc = b[k];
    for (int64_t i = i0; i < i1; ++i) acc += signs[i] * terms[i][k];
    o[k] = acc;
  }
}

template <typename T>
void signed_sums(T* const* out, const T* const* base, const T* const* terms, const int64_t* offsets,
                 const T* signs, int64_t P, int64_t k0, int64_t k1, bool stream) {
  constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int64_t kc = std::max<int64_t>(kChunkBytes / static_cast<int64_t>(sizeof(T)), kUnroll * L);
  for (int64_t c0 = k0; c0 < k1; c0 += kc) {
    const int64_t c1 = std::min(k1, c0 + kc);
    for (int64_t p = 0; p < P; ++p) {
      T* o = out[p];
      // streaming needs every step of kUnroll vectors aligned: c0 - k0 is a multiple of the step
      if (stream && reinterpret_cast<uintptr_t>(o + k0) % kVecBytes == 0)
        one_output<T, true>(o, base[p], terms, signs, offsets[p], offsets[p + 1], c0, c1);
      else
        one_output<T, false>(o, base[p], terms, signs, offsets[p], offsets[p + 1], c0, c1);
    }
  }
#ifdef PYPATTERN_STREAM_STORES
  if (stream) _mm_sfence();  // the streamed stores are ordered before whatever follows (another thread's reads)
#endif
}

}  // namespace

void signed_sums_cpu_f32(float* const* out, const float* const* base, const float* const* terms,
                         const int64_t* offsets, const float* signs, int64_t P, int64_t k0, int64_t k1,
                         bool stream) {
  signed_sums<float>(out, base, terms, offsets, signs, P, k0, k1, stream);
}

void signed_sums_cpu_f64(double* const* out, const double* const* base, const double* const* terms,
                         const int64_t* offsets, const double* signs, int64_t P, int64_t k0, int64_t k1,
                         bool stream) {
  signed_sums<double>(out, base, terms, offsets, signs, P, k0, k1, stream);
}

}  // namespace pypattern
