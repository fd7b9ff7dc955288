// Signed sums: schema (a TORCH_LIBRARY_FRAGMENT of pypattern) and the CPU kernel of pypattern::signed_sums_ (maths
// in pypattern/ops/sums/):
//   out[p] = base[p] + signs[i0] * terms[i0] + ... + signs[i1 - 1] * terms[i1 - 1]
// with i0 = offsets[p] and i1 = offsets[p + 1], for same-shaped tensors, each sign +1 or -1, summed left to right
// in the dtype. Every check is made here as in pypattern/ops/sums/op.py (the errors name the argument), so that the
// Python layer reads no tensor's metadata on this path (a call can take thousands of terms).
//
// Layout: the dimensions of size 1 are dropped, then the trailing dimensions that are contiguous in every tensor
// are taken as one run of elements ("inner"); the other dimensions ("rows", any strides) are walked per tensor. A
// tensor whose last dimension does not have unit stride is copied (an input) or computed in a contiguous buffer and
// copied back (an output). The inner runs are split over torch's intra-op threads; each output element is one
// thread's sum, so the result does not depend on the number of threads.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "math_bits.h"
#include "sums/sums_cpu.h"

namespace pypattern {
namespace {

// a block of each inner run per task when the runs are split over threads (a multiple of every chunk size)
constexpr int64_t kGrain = 1 << 15;
// outputs of at least this many bytes in all are written past the cache (see sums_cpu_fast.cpp)
constexpr int64_t kStreamBytes = 8 << 20;

std::string shape_str(at::IntArrayRef s) {  // as Python prints a shape: (2, 3), (5,), ()
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

std::string dtype_str(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

struct Arg {
  const char* name;
  size_t index;
};

std::string arg_str(const Arg& a) { return std::string(a.name) + "[" + std::to_string(a.index) + "]"; }

void check_like(const at::Tensor& t, const Arg& a, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.defined(), "signed_sums: ", arg_str(a), " is an undefined tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type() && t.device() == ref.device(), "signed_sums: ", arg_str(a),
                    " is ", dtype_str(t.scalar_type()), " on ", t.device(), ", base[0] is ",
                    dtype_str(ref.scalar_type()), " on ", ref.device(), "; they must match");
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "signed_sums: ", arg_str(a), " has shape ", shape_str(t.sizes()),
                    "; expected ", shape_str(ref.sizes()), " as base[0]'s");
}

// the bytes [lo, hi) that a non-empty tensor's elements span
struct Span {
  uintptr_t lo, hi;
  Arg arg;
};

Span span_of(const at::Tensor& t, const Arg& a) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size()), a};
}

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.strides() == b.strides();
}

// whether two elements of t are one memory location, for a layout ATen's test calls too hard to decide (strides
// that do not nest, e.g. (3, 3) with strides (2, 1)): nested strides are disjoint; otherwise the elements' offsets
// are listed and compared (up to kListLimit elements; past it the output is refused as undecided)
constexpr int64_t kListLimit = int64_t{1} << 24;

bool folds_onto_itself(const at::Tensor& t, const Arg& a) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 0;
  bool nested = true;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i].first == 0 || (i && dims[i].first == dims[i - 1].first)) return true;
    if (dims[i].first <= extent) nested = false;
    extent += (dims[i].second - 1) * dims[i].first;
  }
  if (nested) return false;
  TORCH_CHECK_VALUE(t.numel() <= kListLimit, "signed_sums: ", arg_str(a), " has strides ", shape_str(t.strides()),
                    " for shape ", shape_str(t.sizes()),
                    " whose elements may share memory (too many to check); give a contiguous output");
  std::vector<int64_t> offsets{0};
  offsets.reserve(static_cast<size_t>(t.numel()));
  for (const auto& [stride, size] : dims) {
    const size_t n = offsets.size();
    for (int64_t j = 1; j < size; ++j)
      for (size_t i = 0; i < n; ++i) offsets.push_back(offsets[i] + j * stride);
  }
  std::sort(offsets.begin(), offsets.end());
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end();
}

