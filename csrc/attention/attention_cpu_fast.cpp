// Prefix attention on the CPU: each cell's queries attend the keys shared by every cell (positions 0 .. P - 1) and
// the cell's own (P .. P + Rk - 1), in one pass per key/value head and example. Compiled on its own (see setup.py)
// with -O3 and no torch headers.
//
// Per task (an example and a cell, consecutive tasks of one example sharing its keys): the shared keys of every
// key/value head are copied once per example into transposed buffers (dh rows of key positions, padded to whole
// vectors; tiles of one vector of keys by one vector of dh transposed in registers) and the shared values into row
// buffers; per cell and key/value head, the cell's own keys and values are copied after them. The queries of the
// query heads that read this key/value head are read in place four rows at a time: their scores against a vector of
// keys are four vector accumulators over dh broadcast multiply-adds (the keys' vector loaded once for the four rows),
// only up to the last key that one of the four may attend; each row's softmax is a pass over its scores (masked ones
// set to -inf by a select, exp branch-free, fast_exp.h) and one over the exponentials (times the reciprocal of their
// sum); the values are mixed four rows by up to four vectors of dh at a time (sixteen accumulators, each value
// vector loaded once for the four rows), stored straight into the output when dh is a whole number of vectors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/attention_cpu.h"
#include "fast_exp.h"
#include "simd_vec.h"

#pragma GCC optimize("fp-contract=fast")

namespace pypattern {
namespace {

using simd::kVecBytes;
using simd::keep_in_register;
using simd::Vec;

constexpr int kRows = 4;     // query rows per block
constexpr int kMixVecs = 4;  // vectors of dh per pass of the mix

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }


template <typename T>
struct Sizes {
  static constexpr int64_t L = kVecBytes / sizeof(T);
  // keys padded to whole vectors (TkP); a row of the transposed keys has one vector of slack after them (KtS), so
  // that a tile of keys starting anywhere below Tk can be stored whole
  int64_t Tk, TkP, KtS, dhP;
  explicit Sizes(const PrefixAttention<T>& a)
      : Tk(a.P + a.Rk),
        TkP(round_up(std::max<int64_t>(a.P + a.Rk, 1), L)),
        KtS(round_up(std::max<int64_t>(a.P + a.Rk, 1), L) + L),
        dhP(round_up(a.dh, L)) {}
  // per key/value head Kt (dh x KtS) and Vl (Tk x dhP); the mask as 0/1 (Rq x TkP); S (kRows x TkP), Z (kRows x dhP)
  int64_t work(const PrefixAttention<T>& a) const {
    return a.Hkv * (a.dh * KtS + Tk * dhP) + a.Rq * TkP + kRows * TkP + kRows * dhP;
  }
};

// The integer vector of T's width, the index type of __builtin_shuffle.
template <typename T>
struct Index {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I v __attribute__((vector_size(kVecBytes)));
};

// One stage of an in-register transpose of L rows of L lanes: rows i and i + s (i & s == 0) swap their off-diagonal
// blocks of s lanes (row i's lanes k with k & s set take row i + s's lanes k - s, and row i + s's lanes k without it
// take row i's lanes k + s). The stages s = L / 2, ..., 1 together transpose the rows.
template <typename T, int s>
inline void transpose_stage(typename Vec<T>::v* v) {
  constexpr int L = kVecBytes / sizeof(T);
  using IV = typename Index<T>::v;
  IV ma, mb;
#pragma GCC unroll 16
  for (int k = 0; k < L; ++k) {
    ma[k] = (k & s) ? L + k - s : k;
    mb[k] = (k & s) ? L + k : k + s;
  }
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i)
    if (!(i & s)) {
      const auto a = v[i], b = v[i + s];
      v[i] = __builtin_shuffle(a, b, ma);
      v[i + s] = __builtin_shuffle(a, b, mb);
    }
}

template <typename T>
inline void transpose(typename Vec<T>::v* v) {
  constexpr int L = kVecBytes / sizeof(T);
  if constexpr (L >= 16) transpose_stage<T, 8>(v);
  if constexpr (L >= 8) transpose_stage<T, 4>(v);
  if constexpr (L >= 4) transpose_stage<T, 2>(v);
  if constexpr (L >= 2) transpose_stage<T, 1>(v);
}

