// Python module stub of the extension `longvideo._C` (setup.py build) / `longvideo_C` (JIT build).
// The kernels register themselves as private ops `longvideo::_<op>_cuda` through
// TORCH_LIBRARY_FRAGMENT in their own translation units; importing or loading this library runs
// those registrations. Nothing is bound to Python, so this unit includes only Python.h: with
// torch/extension.h (pybind11 and all of ATen) it was the slowest file of the build.
#include <Python.h>

#define LONGVIDEO_CAT_(a, b) a##b
#define LONGVIDEO_CAT(a, b) LONGVIDEO_CAT_(a, b)
#define LONGVIDEO_STR_(a) #a
#define LONGVIDEO_STR(a) LONGVIDEO_STR_(a)

static struct PyModuleDef longvideo_module = {
    PyModuleDef_HEAD_INIT, LONGVIDEO_STR(TORCH_EXTENSION_NAME),
    "longvideo CUDA kernels (registered as torch.ops.longvideo._*_cuda)", -1, nullptr,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC LONGVIDEO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&longvideo_module); }
