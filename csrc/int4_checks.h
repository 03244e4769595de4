// Argument checks of effkern_C::int4_linear (the CUDA W4A16 kernel on the pre-shuffled weight
// of effkern/int4_cuda_layout.py): a second line of defence behind the Python layer, so a direct
// call with bad arguments raises a clear error instead of reading out of bounds. Used by the
// CUDA binding and by the CPU registration that exists only to run these checks
// (csrc/cuda/int4_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "cuda/int4.h"

namespace effkern_C {

struct Int4LinearShape {
  int64_t m, n, k;
  int64_t group;  // resolved group size (K for group_size == -1)
  bool has_bias;
};

// input [M, K] float16/bfloat16; qweight int32 [N / 64, 8 K] (shuffled); scales and zeros
// [K / G, N] (prepared) in input's dtype; bias [N] in input's dtype or none.
inline Int4LinearShape check_int4_linear_args(const at::Tensor& input, const at::Tensor& qweight,
                                              const at::Tensor& scales, const at::Tensor& zeros,
                                              int64_t group_size,
                                              const std::optional<at::Tensor>& bias,
                                              c10::DeviceType device_type) {
  namespace w4 = effkern_cuda::w4a16;
  const char* op = "effkern_C::int4_linear: ";
  TORCH_CHECK(input.device().type() == device_type, op, "input must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == 2, op, "input must be 2-D [M, K], got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
              "input must be float16 or bfloat16, got ", input.scalar_type());
  const auto dtype = input.scalar_type();
  const int64_t M = input.size(0), K = input.size(1);

  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"qweight", &qweight},
                                {"scales", &scales},
                                {"zeros", &zeros}}) {
    TORCH_CHECK(t->device() == input.device(), op, name, " is on ", t->device(),
                " but input is on ", input.device());
    TORCH_CHECK(t->dim() == 2, op, name, " must be 2-D, got shape ", t->sizes());
  }
  TORCH_CHECK(qweight.scalar_type() == at::kInt, op,
              "qweight must be int32 (the output of effkern.int4_cuda_layout.shuffle_for_cuda), "
              "got ", qweight.scalar_type());
  TORCH_CHECK(qweight.size(1) == 8 * K, op,
              "qweight must be the shuffled weight [N / 64, 8 * K] = [N / 64, ", 8 * K,
              "] for K = ", K, ", got shape ", qweight.sizes(),
              " (effkern's packed layout [N, K / 8] must go through "
              "effkern.int4_cuda_layout.shuffle_for_cuda first)");
  const int64_t N = qweight.size(0) * w4::kTileN;

  TORCH_CHECK(group_size == -1 || group_size > 0, op,
              "group_size must be positive or -1 (one group per row), got ", group_size);
  const int64_t G = group_size == -1 ? K : group_size;
  TORCH_CHECK(w4::supports(N, K, G), op,
              "the CUDA kernel needs N % 64 == 0, K % 128 == 0 (N, K > 0) and a group size G "
              "(K for -1) with K % G == 0, G % 32 == 0 and G dividing 128 or a multiple of 128; "
              "got N = ", N, ", K = ", K, ", group_size = ", group_size);

  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"scales", &scales},
                                {"zeros", &zeros}}) {
    TORCH_CHECK(t->scalar_type() == dtype, op, name, " has dtype ", t->scalar_type(),
                " but input has dtype ", dtype);
    TORCH_CHECK(t->size(0) == K / G && t->size(1) == N, op, name,
                " must be the prepared [K / group_size, N] = [", K / G, ", ", N,
                "] (from shuffle_for_cuda), got shape ", t->sizes());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"qweight", &qweight},
                                {"scales", &scales},
                                {"zeros", &zeros}}) {
    TORCH_CHECK(t->is_contiguous() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op,
                name, " must be contiguous and 16-byte aligned (as shuffle_for_cuda returns it)");
  }

  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device() == input.device(), op, "bias is on ", bias->device(),
                " but input is on ", input.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias must be [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, op, "bias has dtype ", bias->scalar_type(),
                " but input has dtype ", dtype);
  }
  return {M, N, K, G, has_bias};
}

}  // namespace effkern_C
