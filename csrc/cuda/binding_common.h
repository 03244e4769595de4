// Torch-side helpers shared by the bindings of effkern's split-K GEMM kernels
// (int4_binding.cpp, sparse24_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

#include "cuda/launch_common.h"

namespace effkern_C {

// t when it is dense and 16-byte aligned (the kernels' cp.async and vector loads need both),
// else a copy that is.
inline at::Tensor dense_aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The fp32 workspace of a split-K plan on input's device; undefined when the plan needs none.
inline at::Tensor split_k_workspace(const at::Tensor& input, std::size_t bytes) {
  if (bytes == 0) return at::Tensor();
  return input.new_empty({static_cast<int64_t>(bytes / sizeof(float))},
                         input.options().dtype(at::kFloat));
}

// t's dtype (float16 or bfloat16, checked before) as the kernels' C++ APIs name it.
inline effkern_cuda::common::DType kernel_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? effkern_cuda::common::DType::kFloat16
                                      : effkern_cuda::common::DType::kBFloat16;
}

}  // namespace effkern_C
