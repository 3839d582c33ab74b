// Operator schemas of florence_kernels._C and the Python module that reports how it was built.
//
// The ops are registered with the dispatcher (torch.ops.florence_kernels_C.*) so that each device has
// its own implementation; autograd and backend choice live in Python (florence_kernels/ops/).
#include <torch/extension.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef FK_CUDA_ARCH_LIST
#define FK_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(florence_kernels_C, m) {
  m.def("window_partition(Tensor x, int[] window_size, int[] shift_size) -> Tensor");
  m.def("window_reverse(Tensor windows, int[] window_size, int[] shift_size, int[] shape) -> Tensor");
  // window_size / shift_size: the effective (resolved) window and shift; nominal_window: what the bias table is for.
  m.def(
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_pos_bias, int[] window_size, int[] shift_size, "
      "int[] nominal_window, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? rel_pos_bias, "
      "int[] window_size, int[] shift_size, int[] nominal_window, float scale, Tensor(a!) dq, Tensor(b!) dk, "
      "Tensor(c!) dv) -> Tensor");
  m.def(
      "deform_conv2d_fwd(Tensor input, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation) -> Tensor");
  m.def(
      "deform_conv2d_bwd(Tensor grad, Tensor input, Tensor offset, Tensor? mask, Tensor weight, int[] stride, "
      "int[] padding, int[] dilation) -> (Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "florence_kernels C++/CUDA extension";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
    info["cuda"] = false;
    info["cuda_version"] = pybind11::none();
#endif
    info["cuda_arch_list"] = std::string(FK_CUDA_ARCH_LIST);
    info["torch_version"] = std::string(TORCH_VERSION);
    return info;
  });
}