// Kt[d * KtS + j0 + t] = rows[t][d] for d < dh and t < nrows, and 0 for nrows <= t < L (columns j0 .. j0 + L - 1;
// rows of dh elements).
template <typename T>
void put_keys(T* __restrict Kt, int64_t KtS, int64_t j0, const T* const* rows, int nrows, int64_t dh) {
  using V = typename Vec<T>::v;
  using U = typename Vec<T>::u;
  constexpr int L = kVecBytes / sizeof(T);
  int64_t d0 = 0;
  for (; d0 + L <= dh; d0 += L) {
    V v[L];
#pragma GCC unroll 16
    for (int t = 0; t < L; ++t) v[t] = t < nrows ? *reinterpret_cast<const U*>(rows[t] + d0) : V{};
    transpose<T>(v);
#pragma GCC unroll 16
    for (int t = 0; t < L; ++t) *reinterpret_cast<U*>(Kt + (d0 + t) * KtS + j0) = v[t];
  }
  for (int64_t d = d0; d < dh; ++d)
    for (int t = 0; t < L; ++t) Kt[d * KtS + j0 + t] = t < nrows ? rows[t][d] : T(0);
}

// S[i * TkP + j] = sum_d q[i][d] Kt[d * KtS + j] for i < NR and j < jend (a multiple of the lanes)
template <typename T, int NR>
void scores(const T* const* q, int64_t dh, const T* __restrict Kt, int64_t KtS, int64_t jend, T* __restrict S,
            int64_t TkP) {
  using V = typename Vec<T>::v;
  using U = typename Vec<T>::u;
  constexpr int64_t L = kVecBytes / sizeof(T);
  const T* qr[NR];
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i) qr[i] = q[i];
  int64_t j = 0;
  for (; j + 2 * L <= jend; j += 2 * L) {
    V a0[NR], a1[NR];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) a0[i] = a1[i] = V{};
#pragma GCC unroll 4
    for (int64_t d = 0; d < dh; ++d) {
      V k0 = *reinterpret_cast<const U*>(Kt + d * KtS + j);
      V k1 = *reinterpret_cast<const U*>(Kt + d * KtS + j + L);
      // each key vector loaded once into a register (gcc would otherwise fold it into each row's multiply-add as a
      // memory operand: NR loads where one does, and the loop becomes load-bound)
      keep_in_register(k0);
      keep_in_register(k1);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const T qv = qr[i][d];
        a0[i] += qv * k0;
        a1[i] += qv * k1;
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      *reinterpret_cast<U*>(S + i * TkP + j) = a0[i];
      *reinterpret_cast<U*>(S + i * TkP + j + L) = a1[i];
    }
  }
  for (; j < jend; j += L) {
    V a0[NR];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) a0[i] = V{};
#pragma GCC unroll 4
    for (int64_t d = 0; d < dh; ++d) {
      V k0 = *reinterpret_cast<const U*>(Kt + d * KtS + j);
      keep_in_register(k0);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) a0[i] += qr[i][d] * k0;
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) *reinterpret_cast<U*>(S + i * TkP + j) = a0[i];
  }
}

// One row's pattern in place over its first n scores s (masked where m[j] != 0): false when it may attend no key
// (the max is -inf), which softmax turns into NaN.
template <typename T>
bool softmax_row(T* __restrict s, const T* __restrict m, int64_t n, T scale) {
  using P = fast_exp::ExpParams<T>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  T mx = ninf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const T v = m[j] != T(0) ? ninf : s[j] * scale;
    s[j] = v;
    mx = std::max(mx, v);
  }
  if (mx == ninf) return false;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T d = s[j] - mx;  // <= 0, -inf where masked, NaN where a score is NaN
    const T e = d < P::lo ? T(0) : fast_exp::exp_clamped<T>(std::max(d, P::lo));
    s[j] = e;
    sum += e;
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return true;
}

// z[i][d0 + v * L ...] = sum_{j < n} p[i][j] Vr[j][d0 + v * L ...] for i < NR, v < NV (value rows Vr[j] of whole
// vectors)
template <typename T, int NR, int NV>
void mix(const T* const* p, const T* const* Vr, int64_t d0, int64_t n, T* const* z) {
  using V = typename Vec<T>::v;
  using U = typename Vec<T>::u;
  constexpr int64_t L = kVecBytes / sizeof(T);
  V acc[NR][NV];
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t j = 0; j < n; ++j) {
    V x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = *reinterpret_cast<const U*>(Vr[j] + d0 + v * L);
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
      const T pij = p[i][j];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += pij * x[v];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(z[i] + d0 + v * L) = acc[i][v];
}

