// The Python module medcam_fast._C. Importing it runs the TORCH_LIBRARY registrations of every op;
// the module itself only carries build facts (no pybind11, so it needs only libtorch).
#include <Python.h>

#ifndef MEDCAM_FAST_WITH_CUDA
#define MEDCAM_FAST_WITH_CUDA 0
#endif

static PyModuleDef medcam_fast_module = {
    PyModuleDef_HEAD_INIT, "_C", "medcam_fast compiled ops (registered under torch.ops.medcam_fast).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&medcam_fast_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "torch_version", MEDCAM_FAST_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", MEDCAM_FAST_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
