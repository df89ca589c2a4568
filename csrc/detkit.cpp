// Python module entry point of the compiled extension `detkit._C`.
//
// The ops themselves are registered with the PyTorch dispatcher by static
// initialisers (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) in the other translation
// units; importing this module is what loads them. The module also records
// which torch it was compiled against and whether the CUDA kernels are in it,
// so Python can refuse a stale build with a clear message.
#include <Python.h>
#include <torch/library.h>

#ifndef DETKIT_TORCH_VERSION
#define DETKIT_TORCH_VERSION "unknown"
#endif

static struct PyModuleDef detkit_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled detkit ops (registered as torch.ops.detkit.*).", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&detkit_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", DETKIT_TORCH_VERSION);
#ifdef DETKIT_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
