// Argument checks of effkern_C::sparse24_linear (the CUDA 2:4 sparse kernel on the reordered
// weight of effkern/sparse24_cuda_layout.py): a second line of defence behind the Python layer,
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

// input [M, K] float16/bfloat16; values [N / 16, 8 K] in input's dtype and meta int32
// [N / 16, K / 2] (both from reorder_for_mma_sp); bias [N] in input's dtype or none.
inline Sparse24LinearShape check_sparse24_linear_args(const at::Tensor& input,
                                                      const at::Tensor& values,
                                                      const at::Tensor& meta,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::DeviceType device_type) {
  namespace sp = effkern_cuda::sp24;
  const char* op = "effkern_C::sparse24_linear: ";
  check_gemm_input(input, device_type, op);
  const int64_t M = input.size(0), K = input.size(1);

  check_2d_on_input_device(values, "values", input, op);
  check_2d_on_input_device(meta, "meta", input, op);
  check_dtype_of_input(values, "values", input, op);
  TORCH_CHECK(values.size(1) == 8 * K, op,
              "values must be the reordered [N / 16, 8 * K] = [N / 16, ", 8 * K, "] for K = ", K,
              ", got shape ", values.sizes(),
              " (effkern's compressed values [N, K / 2] must go through "
              "effkern.sparse24_cuda_layout.reorder_for_mma_sp first)");
  const int64_t N = values.size(0) * sp::kTileRows;
  TORCH_CHECK(sp::supports(N, K), op,
              "the CUDA kernel needs N % 16 == 0 and K % 64 == 0 (N, K > 0); got N = ", N,
              ", K = ", K);
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

  const bool has_bias = check_bias(bias, N, input, op);
  return {M, N, K, has_bias};
}

}  // namespace effkern_C
