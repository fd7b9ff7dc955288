// Operator schemas of the pypattern namespace, and an empty Python module so that `import pypattern._C`
// loads this library (which registers the ops, called as torch.ops.pypattern.<op>).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pypattern, m) {
  // Returns one int32 per tensor: 1 when that tensor's gradient held a NaN or Inf (its entries were left as
  // they were), else 0.
  m.def(
      "sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] anchors, Tensor?[] masks, float step_size, "
      "float nbeta, float localization, float weight_decay, float noise_scale, float? bounding_box, int seed, "
      "int step) -> Tensor");
}

static struct PyModuleDef pypattern_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pypattern_c_module); }