// out[p] may be base[p] itself; otherwise no output may share a byte with another output, a base or a term
void check_overlap(at::TensorList out, at::TensorList base, at::TensorList terms) {
  std::vector<Span> outs;
  outs.reserve(out.size());
  for (size_t p = 0; p < out.size(); ++p) {
    const at::MemOverlap self_overlap = at::has_internal_overlap(out[p]);
    TORCH_CHECK_VALUE(self_overlap != at::MemOverlap::Yes, "signed_sums: out[", p,
                      "] has elements that share memory (an expanded view); give a tensor that can be written");
    TORCH_CHECK_VALUE(self_overlap != at::MemOverlap::TooHard || !folds_onto_itself(out[p], {"out", p}),
                      "signed_sums: out[", p, "] has elements that share memory (its strides ",
                      shape_str(out[p].strides()), " fold its shape ", shape_str(out[p].sizes()),
                      " onto itself); give a tensor that can be written");
    if (out[p].numel()) outs.push_back(span_of(out[p], {"out", p}));
  }
  std::sort(outs.begin(), outs.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t j = 1; j < outs.size(); ++j)
    TORCH_CHECK_VALUE(outs[j].lo >= outs[j - 1].hi, "signed_sums: ", arg_str(outs[j - 1].arg), " and ",
                      arg_str(outs[j].arg),
                      " share memory (their address ranges overlap); give outputs in memory apart");
  // the outputs are disjoint and sorted: those overlapping [lo, hi) are a run starting at the first with hi > lo
  auto visit = [&](const at::Tensor& t, const Arg& a, auto&& ok) {
    if (!t.numel() || outs.empty()) return;
    const Span s = span_of(t, a);
    auto it = std::partition_point(outs.begin(), outs.end(), [&](const Span& o) { return o.hi <= s.lo; });
    for (; it != outs.end() && it->lo < s.hi; ++it)
      TORCH_CHECK_VALUE(ok(*it), "signed_sums: ", arg_str(a), " shares memory with ", arg_str(it->arg),
                        " (their address ranges overlap); an output may be its own base (the same view) but must not "
                        "overlap a term or another output's base");
  };
  for (size_t p = 0; p < base.size(); ++p)
    visit(base[p], {"base", p}, [&](const Span& o) { return o.arg.index == p && same_view(out[p], base[p]); });
  for (size_t i = 0; i < terms.size(); ++i) visit(terms[i], {"terms", i}, [](const Span&) { return false; });
}

void check_args(at::TensorList out, at::TensorList base, at::TensorList terms, at::IntArrayRef offsets,
                at::IntArrayRef signs) {
  const size_t P = base.size(), N = terms.size();
  TORCH_CHECK_VALUE(out.size() == P, "signed_sums: out has ", out.size(), " tensors, base has ", P,
                    "; give one output per base");
  TORCH_CHECK_VALUE(offsets.size() == P + 1, "signed_sums: offsets has ", offsets.size(), " entries; expected ",
                    P + 1, " (one more than base)");
  TORCH_CHECK_VALUE(offsets[0] == 0, "signed_sums: offsets[0] is ", offsets[0], "; expected 0");
  for (size_t p = 0; p < P; ++p)
    TORCH_CHECK_VALUE(offsets[p + 1] >= offsets[p], "signed_sums: offsets[", p + 1, "] = ", offsets[p + 1],
                      " is less than offsets[", p, "] = ", offsets[p], "; offsets must not decrease");
  TORCH_CHECK_VALUE(offsets[P] == static_cast<int64_t>(N), "signed_sums: offsets[-1] is ", offsets[P], "; expected ",
                    N, " (the number of terms)");
  TORCH_CHECK_VALUE(signs.size() == N, "signed_sums: signs has ", signs.size(), " entries; expected ", N,
                    " (one per term)");
  for (size_t i = 0; i < N; ++i)
    TORCH_CHECK_VALUE(signs[i] == 1 || signs[i] == -1, "signed_sums: signs[", i, "] is ", signs[i],
                      "; each sign must be 1 or -1");
  if (P == 0) return;
  const at::Tensor& ref = base[0];
  for (size_t p = 0; p < P; ++p) check_like(base[p], {"base", p}, ref);
  for (size_t p = 0; p < P; ++p) check_like(out[p], {"out", p}, ref);
  for (size_t i = 0; i < N; ++i) check_like(terms[i], {"terms", i}, ref);
  check_overlap(out, base, terms);
}

bool unit_last(const at::Tensor& t) {  // unit stride along the last dimension of more than one element
  for (int64_t d = t.dim() - 1; d >= 0; --d)
    if (t.size(d) != 1) return t.stride(d) == 1;
  return true;
}

