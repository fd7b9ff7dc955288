// Row dot products C[m, n] = sum_k a_m[k] g_n[k] of two sets of long rows: the products of many-term dot products
// with few rows on each side (an edge score contraction has a hundred or so source rows, a few dozen gradient rows
// and tens of thousands of terms), where a GEMM library packs the long operand first and runs at half its rate.
// Compiled on its own (see setup.py) with -O3 and no torch headers.
//
// Register blocking: an MR x NR block of C is accumulated in MR * NR vector registers over a chunk of KC terms (MR
// loads of a and NR loads of g for MR * NR fused multiply-adds per vector of terms) and added, as vectors, to the
// block's partial sums; the lanes are summed once at the end. Within a chunk, each block of NR g rows (in L1) walks
// down all the a rows (in L2), so that per vector of terms only the MR loads of a come from L2; the a rows are read
// from memory once per chunk, and each block prefetches its share of the next chunk's a rows while it computes.
// Row tails (M % MR, N % NR) take smaller instances of the same block; the term tail (K % lanes) is summed in
// scalars.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYPATTERN_DOTS_PREFETCH 1
#endif

#include "dots/dots_cpu.h"
#include "simd_vec.h"

#pragma GCC optimize("fp-contract=fast")

namespace pypattern {
namespace {

using simd::kVecBytes;
using simd::keep_in_register;
using simd::Vec;

#if defined(__AVX512F__)
constexpr int kMR = 4, kNR = 6;  // 24 accumulators + 4 rows of a + 1 of g in 32 registers
#else
constexpr int kMR = 3, kNR = 4;  // 12 + 3 + 1 in 16 registers
#endif
// one row's share of a chunk: KC = 2 KiB of terms (a block of g rows, NR x KC, stays in L1 while it walks down the
// a rows); a build may set another with -DPYPATTERN_DOTS_CHUNK_BYTES=...
#ifndef PYPATTERN_DOTS_CHUNK_BYTES
#define PYPATTERN_DOTS_CHUNK_BYTES 2048
#endif
constexpr int64_t kChunkBytes = PYPATTERN_DOTS_CHUNK_BYTES;
constexpr int64_t kNS = 8 * kNR;  // rows of g per panel: the partial sums of a call are M x kNS vectors at most


// P[i * ldp + j] += the lanes of sum_{k0 <= k < k0 + kn} a[i][k] g[j][k] for i < MR, j < NR (kn a multiple of the
// lanes): the block's vector accumulators added to its partial sums. With pn > 0, the lines [pk0, pk0 + pn) terms of
// the a rows' next chunk (which starts kn terms on) are prefetched into L2 as the loop goes, one line per row and step.
template <typename T, int MR, int NR>
void block(const T* const* a, const T* const* g, int64_t k0, int64_t kn, typename Vec<T>::v* P, int64_t ldp,
           int64_t pk0, int64_t pn) {
  using V = typename Vec<T>::v;
  using U = typename Vec<T>::u;
  constexpr int L = kVecBytes / sizeof(T);
  const T* ar[MR];
  const T* gr[NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) ar[i] = a[i] + k0;
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) gr[j] = g[j] + k0;
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  for (int64_t k = 0; k < kn; k += L) {
#ifdef PYPATTERN_DOTS_PREFETCH
    if (k < pn) {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(ar[i] + kn + pk0 + k), _MM_HINT_T1);
    }
#endif
    V av[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) av[i] = *reinterpret_cast<const U*>(ar[i] + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      V gv = *reinterpret_cast<const U*>(gr[j] + k);
      // one load of each g vector into a register (gcc would otherwise fold it into each of the MR
      // multiply-adds as a memory operand: MR loads where one does, and the loop becomes load-bound)
      keep_in_register(gv);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] += av[i] * gv;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) P[i * ldp + j] += acc[i][j];
}

template <typename T>
using BlockFn = void (*)(const T* const*, const T* const*, int64_t, int64_t, typename Vec<T>::v*, int64_t, int64_t,
                         int64_t);

template <typename T, int MR, int... NRs>
constexpr void fill_row(BlockFn<T> (&row)[kNR], std::integer_sequence<int, NRs...>) {
  ((row[NRs] = &block<T, MR, NRs + 1>), ...);
}

