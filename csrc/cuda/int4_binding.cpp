// Dispatch-key implementations of effkern_C::int4_linear, the small-M W4A16 CUDA kernel
// (csrc/cuda/int4.cu) on the pre-shuffled weight of effkern/int4_cuda_layout.py.
//
// CUDA: checks, output and workspace allocation on torch's caching allocator, the current
// stream, the launch. CPU: the same checks, then an error that says where the CPU path is
// (there is no CPU kernel for the shuffled layout; effkern's reference dequantizes the
// unshuffled weight). The CPU registration makes the argument checks testable without a GPU.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/binding_common.h"
#include "cuda/int4.h"
#include "int4_checks.h"

namespace effkern_C {
namespace {

namespace w4 = effkern_cuda::w4a16;

void check_w4_status(int status) {
  TORCH_CHECK(status == w4::kOk, "effkern_C::int4_linear (CUDA): ", w4::message());
}

at::Tensor int4_linear_cuda(const at::Tensor& input, const at::Tensor& qweight,
                            const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
  const Int4LinearShape s = check_int4_linear_args(input, qweight, scales, zeros, group_size,
                                                   bias, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = input.new_empty({s.m, s.n});
  if (s.m == 0) return out;

  const at::Tensor x = dense_aligned16(input);
  const at::Tensor b = s.has_bias ? dense_aligned16(*bias) : at::Tensor();

  w4::Plan plan{};
  check_w4_status(w4::make_plan(s.m, s.n, s.k, /*num_sms=*/0, &plan));
  const at::Tensor workspace = split_k_workspace(input, plan.workspace_bytes);

  w4::LinearArgs args{};
  args.dtype = kernel_dtype(input);
  args.m = s.m;
  args.n = s.n;
  args.k = s.k;
  args.group_size = s.group;
  args.x = x.data_ptr();
  args.qweight = qweight.data_ptr();
  args.scales = scales.data_ptr();
  args.zeros = zeros.data_ptr();
  args.bias = s.has_bias ? b.data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.workspace = workspace.defined() ? workspace.data_ptr() : nullptr;
  args.plan = plan;
  args.stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  check_w4_status(w4::linear(args));
  return out;
}

at::Tensor int4_linear_cpu(const at::Tensor& input, const at::Tensor& qweight,
                           const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size,
                           const std::optional<at::Tensor>& bias) {
  check_int4_linear_args(input, qweight, scales, zeros, group_size, bias, c10::DeviceType::CPU);
  TORCH_CHECK(false,
              "effkern_C::int4_linear has no CPU kernel: it runs the CUDA kernel on the "
              "pre-shuffled weight. On CPU use effkern.int4_linear (reference backend), or "
              "effkern.int4_cuda_layout.unshuffle_from_cuda to get effkern's layout back.");
  return at::Tensor();  // unreachable
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern_C, CUDA, m) { m.impl("int4_linear", &int4_linear_cuda); }

TORCH_LIBRARY_IMPL(effkern_C, CPU, m) { m.impl("int4_linear", &int4_linear_cpu); }

}  // namespace effkern_C
