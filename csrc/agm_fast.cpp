// Bindings of the agm_fast C++ extension.
//
// The kernels are registered with the PyTorch dispatcher as private ops of the agm_fast namespace, one
// implementation per dispatch key (csrc/cpu, csrc/cuda). All registrations live here, so that the kernel files do
// not include torch/library.h (it makes the nvcc compile several times slower). The public op agm_fast::ogm_ge_ is
// the Python torch.library.custom_op of agm_fast/ops/ogm_ge.py, which calls agm_fast::_ogm_ge_impl; C++ users of the
// CMake library call the same op through the dispatcher.
//
// Built by setup.py this file is also the Python module agm_fast._C (TORCH_EXTENSION_NAME is defined there); built
// by CMakeLists.txt it is part of a plain libtorch library, loadable with torch.ops.load_library.

#include <torch/library.h>

#include "ogm_ge.h"
#include "shapley.h"

#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>
#endif

namespace agm_fast {

// Whether the CUDA kernels were compiled into this build.
bool with_cuda() {
#ifdef AGM_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace agm_fast

TORCH_LIBRARY_FRAGMENT(agm_fast, m) {
  m.def(
      "_ogm_ge_impl(Tensor(a!)[] grads, int[] group, Tensor coeffs, bool noise, int seed, int offset, "
      "int[]? starts=None, Tensor? sigma=None) -> ()");
  m.def(
      "_shapley_scores_impl(Tensor F, Tensor W, Tensor labels, Tensor running, Tensor count, Tensor prev_coeffs, "
      "float alpha, float? cap, bool in_window, bool hold_last, bool regression) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(agm_fast, CPU, m) {
  m.impl("_ogm_ge_impl", &agm_fast::ogm_ge_cpu);
  m.impl("_shapley_scores_impl", &agm_fast::shapley_scores_cpu);
}

#ifdef AGM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(agm_fast, CUDA, m) {
  m.impl("_ogm_ge_impl", &agm_fast::ogm_ge_cuda);
}
#endif

#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() =
      "agm_fast C++ extension: registers agm_fast::_ogm_ge_impl (CPU, and CUDA when built with it) and "
      "agm_fast::_shapley_scores_impl (CPU)";
  module.def("with_cuda", &agm_fast::with_cuda, "True when the CUDA kernels were compiled into this build");
  module.def("cpu_capability", &agm_fast::ogm_ge_cpu_capability,
             "Instruction set of ogm_ge_'s CPU noise pass: avx512, avx2 or default (capped by AGM_FAST_CPU_CAPABILITY)");
}
#endif
