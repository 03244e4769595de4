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
#include <utility>

#include "cuda/sparse24.h"

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
  TORCH_CHECK(input.device().type() == device_type, op, "input must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == 2, op, "input must be 2-D [M, K], got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16, op,
              "input must be float16 or bfloat16, got ", input.scalar_type());
  const auto dtype = input.scalar_type();
  const int64_t M = input.size(0), K = input.size(1);

  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"meta", &meta}}) {
    TORCH_CHECK(t->device() == input.device(), op, name, " is on ", t->device(),
                " but input is on ", input.device());
    TORCH_CHECK(t->dim() == 2, op, name, " must be 2-D, got shape ", t->sizes());
  }
  TORCH_CHECK(values.scalar_type() == dtype, op, "values has dtype ", values.scalar_type(),
              " but input has dtype ", dtype);
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
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"meta", &meta}}) {
    TORCH_CHECK(t->is_contiguous() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op,
                name, " must be contiguous and 16-byte aligned (as reorder_for_mma_sp returns it)");
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
  return {M, N, K, has_bias};
}

}  // namespace effkern_C