template <typename T, int... MRs>
struct Table {
  BlockFn<T> fn[kMR][kNR];
  Table() { (fill_row<T, MRs + 1>(fn[MRs], std::make_integer_sequence<int, kNR>{}), ...); }
};

template <typename T, int... MRs>
const Table<T, MRs...>& table(std::integer_sequence<int, MRs...>) {
  static const Table<T, MRs...> t;
  return t;
}

// The vector-aligned terms [0, Kv) of the rows g[0 .. N) (at most kNS) against every a row, into the partial sums P
// (M x N vectors, zeroed): chunks of KC terms; within a chunk, each block of NR g rows (KC terms each, in L1) walks
// down every block of MR a rows (the chunk's a rows, M x KC, in L2; the first block of g rows reads them from
// memory, and every block prefetches its share of the next chunk's a rows so that the reads from memory overlap the
// multiply-adds).
template <typename T>
void panel(const T* const* a, int64_t M, const T* const* g, int64_t N, int64_t Kv, typename Vec<T>::v* P) {
  constexpr int L = kVecBytes / sizeof(T);
  const auto& fns = table<T>(std::make_integer_sequence<int, kMR>{}).fn;
  const int64_t kc = std::max<int64_t>(kChunkBytes / static_cast<int64_t>(sizeof(T)) / L * L, L);
  const int64_t nb = (N + kNR - 1) / kNR;
  for (int64_t k0 = 0; k0 < Kv; k0 += kc) {
    const int64_t kn = std::min(kc, Kv - k0);
    const int64_t next = std::min(kc, Kv - k0 - kn);
    const int64_t share = ((next + nb - 1) / nb + L - 1) / L * L;
    for (int64_t n0 = 0; n0 < N; n0 += kNR) {
      const int nr = static_cast<int>(std::min<int64_t>(kNR, N - n0));
      const int64_t pk0 = (n0 / kNR) * share, pn = std::max<int64_t>(0, std::min(next - pk0, share));
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        fns[mr - 1][nr - 1](a + m0, g + n0, k0, kn, P + m0 * N + n0, N, pk0, pn);
      }
    }
  }
}

template <typename T>
void row_dots(const T* const* a, int64_t M, const T* const* g, int64_t N, int64_t K, T* out, int64_t ldo) {
  using V = typename Vec<T>::v;
  constexpr int L = kVecBytes / sizeof(T);
  for (int64_t i = 0; i < M; ++i) std::fill(out + i * ldo, out + i * ldo + N, T(0));
  if (M == 0 || N == 0 || K == 0) return;
  const int64_t Kv = K - K % L;
  std::vector<V> P(static_cast<size_t>(M * std::min<int64_t>(N, kNS)));
  for (int64_t s0 = 0; s0 < N; s0 += kNS) {  // at most kNS rows of g at a time: P stays small
    const int64_t ns = std::min<int64_t>(kNS, N - s0);
    std::fill(P.begin(), P.end(), V{});
    if (Kv) panel<T>(a, M, g + s0, ns, Kv, P.data());
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < ns; ++j) {
        alignas(kVecBytes) T lanes[L];
        std::memcpy(lanes, &P[i * ns + j], sizeof(lanes));
#pragma GCC unroll 8
        for (int w = L / 2; w > 0; w /= 2)  // pairwise: log2(L) vector adds
#pragma GCC unroll 16
          for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
        T s = lanes[0];
        for (int64_t k = Kv; k < K; ++k) s += a[i][k] * g[s0 + j][k];
        out[i * ldo + s0 + j] = s;
      }
    }
  }
}

}  // namespace

void row_dots_cpu_f32(const float* const* a, int64_t M, const float* const* g, int64_t N, int64_t K, float* out,
                      int64_t ldo) {
  row_dots<float>(a, M, g, N, K, out, ldo);
}

void row_dots_cpu_f64(const double* const* a, int64_t M, const double* const* g, int64_t N, int64_t K,
                      double* out, int64_t ldo) {
  row_dots<double>(a, M, g, N, K, out, ldo);
}

}  // namespace pypattern
