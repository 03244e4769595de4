// Plain C++ interface of the small-M W4A16 kernel (csrc/cuda/int4.cu).
//
// Torch-free on purpose (see DESIGN.md, "Known pitfalls"): included by the .cu file, which nvcc
// compiles with CUDA headers only, and by the torch binding (int4_binding.cpp), which owns the
// tensor checks, the allocations and the stream.
//
// The kernel computes y[M, N] = x[M, K] @ W^T (+ bias), W[n, k] = (q[n, k] - z[n, g]) * s[n, g],
// g = k / G, from the *pre-shuffled* weight that effkern/int4_cuda_layout.py produces
// (shuffle_for_cuda); that file has the layout diagram. Summary:
//   qweight  int32 [N / 64, 8 * K]: per 64 output columns, one 512-byte tile per 16 values of
//            k, tile = 32 lanes x 16 bytes, each lane's 16 bytes its B fragments of the
//            mma.m16n8k16 for the 8 n8-subtiles.
//   scales   [K / G, N] in the activation dtype, columns permuted within each 64 (col 8g + c
//            holds output column 8c + g) so one 16-byte load gives a lane its 8 scales.
//   zeros    the same, holding 1024 + z (float16) or 128 + z (bfloat16): the bias of the
//            exponent trick, so (q - z) comes out of one exact subtraction.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "launch_common.h"

namespace effkern_cuda {
namespace w4a16 {

using common::DType;

// Tile sizes; the Python layout (effkern/int4_cuda_layout.py) mirrors them.
constexpr int kTileN = 64;         // output columns per thread block (8 mma n8-subtiles)
constexpr int kTileK = 16;         // k per mma / per shuffled 512-byte tile
constexpr int kWarps = 8;          // warps per block, each taking one k16 tile per stage
constexpr int kThreads = kWarps * 32;
constexpr int kStageK = kTileK * kWarps;  // 128: k consumed by the block per pipeline stage
constexpr int kStages = 4;         // cp.async pipeline depth
constexpr int kTileM = 16;         // rows of x per mma (padded with zeros)
constexpr int kMaxMTiles = 4;      // up to 64 rows of x per block; more rows -> more blocks

// Status codes (0 = ok); message() says more.
using common::kCudaError;
using common::kInvalidArgument;
using common::kOk;

// True when the kernel handles this problem: N % 64 == 0, K % 128 == 0, N, K > 0 and a group
// size G (group_size, or K when group_size == -1) with K % G == 0, G % 32 == 0 and either
// G dividing 128 or 128 dividing G (so a pipeline stage spans at most 4 whole groups or lies
// inside one). Any M >= 0 is handled (rows are tiled by 64); the kernel is designed for small
// M (decoding): every 64 rows of x read the whole weight once more.
// group_size -1 means K. Inline so the binding's checks and the launcher share one definition.
inline bool supports(int64_t n, int64_t k, int64_t group_size) {
  const int64_t g = group_size == -1 ? k : group_size;
  return n > 0 && k > 0 && n % kTileN == 0 && k % kStageK == 0 && g > 0 && g % 32 == 0 &&
         k % g == 0 && (kStageK % g == 0 || g % kStageK == 0);
}

// Launch configuration, a function of the problem and the device's SM count.
struct Plan {
  int m_tiles;          // 16-row mma tiles per block (1..4)
  int grid_n;           // N / 64
  int grid_m;           // ceil(M / (16 * m_tiles))
  int splits;           // K slices (blocks along K) reduced by a second kernel when > 1
  int stages_per_split; // pipeline stages (128 k each) per slice
  std::size_t smem_bytes;       // dynamic shared memory per block
  std::size_t workspace_bytes;  // fp32 partial sums, splits * M * N * 4 when splits > 1
};

// num_sms <= 0: query the current device.
int make_plan(int64_t m, int64_t n, int64_t k, int num_sms, Plan* plan);

struct LinearArgs {
  DType dtype;
  int64_t m, n, k;
  int64_t group_size;    // G (already resolved: never -1)
  const void* x;         // [m, k] dense row-major, 16-byte aligned
  const void* qweight;   // int32 [n / 64, 8 k], shuffled, 16-byte aligned
  const void* scales;    // [k / G, n] prepared, 16-byte aligned
  const void* zeros;     // [k / G, n] prepared (1024 + z or 128 + z), 16-byte aligned
  const void* bias;      // [n] or nullptr
  void* out;             // [m, n] dense row-major, 8-byte aligned
  void* workspace;       // plan.workspace_bytes, 16-byte aligned (nullptr when 0)
  Plan plan;             // from make_plan for the same m, n, k
  cudaStream_t stream;
};

// y = x @ W^T (+ bias). Returns kOk or an error code (message() says why).
int linear(const LinearArgs& args);

// Thread-local description of the last error of make_plan / linear.
const char* message();

}  // namespace w4a16
}  // namespace effkern_cuda
