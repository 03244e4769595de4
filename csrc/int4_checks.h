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
#include "kernel_checks.h"

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
  check_gemm_input(input, device_type, op);
  const int64_t M = input.size(0), K = input.size(1);

  check_2d_on_input_device(qweight, "qweight", input, op);
  check_2d_on_input_device(scales, "scales", input, op);
  check_2d_on_input_device(zeros, "zeros", input, op);
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
    check_dtype_of_input(*t, name, input, op);
    TORCH_CHECK(t->size(0) == K / G && t->size(1) == N, op, name,
                " must be the prepared [K / group_size, N] = [", K / G, ", ", N,
                "] (from shuffle_for_cuda), got shape ", t->sizes());
  }
  check_dense_aligned16(qweight, "qweight", "shuffle_for_cuda", op);
  check_dense_aligned16(scales, "scales", "shuffle_for_cuda", op);
  check_dense_aligned16(zeros, "zeros", "shuffle_for_cuda", op);

  const bool has_bias = check_bias(bias, N, input, op);
  return {M, N, K, G, has_bias};
}

}  // namespace effkern_C