template <typename T, int NR>
void mix_rows(const T* const* p, const T* const* Vr, int64_t dhP, int64_t n, T* const* z) {
  constexpr int64_t L = kVecBytes / sizeof(T);
  for (int64_t d0 = 0; d0 < dhP; d0 += kMixVecs * L) {
    switch (std::min<int64_t>(kMixVecs, (dhP - d0) / L)) {
      case 1: mix<T, NR, 1>(p, Vr, d0, n, z); break;
      case 2: mix<T, NR, 2>(p, Vr, d0, n, z); break;
      case 3: mix<T, NR, 3>(p, Vr, d0, n, z); break;
      default: mix<T, NR, 4>(p, Vr, d0, n, z); break;
    }
  }
}

template <typename T>
void scores_block(int nr, const T* const* q, int64_t dh, const T* Kt, int64_t KtS, int64_t jend, T* S, int64_t TkP) {
  switch (nr) {
    case 1: scores<T, 1>(q, dh, Kt, KtS, jend, S, TkP); break;
    case 2: scores<T, 2>(q, dh, Kt, KtS, jend, S, TkP); break;
    case 3: scores<T, 3>(q, dh, Kt, KtS, jend, S, TkP); break;
    default: scores<T, 4>(q, dh, Kt, KtS, jend, S, TkP); break;
  }
}

template <typename T>
void mix_block(int nr, const T* const* p, const T* const* Vr, int64_t dhP, int64_t n, T* const* z) {
  switch (nr) {
    case 1: mix_rows<T, 1>(p, Vr, dhP, n, z); break;
    case 2: mix_rows<T, 2>(p, Vr, dhP, n, z); break;
    case 3: mix_rows<T, 3>(p, Vr, dhP, n, z); break;
    default: mix_rows<T, 4>(p, Vr, dhP, n, z); break;
  }
}

