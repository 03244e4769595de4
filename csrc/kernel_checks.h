// Argument checks shared by the ops on effkern's CUDA GEMM kernels (int4_checks.h,
// sparse24_checks.h). Every message starts with `op`, the op's name ("effkern_C::int4_linear: ").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace effkern_C {

// input: a 2-D [M, K] float16 or bfloat16 tensor on `device_type`.
inline void check_gemm_input(const at::Tensor& input, c10::DeviceType device_type,
                             const char* op) {
  TORCH_CHECK(input.device().type() == device_type, op, "input must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == 2, op, "input must be 2-D [M, K], got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
              "input must be float16 or bfloat16, got ", input.scalar_type());
}

// t: 2-D, on input's device.
inline void check_2d_on_input_device(const at::Tensor& t, const char* name,
                                     const at::Tensor& input, const char* op) {
  TORCH_CHECK(t.device() == input.device(), op, name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.dim() == 2, op, name, " must be 2-D, got shape ", t.sizes());
}

inline void check_dtype_of_input(const at::Tensor& t, const char* name, const at::Tensor& input,
                                 const char* op) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
}

// What the kernels' 16-byte loads need of a prepared weight tensor; `producer` is the layout
// function that returns it so.
inline void check_dense_aligned16(const at::Tensor& t, const char* name, const char* producer,
                                  const char* op) {
  TORCH_CHECK(t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, name,
              " must be contiguous and 16-byte aligned (as ", producer, " returns it)");
}

// bias: none, or [n] on input's device with dtype `dtype` (`dtype_source` names where it comes
// from, for the message). Returns whether there is one.
inline bool check_bias_of_dtype(const std::optional<at::Tensor>& bias, int64_t n,
                                const at::Tensor& input, at::ScalarType dtype,
                                const char* dtype_source, const char* op) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device() == input.device(), op, "bias is on ", bias->device(),
                " but input is on ", input.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, "bias must be [", n, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, op, "bias has dtype ", bias->scalar_type(), " but ",
                dtype_source, " ", dtype);
  }
  return has_bias;
}

// bias: none, or [n] on input's device with input's dtype. Returns whether there is one.
inline bool check_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& input,
                       const char* op) {
  return check_bias_of_dtype(bias, n, input, input.scalar_type(), "input has dtype", op);
}

}  // namespace effkern_C
