// CUDA dispatch-key implementations of effkern_C::linear_gelu_fwd / linear_gelu_bwd.
//
// This file owns everything that needs torch: argument checks (a second line of defence;
// the Python layer validates first), output allocation, the current stream and the cuBLASLt
// workspace. The kernels themselves live in linear_gelu.cu behind a torch-free interface.

#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <optional>
#include <tuple>

#include "linear_gelu.h"
#include "linear_gelu_checks.h"

namespace effkern_C {
namespace {

using effkern_cuda::DType;
using effkern_cuda::Matrix;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "effkern_C (CUDA): unsupported dtype ", t,
                  "; expected float32, float16 or bfloat16");
  }
  return DType::kFloat32;  // unreachable
}

void check_status(int status, const char* op) {
  TORCH_CHECK(status == effkern_cuda::kOk, "effkern_C::", op, " (CUDA): ",
              effkern_cuda::status_name(status), ": ", effkern_cuda::last_error_message());
}

// Describes a 2-D tensor as a cuBLASLt-compatible matrix view (row- or column-major with a
// leading dimension) without copying when its strides allow it; otherwise makes it
// contiguous. `holder` keeps a copy alive.
Matrix matrix_view(const at::Tensor& t, at::Tensor& holder) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (cols == 1 || t.stride(1) == 1) {
    const int64_t ld = rows == 1 ? cols : t.stride(0);
    if (ld >= std::max<int64_t>(cols, 1)) {
      holder = t;
      return Matrix{t.data_ptr(), rows, cols, ld, true};
    }
  }
  if (rows == 1 || t.stride(0) == 1) {
    const int64_t ld = cols == 1 ? rows : t.stride(1);
    if (ld >= std::max<int64_t>(rows, 1)) {
      holder = t;
      return Matrix{t.data_ptr(), rows, cols, ld, false};
    }
  }
  holder = t.contiguous();
  return Matrix{holder.data_ptr(), rows, cols, std::max<int64_t>(cols, 1), true};
}

// Dense, 16-byte-aligned copy if needed (cuBLASLt epilogue vectors and our vectorized
// kernels want aligned dense buffers).
at::Tensor dense_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

at::Tensor workspace_for(const at::Tensor& like) {
  return like.new_empty({static_cast<int64_t>(effkern_cuda::kWorkspaceBytes)},
                        like.options().dtype(at::kByte));
}

// GEMMs with an N or a K of 1 do not go to cuBLASLt: its heuristic rejects operands with one row or
// column (CUBLAS_STATUS_INVALID_VALUE from cublasLtMatmulAlgoGetHeuristic, why torch keeps such
// GEMMs off cuBLASLt too). ATen's matmul (cuBLAS) does them; our elementwise kernels do the rest.
bool aten_gemms(int64_t n, int64_t k) { return n == 1 || k == 1; }

