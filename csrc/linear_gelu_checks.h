// Argument checks shared by the CPU and CUDA implementations of effkern_C::linear_gelu_fwd
// and linear_gelu_bwd: a second line of defence (the Python layer validates first), so a
// direct call of the C++ op with bad arguments raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace effkern_C {

struct LinearGeluShape {
  int64_t m, n, k;
  bool has_bias;
};

// t is 2-D, on `device_type`, on input's device, with input's dtype.
inline void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& input,
                         c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, "effkern_C: ", name, " must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", t.device());
  TORCH_CHECK(t.device() == input.device(), "effkern_C: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.dim() == 2, "effkern_C: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "effkern_C: ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
}

// input [M, K], weight [N, K], bias [N] or none.
inline LinearGeluShape check_fwd_args(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      c10::DeviceType device_type) {
  check_matrix(input, "input", input, device_type);
  check_matrix(weight, "weight", input, device_type);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "effkern_C: weight must be [N, ", K, "], got ",
              weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device() == input.device(), "effkern_C: bias is on ", bias->device(),
                " but input is on ", input.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "effkern_C: bias must be [", N,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "effkern_C: bias has dtype ",
                bias->scalar_type(), " but input has dtype ", input.scalar_type());
  }
  return {M, N, K, has_bias};
}

// grad_out [M, N], input [M, K], weight [N, K], gelu_grad [M, N].
inline LinearGeluShape check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& weight, const at::Tensor& gelu_grad,
                                      c10::DeviceType device_type) {
  const LinearGeluShape s = check_fwd_args(input, weight, std::nullopt, device_type);
  check_matrix(grad_out, "grad_out", input, device_type);
  check_matrix(gelu_grad, "gelu_grad", input, device_type);
  TORCH_CHECK(grad_out.size(0) == s.m && grad_out.size(1) == s.n,
              "effkern_C: grad_out must be [", s.m, ", ", s.n, "], got ", grad_out.sizes());
  TORCH_CHECK(gelu_grad.size(0) == s.m && gelu_grad.size(1) == s.n,
              "effkern_C: gelu_grad must be [", s.m, ", ", s.n, "], got ", gelu_grad.sizes());
  return s;
}

}  // namespace effkern_C