template <typename T>
void run(const PrefixAttention<T>& a, int64_t t0, int64_t t1, T* work) {
  const Sizes<T> sz(a);
  const int64_t Tk = sz.Tk, TkP = sz.TkP, KtS = sz.KtS, dhP = sz.dhP, dh = a.dh, L = Sizes<T>::L;
  const int64_t G = a.H / a.Hkv, R = a.Rq * G;
  // dh a whole number of vectors: the values are read in place and the mix stores straight into the output
  const bool whole = dh == dhP;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  T* const Kt0 = work;                     // per key/value head: dh x KtS
  T* const Vl0 = Kt0 + a.Hkv * dh * KtS;   // per key/value head: Tk x dhP (values copied and padded, !whole)
  T* const M = Vl0 + a.Hkv * Tk * dhP;     // Rq x TkP: 1 where masked (and past the keys)
  T* const S = M + a.Rq * TkP;
  T* const Z = S + kRows * TkP;
  // the padding of the keys and of the values stays zero
  std::fill(Kt0, Kt0 + a.Hkv * dh * KtS, T(0));
  for (int64_t hk = 0; hk < a.Hkv; ++hk)
    for (int64_t j = 0; j < Tk; ++j) std::fill(Vl0 + (hk * Tk + j) * dhP + dh, Vl0 + (hk * Tk + j + 1) * dhP, T(0));
  std::vector<const T*> Vr0(a.Hkv * Tk);  // per key/value head, the value rows
  std::vector<int64_t> ends(a.Rq);        // per query: the keys from ends[r] on are masked
  for (int64_t r = 0; r < a.Rq; ++r) {
    const uint8_t* m = a.mask + r * Tk;
    for (int64_t j = 0; j < Tk; ++j) M[r * TkP + j] = m[j] ? T(1) : T(0);
    std::fill(M + r * TkP + Tk, M + (r + 1) * TkP, T(1));
    int64_t e = Tk;
    while (e > 0 && m[e - 1]) --e;
    ends[r] = e;
  }
  // keys start .. start + count - 1 (at columns j0 ..) of head hk, row i at k + i * ks, values at v + i * vs
  auto put = [&](int64_t hk, int64_t j0, const T* k, int64_t ks, const T* v, int64_t vs, int64_t count) {
    T* Kt = Kt0 + hk * dh * KtS;
    const T* rows[Sizes<T>::L];
    for (int64_t i0 = 0; i0 < count; i0 += L) {
      const int nrows = static_cast<int>(std::min<int64_t>(L, count - i0));
      for (int t = 0; t < nrows; ++t) rows[t] = k + (i0 + t) * ks;
      put_keys<T>(Kt, KtS, j0 + i0, rows, nrows, dh);
    }
    for (int64_t i = 0; i < count; ++i) {
      const T* row = v + i * vs;
      if (!whole) {
        T* copy = Vl0 + (hk * Tk + j0 + i) * dhP;
        std::memcpy(copy, row, dh * sizeof(T));
        row = copy;
      }
      Vr0[hk * Tk + j0 + i] = row;
    }
  };
  int64_t filled = -1;  // the example whose shared keys the buffers hold
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / a.C, c = t % a.C;
    if (b != filled) {
      for (int64_t hk = 0; hk < a.Hkv; ++hk)
        put(hk, 0, a.kp + b * a.skp[0] + hk * a.skp[2], a.skp[1], a.vp + b * a.svp[0] + hk * a.svp[2], a.svp[1],
            a.P);
      filled = b;
    }
    for (int64_t hk = 0; hk < a.Hkv; ++hk) {
      const T* Kt = Kt0 + hk * dh * KtS;
      const T* const* Vr = Vr0.data() + hk * Tk;
      put(hk, a.P, a.kn + c * a.skn[0] + b * a.skn[1] + hk * a.skn[3], a.skn[2],
          a.vn + c * a.svn[0] + b * a.svn[1] + hk * a.svn[3], a.svn[2], a.Rk);
      for (int64_t i0 = 0; i0 < R; i0 += kRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kRows, R - i0));
        // rows (r, g) in r-major order: query head hk * G + g of query r
        const T* q[kRows];
        T* o[kRows];
        T* z[kRows];
        int64_t n = 0;  // keys that one of the rows may attend lie below n
        for (int i = 0; i < nr; ++i) {
          const int64_t r = (i0 + i) / G, g = (i0 + i) % G;
          q[i] = a.q + c * a.sq[0] + b * a.sq[1] + r * a.sq[2] + (hk * G + g) * a.sq[3];
          o[i] = a.out + (((c * a.B + b) * a.Rq + r) * a.H + hk * G + g) * dh;
          z[i] = whole ? o[i] : Z + i * dhP;
          n = std::max(n, ends[r]);
        }
        if (n == 0) {  // no key for any of the rows
          for (int i = 0; i < nr; ++i) std::fill(o[i], o[i] + dh, Tk == 0 ? T(0) : nan);
          continue;
        }
        scores_block<T>(nr, q, dh, Kt, KtS, round_up(n, L), S, TkP);
        const T* prow[kRows];
        bool live[kRows];
        for (int i = 0; i < nr; ++i) {
          const int64_t r = (i0 + i) / G;
          prow[i] = S + i * TkP;
          // over whole vectors: the scores past n are masked for every row of the block (or past the keys)
          live[i] = ends[r] > 0 && softmax_row<T>(S + i * TkP, M + r * TkP, round_up(n, L), a.scale);
          if (!live[i]) std::fill(S + i * TkP, S + i * TkP + n, T(0));
        }
        mix_block<T>(nr, prow, Vr, dhP, n, z);
        for (int i = 0; i < nr; ++i) {
          if (!live[i])
            std::fill(o[i], o[i] + dh, nan);
          else if (!whole)
            std::memcpy(o[i], z[i], dh * sizeof(T));
        }
      }
    }
  }
}

}  // namespace

int64_t prefix_attention_work_f32(const PrefixAttention<float>& a) { return Sizes<float>(a).work(a); }
int64_t prefix_attention_work_f64(const PrefixAttention<double>& a) { return Sizes<double>(a).work(a); }
void prefix_attention_cpu_f32(const PrefixAttention<float>& a, int64_t t0, int64_t t1, float* work) {
  run<float>(a, t0, t1, work);
}
void prefix_attention_cpu_f64(const PrefixAttention<double>& a, int64_t t0, int64_t t1, double* work) {
  run<double>(a, t0, t1, work);
}

}  // namespace pypattern