// TF32 for float32 GEMMs, as torch's own cuBLASLt path decides it (gemm_and_bias): the resolved
// fp32 precision of CUDA matmuls. Not allowTF32CuBLAS() where torch has the new API: that legacy
// getter raises a RuntimeError ("mix of the legacy and new APIs") once TF32 was switched on through
// it (torch.backends.cuda.matmul.fp32_precision = "tf32" or torch.backends.fp32_precision = "tf32").
// The enum form is in torch 2.11's headers (the GPU machines'); older torch keeps the legacy getter.
#ifndef TORCH_VERSION_MINOR
#error "torch/version.h defines no TORCH_VERSION_MINOR"
#endif
bool allow_tf32(at::ScalarType t) {
  if (t != at::kFloat) return false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_cuda(const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        bool tanh_approx, bool save_gelu_grad) {
  const LinearGeluShape shape = check_fwd_args(input, weight, bias, c10::DeviceType::CUDA);
  const int64_t M = shape.m, N = shape.n, K = shape.k;
  const bool has_bias = shape.has_bias;
  const DType dtype = to_dtype(input.scalar_type());

  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = input.new_empty({M, N});
  at::Tensor gelu_grad = save_gelu_grad ? input.new_empty({M, N}) : input.new_empty({0});
  if (M == 0 || N == 0) return {out, gelu_grad};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  at::Tensor bias_c = has_bias ? dense_aligned(*bias) : at::Tensor();

  if (K == 0 || aten_gemms(N, K)) {
    // z without cuBLASLt (K == 0, an empty reduction: z = bias or 0; see aten_gemms), then the
    // elementwise GELU (and gelu'), z in place.
    at::Tensor z = save_gelu_grad ? gelu_grad : out;
    if (K > 0 && has_bias) {
      at::addmm_out(z, bias_c, input, weight.t());
    } else if (K > 0) {
      at::mm_out(z, input, weight.t());
    } else if (has_bias) {
      z.copy_(bias_c.unsqueeze(0).expand({M, N}));
    } else {
      z.zero_();
    }
    check_status(effkern_cuda::gelu_fwd(dtype, z.data_ptr(), out.data_ptr(),
                                        save_gelu_grad ? gelu_grad.data_ptr() : nullptr, M * N,
                                        tanh_approx, stream),
                 "linear_gelu_fwd");
    return {out, gelu_grad};
  }

  at::Tensor input_holder, weight_holder;
  at::Tensor workspace = workspace_for(input);
  effkern_cuda::LinearGeluFwdArgs args{};
  args.dtype = dtype;
  args.m = M;
  args.n = N;
  args.k = K;
  args.input = matrix_view(input, input_holder);
  args.weight = matrix_view(weight, weight_holder);
  args.bias = has_bias ? bias_c.data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.gelu_grad = save_gelu_grad ? gelu_grad.data_ptr() : nullptr;
  args.tanh_approx = tanh_approx;
  args.allow_tf32 = allow_tf32(input.scalar_type());
  args.workspace = workspace.data_ptr();
  args.workspace_bytes = effkern_cuda::kWorkspaceBytes;
  args.stream = stream;
  check_status(effkern_cuda::linear_gelu_fwd(args), "linear_gelu_fwd");
  return {out, gelu_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& gelu_grad, std::array<bool, 3> output_mask) {
  const LinearGeluShape shape =
      check_bwd_args(grad_out, input, weight, gelu_grad, c10::DeviceType::CUDA);
  const int64_t M = shape.m, N = shape.n, K = shape.k;
  const DType dtype = to_dtype(input.scalar_type());

  c10::cuda::CUDAGuard guard(input.device());
  const bool need_gi = output_mask[0], need_gw = output_mask[1], need_gb = output_mask[2];
  at::Tensor grad_input = need_gi ? input.new_empty({M, K}) : input.new_empty({0});
  at::Tensor grad_weight = need_gw ? input.new_empty({N, K}) : input.new_empty({0});
  at::Tensor grad_bias = need_gb ? input.new_empty({N}) : input.new_empty({0});
  if (!need_gi && !need_gw && !need_gb) return {grad_input, grad_weight, grad_bias};

  if (M == 0 || N == 0) {
    // Sums over an empty dimension are zero.
    if (need_gi) grad_input.zero_();
    if (need_gw) grad_weight.zero_();
    if (need_gb) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  const at::Tensor grad_out_c = dense_aligned(grad_out);
  const at::Tensor gelu_grad_c = dense_aligned(gelu_grad);
  at::Tensor grad_z = input.new_empty({M, N});
  if (aten_gemms(N, K)) {
    check_status(effkern_cuda::gelu_bwd(dtype, grad_out_c.data_ptr(), gelu_grad_c.data_ptr(),
                                        grad_z.data_ptr(), M * N, stream),
                 "linear_gelu_bwd");
    if (need_gi) at::mm_out(grad_input, grad_z, weight);
    if (need_gw) at::mm_out(grad_weight, grad_z.t(), input);
    if (need_gb) grad_bias.copy_(grad_z.sum(at::IntArrayRef{0}, /*keepdim=*/false, at::kFloat));
    return {grad_input, grad_weight, grad_bias};
  }
  at::Tensor input_holder, weight_holder;
  at::Tensor workspace = workspace_for(input);

  effkern_cuda::LinearGeluBwdArgs args{};
  args.dtype = dtype;
  args.m = M;
  args.n = N;
  args.k = K;
  args.grad_out = grad_out_c.data_ptr();
  args.gelu_grad = gelu_grad_c.data_ptr();
  // Views only of the operands the requested GEMMs read: grad_input reads weight, grad_weight
  // reads input. The other may be the Python layer's zero-stride stand-in for a tensor autograd
  // did not save, which matrix_view would copy into a dense [M, K] or [N, K] buffer.
  const bool run_gi = need_gi && K > 0, run_gw = need_gw && K > 0;
  args.input = run_gw ? matrix_view(input, input_holder) : Matrix{};
  args.weight = run_gi ? matrix_view(weight, weight_holder) : Matrix{};
  args.grad_z = grad_z.data_ptr();
  args.grad_input = run_gi ? grad_input.data_ptr() : nullptr;
  args.grad_weight = run_gw ? grad_weight.data_ptr() : nullptr;
  args.grad_bias = need_gb ? grad_bias.data_ptr() : nullptr;
  args.allow_tf32 = allow_tf32(input.scalar_type());
  args.workspace = workspace.data_ptr();
  args.workspace_bytes = effkern_cuda::kWorkspaceBytes;
  args.stream = stream;

  bool grad_bias_written = false;
  check_status(effkern_cuda::linear_gelu_bwd(args, &grad_bias_written), "linear_gelu_bwd");
  if (need_gb && !grad_bias_written) {
    // Only grad_bias asked for, or BGRADB unsupported for this problem: reduce grad_z in
    // float32 and round once.
    grad_bias.copy_(grad_z.sum(at::IntArrayRef{0}, /*keepdim=*/false, at::kFloat));
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern_C, CUDA, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd_cuda);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd_cuda);
}

}  // namespace effkern_C
