// Lazy negation and conjugation (torch's is_neg() / is_conj() bits, e.g. torch._neg_view(t) or z.conj().imag):
// such a tensor holds its values negated (or conjugated) in memory, and a kernel that reads data_ptr() directly
// would see the wrong signs. torch's own fallback for these bits resolves Tensor and Tensor[] arguments but not the
// optional tensors of a Tensor?[] list (the masks), and it cannot handle the in-place ops' written arguments (an
// op returning () or a flags tensor makes it fail an internal assert or corrupt memory). The in-place ops
// therefore let the bits fall through to their kernels (PYPATTERN_MATH_BITS_FALLTHROUGH), which take every tensor
// they only read as its values (read_values) and refuse a tensor they write that carries a bit (check_writable).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace pypattern {

// t's values in memory: a copy when t carries a lazy negation or conjugation, else t itself.
inline at::Tensor read_values(const at::Tensor& t) {
  if (!t.defined()) return t;
  return t.resolve_conj().resolve_neg();
}

// A tensor the op writes through its raw pointer may carry neither bit: the kernel would store the values with
// their signs flipped. what: the argument's name, index: its position in a list (or -1).
inline void check_writable(const at::Tensor& t, const char* op, const char* what, int64_t index = -1) {
  if (!t.defined() || !(t.is_neg() || t.is_conj())) return;
  const std::string name = index < 0 ? std::string(what) : std::string(what) + "[" + std::to_string(index) + "]";
  TORCH_CHECK_VALUE(false, op, ": ", name, " is a ", t.is_neg() ? "negative" : "conjugate",
                    " view (torch applies the ", t.is_neg() ? "negation" : "conjugation",
                    " lazily); the op writes its memory directly; give a tensor without it (.resolve_neg() / "
                    ".resolve_conj() makes one)");
}

}  // namespace pypattern

// Lets the Negative and Conjugate dispatch keys fall through to the backend kernels for the listed ops (called in
// a TORCH_LIBRARY_IMPL(pypattern, Negative / Conjugate, m) block).
#define PYPATTERN_MATH_BITS_FALLTHROUGH(op_name)                                            \
  TORCH_LIBRARY_IMPL(pypattern, Negative, m) { m.impl(op_name, torch::CppFunction::makeFallthrough()); } \
  TORCH_LIBRARY_IMPL(pypattern, Conjugate, m) { m.impl(op_name, torch::CppFunction::makeFallthrough()); }
