// Plain C++ interface of the 2:4 semi-structured sparse GEMM on the sparse tensor cores
// (csrc/cuda/sparse24.cu, mma.sp::ordered_metadata.m16n8k32 for float16/bfloat16 inputs,
// .m16n8k64 .s8 for int8 inputs with float32 scales: W8A8).
//
// Torch-free on purpose (see DESIGN.md, "Known pitfalls"): included by the .cu file, which nvcc
// compiles with CUDA headers only, and by the torch binding (sparse24_binding.cpp), which owns
// the tensor checks, the allocations and the stream.
//
// The kernel computes y[M, N] = x[M, K] @ W^T (+ bias) for a 2:4 sparse W [N, K] given in the
// *reordered* form that effkern/sparse24_cuda_layout.py produces (reorder_for_mma_sp; its header
// has the diagram and the PTX ISA rules behind it). Summary:
//   values_r  [N / 16, 8 K] in x's dtype: per 16 rows of W (one mma m16 tile), K / 32 (int8:
//             K / 64) tiles of 512 bytes, one per mma.sp; tile = 32 lanes x 16 bytes, each
//             lane's 16 bytes its four A-fragment registers of that mma.
//   meta_r    int32 [N / 16, K / 2]: per 16 rows, K / 64 blocks of 32 words, word l = lane l's
//             metadata register for the two 16-bit mma of that 64-wide k block (sparsity
//             selector 0 for the first, 1 for the second), or for the one int8 mma (selector 0).
// W is the sparse A operand (16 rows of W per m16 tile), x the dense B operand (8 rows of x per
// n8 tile): the mma computes W x^T = y^T, and the epilogue writes it transposed into y.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "launch_common.h"

namespace effkern_cuda {
namespace sp24 {

using common::DType;

// Granularity of the layout (mirrored in effkern/sparse24_cuda_layout.py).
constexpr int kTileRows = 16;  // rows of W per mma m16 tile / per row of values_r and meta_r
constexpr int kMetaK = 64;     // dense k per lane metadata word (16-bit: selectors 0 and 1)
constexpr int kThreads = 256;  // 8 warps per block, every configuration

// Tile configurations (block tile = rows of W x rows of x x dense k per pipeline stage, for
// 16-bit inputs; int8 takes twice the k per stage).
enum class Config : int {
  kDecode8 = 0,   //  64 x   8 x 128, 4 stages; warps 4 (W rows) x 2 (k halves): M <= 8
  kDecode16 = 1,  //  64 x  16 x 128, 4 stages; as kDecode8 with two n8 tiles:   M <= 16
  kMedium = 2,    // 128 x  64 x  64, 4 stages; warps 4 (W rows) x 2 (x rows):   M <= 64
  kLarge = 3,     // 128 x 128 x  64, 3 stages; warps 2 (W rows) x 4 (x rows):   M > 64
};

// Status codes (0 = ok); message() says more.
using common::kCudaError;
using common::kInvalidArgument;
using common::kOk;

// Largest M the launch grid takes (row blocks of x in grid.y, at most 65535 of 128 rows).
constexpr int64_t kMaxM = int64_t(65535) * 128;

// Largest K of int8 inputs: the int32 accumulator stays exact for any int8 values (at most K / 2
// = 2^16 products of magnitude <= 2^14 per sum).
constexpr int64_t kMaxInt8K = int64_t(1) << 17;

// True when the kernel handles W [n, k]: n % 16 == 0 and k % 64 == 0, both positive, and small
// enough for the kernel's 32-bit k arithmetic (int8: k <= kMaxInt8K). Any M in [0, kMaxM] is
// handled (rows past M are zero-filled and masked). Inline so the binding's checks and the
// launcher share it.
inline bool supports(bool int8_inputs, int64_t n, int64_t k) {
  return n > 0 && k > 0 && n % kTileRows == 0 && k % kMetaK == 0 &&
         k <= (int8_inputs ? kMaxInt8K : (int64_t(1) << 28)) && n <= (int64_t(1) << 30);
}

// Launch configuration, a function of the problem and the device's SM count.
struct Plan {
  Config config;
  int block_n;           // rows of W per block (the config's)
  int block_m;           // rows of x per block
  int block_k;           // dense k per pipeline stage
  int grid_n;            // ceil(N / block_n)
  int grid_m;            // ceil(M / block_m)
  int splits;            // K slices over blocks (grid.z), reduced by a second kernel when > 1
  int stages_per_split;  // pipeline stages per slice
  std::size_t smem_bytes;       // dynamic shared memory per block
  std::size_t workspace_bytes;  // partial sums (fp32; int8: int32), splits * M * N * 4 if splits > 1
};

// int8_inputs: x and W int8 (else both in the output's 16-bit dtype). num_sms <= 0: query the
// current device.
int make_plan(bool int8_inputs, int64_t m, int64_t n, int64_t k, int num_sms, Plan* plan);

struct LinearArgs {
  DType dtype;           // of out and bias; of x and values too unless int8_inputs
  bool int8_inputs;      // x and values int8: y = (acc * a_scale[m]) * w_scale[n] + bias[n]
  int64_t m, n, k;
  const void* x;         // [m, k] dense row-major, 16-byte aligned
  const void* values;    // values_r [n / 16, 8 k], 16-byte aligned
  const void* meta;      // meta_r int32 [n / 16, k / 2], 16-byte aligned
  const float* a_scale;  // int8: [m], the rows of x; else nullptr
  const float* w_scale;  // int8: [n], the rows of W; else nullptr
  const void* bias;      // [n] or nullptr
  void* out;             // [m, n] dense row-major, 8-byte aligned
  void* workspace;       // plan.workspace_bytes, 16-byte aligned (nullptr when 0)
  Plan plan;             // from make_plan for the same m, n, k
  cudaStream_t stream;
};

// y = x @ W^T (+ bias), int8: dequantized. Returns kOk or an error code (message() says why).
int linear(const LinearArgs& args);

// Thread-local description of the last error of make_plan / linear.
const char* message();

}  // namespace sp24
}  // namespace effkern_cuda
