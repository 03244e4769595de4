// The effkern_C operator library: every schema is defined here, once.
// Kernels are registered per dispatch key next to their code:
//   csrc/cpu/linear_gelu.cpp            TORCH_LIBRARY_IMPL(effkern_C, CPU, m)
//   csrc/cuda/linear_gelu_binding.cpp   TORCH_LIBRARY_IMPL(effkern_C, CUDA, m)
//   csrc/cuda/int4_binding.cpp          TORCH_LIBRARY_IMPL(effkern_C, CUDA / CPU, m)
//   csrc/cpu/sparse24.cpp               TORCH_LIBRARY_IMPL(effkern_C, CPU, m)
//   csrc/cuda/sparse24_binding.cpp      TORCH_LIBRARY_IMPL(effkern_C, CUDA / CPU, m)
//
// Importing the Python module effkern._C (or torch.ops.load_library on the .so) runs the
// static registrations below; the ops are then torch.ops.effkern_C.<name>.

#include <Python.h>

#include <torch/library.h>

#include <string>

#ifdef EFFKERN_WITH_CUDA
#include "cuda/linear_gelu.h"
#endif

// setup.py passes the arch list as a single preprocessor token with '_' in place of ';'
// (e.g. 8.0_9.0a) so that no shell or nvcc quoting is involved; it is stringified here.
#define EFFKERN_STRINGIFY_IMPL(...) #__VA_ARGS__
#define EFFKERN_STRINGIFY(...) EFFKERN_STRINGIFY_IMPL(__VA_ARGS__)

namespace effkern_C {
namespace {

std::string build_info() {
#ifdef EFFKERN_WITH_CUDA
  std::string archs =
#ifdef EFFKERN_CUDA_ARCHS
      EFFKERN_STRINGIFY(EFFKERN_CUDA_ARCHS);
#else
      "";
#endif
  for (char& c : archs)
    if (c == '_') c = ';';
  const int v = effkern_cuda::compiled_cuda_runtime_version();  // e.g. 13000
  const std::string cuda_version =
      std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  return "{\"cuda\": true, \"archs\": \"" + archs + "\", \"cuda_version\": \"" + cuda_version +
         "\"}";
#else
  return "{\"cuda\": false, \"archs\": \"\", \"cuda_version\": null}";
#endif
}

}  // namespace

TORCH_LIBRARY(effkern_C, m) {
  // Fused y = gelu(input @ weight.T + bias). Returns (out, gelu_grad); gelu_grad is gelu'(z) of
  // the pre-activation z when save_gelu_grad (what the backward reads), else an empty [0] tensor.
  m.def(
      "linear_gelu_fwd(Tensor input, Tensor weight, Tensor? bias, bool tanh_approx, "
      "bool save_gelu_grad) -> (Tensor, Tensor)");
  // Gradients of linear_gelu_fwd given gelu'(z) of its pre-activation z. Outputs whose
  // output_mask entry is false come back as empty [0] tensors.
  m.def(
      "linear_gelu_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor gelu_grad, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // W4A16: input [M, K] @ W^T (+ bias), W dequantized from the pre-shuffled int4 weight
  // (effkern/int4_cuda_layout.py: qweight int32 [N / 64, 8 K], prepared scales/zeros [K / G, N]).
  // CUDA kernel: csrc/cuda/int4.cu; the CPU registration only validates and raises.
  m.def(
      "int4_linear(Tensor input, Tensor qweight, Tensor scales, Tensor zeros, int group_size, "
      "Tensor? bias) -> Tensor");
  // 2:4 sparse: input [M, K] @ W^T (+ bias) on the sparse tensor cores (mma.sp), W given as the
  // reordered values [N / 16, 8 K] and int32 meta [N / 16, K / 2] of
  // effkern/sparse24_cuda_layout.py (reorder_for_mma_sp). CUDA kernel: csrc/cuda/sparse24.cu;
  // the CPU registration only validates and raises.
  m.def("sparse24_linear(Tensor input, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  // W8A8 2:4 sparse: (input_q [M, K] int8 @ W^T, W int8 reordered as above) dequantized in fp32
  // with input_scale [M] and weight_scale [N], + bias, in out_dtype (float16 or bfloat16).
  m.def(
      "sparse24_int8_linear(Tensor input, Tensor input_scale, Tensor values, Tensor meta, "
      "Tensor weight_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // 2:4 semi-structured sparsity along K of a weight [N, K] (K % 4 == 0), CPU kernels in
  // csrc/cpu/sparse24.cpp (format, tie and NaN rules there). prune_24 keeps the 2 largest |w|
  // of every group of 4; compress_24 -> (values [N, K / 2], meta uint8 [N, ceil(K / 8)]) and
  // raises on a group with more than 2 nonzeros; decompress_24 is its exact inverse.
  m.def("prune_24(Tensor weight) -> Tensor");
  m.def("compress_24(Tensor weight) -> (Tensor, Tensor)");
  m.def("decompress_24(Tensor values, Tensor meta) -> Tensor");
  // JSON: {"cuda": bool, "archs": "8.0;9.0a", "cuda_version": "13.0" | null}.
  // Registered as a catch-all kernel (it takes no tensors).
  m.def("build_info() -> str", &build_info);
}

}  // namespace effkern_C

// A Python module named effkern._C, so `import effkern._C` loads this library and runs the
// registrations above. It has no Python-level functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "effkern C++/CUDA operators; use them through torch.ops.effkern_C.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
