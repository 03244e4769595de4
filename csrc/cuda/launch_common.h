// What the C++ APIs of effkern's split-K GEMM kernels (int4.h, sparse24.h) share: the dtype and
// status codes of their interfaces and the host-side arithmetic of their launch plans.
//
// Plain C++, torch-free and CUDA-free: included by the public headers, so by the .cu files and
// by the torch bindings alike.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace effkern_cuda {
namespace common {

enum class DType : int { kFloat16 = 1, kBFloat16 = 2 };

// Status codes (0 = ok); each kernel's message() says more.
constexpr int kOk = 0;
constexpr int kInvalidArgument = 1;
constexpr int kCudaError = 2;

// The most blocks a launch may put in grid.y (CUDA's limit).
constexpr int64_t kMaxGridY = 65535;

// The split of K over blocks (grid.z) of a plan whose grid_n x grid_m output tiles are set:
// K is split only when the tiles alone leave the GPU short of ~2 blocks per SM; every slice keeps
// at least `min_stages` of the total_stages pipeline stages so that its pipeline fills; at most
// 32 slices, none empty. Sets splits, stages_per_split and workspace_bytes (fp32 partial sums
// [splits][m][n], none without a split).
template <typename Plan>
void plan_split_k(Plan* p, int64_t m, int64_t n, int total_stages, int min_stages, int num_sms) {
  const int64_t blocks = int64_t(p->grid_n) * p->grid_m;
  const int64_t target = 2 * int64_t(num_sms);
  int splits = 1;
  if (blocks < target) {
    const int64_t want = (target + blocks - 1) / blocks;
    const int64_t most = std::max(1, total_stages / min_stages);
    splits = static_cast<int>(std::min<int64_t>({want, most, 32}));
  }
  p->stages_per_split = (total_stages + splits - 1) / splits;
  p->splits = (total_stages + p->stages_per_split - 1) / p->stages_per_split;
  p->workspace_bytes =
      p->splits > 1
          ? static_cast<std::size_t>(p->splits) * static_cast<std::size_t>(m * n) * sizeof(float)
          : 0;
}

// True when a plan's split covers total_stages as plan_split_k makes it: no slice empty.
inline bool split_k_matches(int splits, int stages_per_split, int64_t total_stages) {
  return splits >= 1 && stages_per_split >= 1 &&
         int64_t(splits) * stages_per_split >= total_stages &&
         int64_t(splits - 1) * stages_per_split < total_stages;
}

inline bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace common
}  // namespace effkern_cuda
