// The pypattern operator namespace, and an empty Python module so that `import pypattern._C` loads this library
// (which registers the ops, called as torch.ops.pypattern.<op>). Each kernel family in csrc/<family>/ adds its
// schema with TORCH_LIBRARY_FRAGMENT (in <family>_cpu.cpp) and its kernels with TORCH_LIBRARY_IMPL, CPU in
// <family>_cpu.cpp and CUDA in <family>_cuda.cpp.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pypattern, m) {}

static struct PyModuleDef pypattern_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pypattern_c_module); }
