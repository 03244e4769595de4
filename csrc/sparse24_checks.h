// Argument checks of effkern_C::sparse24_linear and effkern_C::sparse24_int8_linear (the CUDA 2:4
// sparse kernel on the reordered weight of effkern/sparse24_cuda_layout.py): a second line of
// defence behind the Python layer,
// so a direct call with bad arguments raises a clear error instead of reading out of bounds. Used
// by the CUDA binding and by the CPU registration that exists only to run these checks
// (csrc/cuda/sparse24_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "cuda/sparse24.h"
#include "kernel_checks.h"

namespace effkern_C {

struct Sparse24LinearShape {
  int64_t m, n, k;
  bool has_bias;
};

// values [N / 16, 8 K] in input's dtype and meta int32 [N / 16, K / 2] (both from
// reorder_for_mma_sp), on input's device, of a shape the kernel takes. Returns N.
inline int64_t check_reordered_weight(const at::Tensor& input, const at::Tensor& values,
                                      const at::Tensor& meta, const char* op) {
  namespace sp = effkern_cuda::sp24;
  const int64_t M = input.size(0), K = input.size(1);
  const bool int8_inputs = input.scalar_type() == at::kChar;
  check_2d_on_input_device(values, "values", input, op);
  check_2d_on_input_device(meta, "meta", input, op);
  check_dtype_of_input(values, "values", input, op);
  TORCH_CHECK(values.size(1) == 8 * K, op,
              "values must be the reordered [N / 16, 8 * K] = [N / 16, ", 8 * K, "] for K = ", K,
              ", got shape ", values.sizes(),
              " (effkern's compressed values [N, K / 2] must go through "
              "effkern.sparse24_cuda_layout.reorder_for_mma_sp first)");
  const int64_t N = values.size(0) * sp::kTileRows;
  TORCH_CHECK(sp::supports(int8_inputs, N, K), op,
              "the CUDA kernel needs N % 16 == 0 and K % 64 == 0 (N, K > 0",
              int8_inputs ? ", K <= 131072 for int8" : "", "); got N = ", N, ", K = ", K);
  TORCH_CHECK(M <= sp::kMaxM, op, "M = ", M, " is larger than the kernel's limit ", sp::kMaxM);
  TORCH_CHECK(meta.scalar_type() == at::kInt, op,
              "meta must be the reordered int32 metadata (from "
              "effkern.sparse24_cuda_layout.reorder_for_mma_sp), got ",
              meta.scalar_type(), " (effkern's uint8 [N, K / 8] metadata must be reordered first)");
  TORCH_CHECK(meta.size(0) == N / sp::kTileRows && meta.size(1) == K / 2, op,
              "meta must be the reordered [N / 16, K / 2] = [", N / sp::kTileRows, ", ", K / 2,
              "], got shape ", meta.sizes());
  check_dense_aligned16(values, "values", "reorder_for_mma_sp", op);
  check_dense_aligned16(meta, "meta", "reorder_for_mma_sp", op);
  return N;
}

// input [M, K] float16/bfloat16; the reordered values (input's dtype) and meta; bias [N] in
// input's dtype or none.
inline Sparse24LinearShape check_sparse24_linear_args(const at::Tensor& input,
                                                      const at::Tensor& values,
                                                      const at::Tensor& meta,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::DeviceType device_type) {
  const char* op = "effkern_C::sparse24_linear: ";
  check_gemm_input(input, device_type, op);
  const int64_t N = check_reordered_weight(input, values, meta, op);
  const bool has_bias = check_bias(bias, N, input, op);
  return {input.size(0), N, input.size(1), has_bias};
}

// scale: a 1-D float32 [n] on input's device.
inline void check_scale(const at::Tensor& scale, const char* name, int64_t n,
                        const at::Tensor& input, const char* op) {
  TORCH_CHECK(scale.device() == input.device(), op, name, " is on ", scale.device(),
              " but input is on ", input.device());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, name, " must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n, op, name, " must be [", n, "], got shape ",
              scale.sizes());
}

// W8A8: input int8 [M, K] with input_scale float32 [M]; the reordered int8 values and meta;
// weight_scale float32 [N]; bias [N] in out_dtype (float16 or bfloat16) or none.
inline Sparse24LinearShape check_sparse24_int8_linear_args(
    const at::Tensor& input, const at::Tensor& input_scale, const at::Tensor& values,
    const at::Tensor& meta, const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
    at::ScalarType out_dtype, c10::DeviceType device_type) {
  const char* op = "effkern_C::sparse24_int8_linear: ";
  TORCH_CHECK(input.device().type() == device_type, op, "input must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == 2, op, "input must be 2-D [M, K], got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kChar, op,
              "input must be int8 (the quantized activations), got ", input.scalar_type());
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              "out_dtype must be float16 or bfloat16, got ", out_dtype);
  const int64_t N = check_reordered_weight(input, values, meta, op);
  check_scale(input_scale, "input_scale", input.size(0), input, op);
  check_scale(weight_scale, "weight_scale", N, input, op);
  const bool has_bias = check_bias_of_dtype(bias, N, input, out_dtype, "out_dtype is", op);
  return {input.size(0), N, input.size(1), has_bias};
}

}  // namespace effkern_C
