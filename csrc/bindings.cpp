// Python module stub of the extension `longvideo._C` (setup.py build) / `longvideo_C` (JIT build).
// The kernels register themselves as private ops `longvideo::_<op>_cuda` through
// TORCH_LIBRARY_FRAGMENT in their own translation units; importing or loading this library runs
// those registrations. Nothing is bound through pybind11.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "longvideo CUDA kernels (registered as torch.ops.longvideo._*_cuda)";
}
