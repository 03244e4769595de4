// Dispatch-key implementations of effkern_C::sparse24_linear and effkern_C::sparse24_int8_linear
// (W8A8), the 2:4 sparse GEMM on the sparse tensor cores (csrc/cuda/sparse24.cu) on the
// reordered weight of effkern/sparse24_cuda_layout.py.
//
// CUDA: checks, output and workspace allocation on torch's caching allocator, the current
// stream, the launch. CPU: the same checks, then an error that says where the CPU path is (there
// is no CPU kernel for the reordered layout; effkern's CPU kernels take the compressed format).
// The CPU registration makes the argument checks testable without a GPU.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/binding_common.h"
#include "cuda/sparse24.h"
#include "sparse24_checks.h"

namespace effkern_C {
namespace {

namespace sp = effkern_cuda::sp24;

void check_sp24_status(int status, const char* op) {
  TORCH_CHECK(status == sp::kOk, op, " (CUDA): ", sp::message());
}

// The launch after the checks: out [M, N] of out_dtype = input @ W^T (+ bias); int8 input:
// dequantized with input_scale [M] and weight_scale [N] (float32).
at::Tensor run_sparse24_kernel(const Sparse24LinearShape& s, const at::Tensor& input,
                               const at::Tensor& values, const at::Tensor& meta,
                               const at::Tensor& input_scale, const at::Tensor& weight_scale,
                               const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                               const char* op) {
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = input.new_empty({s.m, s.n}, input.options().dtype(out_dtype));
  if (s.m == 0) return out;

  const bool int8_inputs = input.scalar_type() == at::kChar;
  const at::Tensor x = dense_aligned16(input);
  const at::Tensor b = s.has_bias ? dense_aligned16(*bias) : at::Tensor();
  const at::Tensor a_scale = int8_inputs ? input_scale.contiguous() : at::Tensor();
  const at::Tensor w_scale = int8_inputs ? weight_scale.contiguous() : at::Tensor();

  sp::Plan plan{};
  check_sp24_status(sp::make_plan(int8_inputs, s.m, s.n, s.k, /*num_sms=*/0, &plan), op);
  const at::Tensor workspace = split_k_workspace(input, plan.workspace_bytes);

  sp::LinearArgs args{};
  args.dtype = kernel_dtype(out);
  args.int8_inputs = int8_inputs;
  args.m = s.m;
  args.n = s.n;
  args.k = s.k;
  args.x = x.data_ptr();
  args.values = values.data_ptr();
  args.meta = meta.data_ptr();
  args.a_scale = int8_inputs ? a_scale.const_data_ptr<float>() : nullptr;
  args.w_scale = int8_inputs ? w_scale.const_data_ptr<float>() : nullptr;
  args.bias = s.has_bias ? b.data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.workspace = workspace.defined() ? workspace.data_ptr() : nullptr;
  args.plan = plan;
  args.stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  check_sp24_status(sp::linear(args), op);
  return out;
}

at::Tensor sparse24_linear_cuda(const at::Tensor& input, const at::Tensor& values,
                                const at::Tensor& meta, const std::optional<at::Tensor>& bias) {
  const Sparse24LinearShape s =
      check_sparse24_linear_args(input, values, meta, bias, c10::DeviceType::CUDA);
  return run_sparse24_kernel(s, input, values, meta, at::Tensor(), at::Tensor(), bias,
                             input.scalar_type(), "effkern_C::sparse24_linear");
}

at::Tensor sparse24_int8_linear_cuda(const at::Tensor& input, const at::Tensor& input_scale,
                                     const at::Tensor& values, const at::Tensor& meta,
                                     const at::Tensor& weight_scale,
                                     const std::optional<at::Tensor>& bias,
                                     at::ScalarType out_dtype) {
  const Sparse24LinearShape s = check_sparse24_int8_linear_args(
      input, input_scale, values, meta, weight_scale, bias, out_dtype, c10::DeviceType::CUDA);
  return run_sparse24_kernel(s, input, values, meta, input_scale, weight_scale, bias, out_dtype,
                             "effkern_C::sparse24_int8_linear");
}

at::Tensor sparse24_linear_cpu(const at::Tensor& input, const at::Tensor& values,
                               const at::Tensor& meta, const std::optional<at::Tensor>& bias) {
  check_sparse24_linear_args(input, values, meta, bias, c10::DeviceType::CPU);
  TORCH_CHECK(false,
              "effkern_C::sparse24_linear has no CPU kernel: it runs the CUDA kernel on the "
              "reordered weight. On CPU use effkern.sparse24_linear, or "
              "effkern.sparse24_cuda_layout.restore_from_mma_sp to get effkern's compressed "
              "format back.");
  return at::Tensor();  // unreachable
}

at::Tensor sparse24_int8_linear_cpu(const at::Tensor& input, const at::Tensor& input_scale,
                                    const at::Tensor& values, const at::Tensor& meta,
                                    const at::Tensor& weight_scale,
                                    const std::optional<at::Tensor>& bias,
                                    at::ScalarType out_dtype) {
  check_sparse24_int8_linear_args(input, input_scale, values, meta, weight_scale, bias, out_dtype,
                                  c10::DeviceType::CPU);
  TORCH_CHECK(false,
              "effkern_C::sparse24_int8_linear has no CPU kernel: it runs the CUDA kernel on the "
              "reordered weight. On CPU use effkern.sparse24_int8_linear.");
  return at::Tensor();  // unreachable
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern_C, CUDA, m) {
  m.impl("sparse24_linear", &sparse24_linear_cuda);
  m.impl("sparse24_int8_linear", &sparse24_int8_linear_cuda);
}

TORCH_LIBRARY_IMPL(effkern_C, CPU, m) {
  m.impl("sparse24_linear", &sparse24_linear_cpu);
  m.impl("sparse24_int8_linear", &sparse24_int8_linear_cpu);
}

}  // namespace effkern_C