template <typename T>
void run(const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& base,
         const std::vector<at::Tensor>& terms, at::IntArrayRef offsets, at::IntArrayRef signs) {
  const int64_t P = static_cast<int64_t>(out.size()), N = static_cast<int64_t>(terms.size());
  // the layout shared by every tensor: `inner` trailing elements contiguous in all, then rows of any strides
  std::vector<const at::Tensor*> all;
  all.reserve(2 * P + N);
  for (const auto& t : out) all.push_back(&t);
  for (const auto& t : base) all.push_back(&t);
  for (const auto& t : terms) all.push_back(&t);
  std::vector<int64_t> dims;  // the dimensions of more than one element, in order
  for (int64_t d = 0; d < out[0].dim(); ++d)
    if (out[0].size(d) != 1) dims.push_back(d);
  int64_t inner = 1;
  size_t nrow = dims.size();  // dims[0 .. nrow) are walked as rows
  while (nrow > 0) {
    const int64_t d = dims[nrow - 1];
    bool contiguous = true;
    for (const at::Tensor* t : all) contiguous = contiguous && t->stride(d) == inner;
    if (!contiguous) break;
    inner *= out[0].size(d);
    --nrow;
  }
  int64_t rows = 1;
  for (size_t j = 0; j < nrow; ++j) rows *= out[0].size(dims[j]);

  std::vector<T*> op(P);
  std::vector<const T*> bp(P), tp(N);
  for (int64_t p = 0; p < P; ++p) op[p] = out[p].mutable_data_ptr<T>();
  for (int64_t p = 0; p < P; ++p) bp[p] = base[p].const_data_ptr<T>();
  for (int64_t i = 0; i < N; ++i) tp[i] = terms[i].const_data_ptr<T>();
  std::vector<T> sg(signs.begin(), signs.end());
  const bool stream = P * out[0].numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  auto kernel = [&](T* const* o, const T* const* b, const T* const* t, int64_t k0, int64_t k1) {
    if constexpr (std::is_same_v<T, float>)
      signed_sums_cpu_f32(o, b, t, offsets.data(), sg.data(), P, k0, k1, stream);
    else
      signed_sums_cpu_f64(o, b, t, offsets.data(), sg.data(), P, k0, k1, stream);
  };
  if (rows == 1) {
    at::parallel_for(0, (inner + kGrain - 1) / kGrain, 1, [&](int64_t b0, int64_t b1) {
      kernel(op.data(), bp.data(), tp.data(), b0 * kGrain, std::min(inner, b1 * kGrain));
    });
    return;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / inner), [&](int64_t r0, int64_t r1) {
    std::vector<T*> o(P);
    std::vector<const T*> b(P), t(N);
    std::vector<int64_t> idx(nrow);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t rest = r;
      for (size_t j = nrow; j-- > 0;) {
        idx[j] = rest % out[0].size(dims[j]);
        rest /= out[0].size(dims[j]);
      }
      auto at_row = [&](const at::Tensor& x) {
        int64_t off = 0;
        for (size_t j = 0; j < nrow; ++j) off += idx[j] * x.stride(dims[j]);
        return off;
      };
      for (int64_t p = 0; p < P; ++p) o[p] = op[p] + at_row(out[p]);
      for (int64_t p = 0; p < P; ++p) b[p] = bp[p] + at_row(base[p]);
      for (int64_t i = 0; i < N; ++i) t[i] = tp[i] + at_row(terms[i]);
      kernel(o.data(), b.data(), t.data(), 0, inner);
    }
  });
}

void signed_sums_cpu(at::TensorList out, at::TensorList base, at::TensorList terms, at::IntArrayRef offsets,
                     at::IntArrayRef signs) {
  check_args(out, base, terms, offsets, signs);
  for (size_t p = 0; p < out.size(); ++p) check_writable(out[p], "signed_sums", "out", static_cast<int64_t>(p));
  if (base.empty()) return;
  const at::Tensor& ref = base[0];
  TORCH_CHECK_VALUE(ref.device().is_cpu(), "signed_sums (cpu): base[0] is on ", ref.device(), ", not the CPU");
  TORCH_CHECK_VALUE(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
                    "signed_sums (cpu): base[0] has dtype ", dtype_str(ref.scalar_type()),
                    "; supported are torch.float32 and torch.float64");
  if (ref.numel() == 0) return;
  // inputs without unit stride along the last dimension are copied; such outputs computed in a contiguous buffer
  std::vector<at::Tensor> o(out.begin(), out.end()), b(base.begin(), base.end()), t(terms.begin(), terms.end());
  std::vector<size_t> back;
  for (size_t p = 0; p < o.size(); ++p)
    if (!unit_last(o[p])) {
      back.push_back(p);
      o[p] = at::empty(ref.sizes(), ref.options().memory_format(at::MemoryFormat::Contiguous));
    }
  for (auto& x : b) {
    x = read_values(x);
    if (!unit_last(x)) x = x.contiguous();
  }
  for (auto& x : t) {
    x = read_values(x);
    if (!unit_last(x)) x = x.contiguous();
  }
  if (ref.scalar_type() == at::kFloat)
    run<float>(o, b, t, offsets, signs);
  else
    run<double>(o, b, t, offsets, signs);
  for (size_t p : back) out[p].copy_(o[p]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pypattern, m) {
  m.def("signed_sums_(Tensor(a!)[] out, Tensor[] base, Tensor[] terms, int[] offsets, int[] signs) -> ()");
}

TORCH_LIBRARY_IMPL(pypattern, CPU, m) { m.impl("signed_sums_", &signed_sums_cpu); }

// the lazy negation and conjugation bits reach the kernels, which resolve what they read (math_bits.h)
PYPATTERN_MATH_BITS_FALLTHROUGH("signed_sums_")

}  // namespace pypattern
