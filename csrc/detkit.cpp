// Python module entry point of the compiled extension `detkit._C`.
//
// The ops themselves are registered with the PyTorch dispatcher by static
// initialisers (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) in the other translation
// units; importing this module is what loads them. The module also records
// which torch it was compiled against and whether the CUDA kernels are in it,
// so Python can refuse a stale build with a clear message.
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "tuning.h"

#ifndef DETKIT_TORCH_VERSION
#define DETKIT_TORCH_VERSION "unknown"
#endif

namespace detkit {
namespace {
std::atomic<int64_t> columns_budget_bytes{int64_t{256} << 20};
}  // namespace

int64_t cuda_columns_budget_bytes() { return columns_budget_bytes.load(); }

int64_t set_cuda_columns_budget_bytes(int64_t bytes) { return columns_budget_bytes.exchange(bytes); }
}  // namespace detkit

// _set_cuda_columns_budget(bytes: int) -> int: the previous budget. For tests
// of the chunked CUDA path; the CPU kernels do not use it.
static PyObject* set_cuda_columns_budget(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes < 1) {
    PyErr_SetString(PyExc_ValueError, "_set_cuda_columns_budget: bytes must be >= 1");
    return nullptr;
  }
  return PyLong_FromLongLong(detkit::set_cuda_columns_budget_bytes(bytes));
}

static PyMethodDef detkit_methods[] = {
    {"_set_cuda_columns_budget", set_cuda_columns_budget, METH_O,
     "Set the CUDA deform_conv2d column budget in bytes; returns the previous one (tests only)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef detkit_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled detkit ops (registered as torch.ops.detkit.*).", -1, detkit_methods};

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
