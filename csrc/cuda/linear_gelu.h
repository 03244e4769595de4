// Plain C++ interface of the CUDA linear+bias+GELU kernels (csrc/cuda/linear_gelu.cu).
//
// This header is deliberately torch-free: it is included by the .cu file (compiled by nvcc
// with CUDA headers only, which keeps compile times short) and by the torch binding
// (linear_gelu_binding.cpp), which owns all tensor checks and allocations.
//
// Conventions
//   * Every matrix is described by a `Matrix` view: a logical [rows, cols] matrix stored
//     row-major (element (i, j) at data[i * ld + j]) or column-major (data[i + j * ld]).
//   * Outputs (out, gelu_grad, grad_z, grad_input, grad_weight, grad_bias) are dense row-major
//     buffers allocated by the caller.
//   * Every entry point returns an int status: kOk (0) on success; otherwise
//     status_name(status) gives the symbolic name (e.g. "CUBLAS_STATUS_NOT_SUPPORTED") and
//     last_error_message() a thread-local sentence saying which call failed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace effkern_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Status encoding.
constexpr int kOk = 0;
constexpr int kCublasStatusBase = 1000;  // 1000 + cublasStatus_t
constexpr int kCudaErrorBase = 2000;     // 2000 + cudaError_t
constexpr int kNoAlgorithm = 3001;       // cuBLASLt heuristic returned no algorithm
constexpr int kInvalidArgument = 3002;   // a launcher precondition was violated

// cuBLASLt workspace the binding should provide (32 MiB is what cuBLAS recommends on Hopper).
constexpr std::size_t kWorkspaceBytes = std::size_t(32) << 20;

struct Matrix {
  const void* data;
  int64_t rows;
  int64_t cols;
  int64_t ld;      // >= cols when row_major, >= rows otherwise
  bool row_major;
};

struct LinearGeluFwdArgs {
  DType dtype;
  int64_t m, n, k;      // input [m, k], weight [n, k], out [m, n]; k >= 1
  Matrix input;         // [m, k]
  Matrix weight;        // [n, k]
  const void* bias;     // [n] dense, 16-byte aligned, or nullptr
  void* out;            // [m, n] dense row-major
  void* gelu_grad;      // [m, n] dense row-major: gelu'(z) for the backward, or nullptr
  bool tanh_approx;     // GELU tanh approximation instead of the exact erf form
  bool allow_tf32;      // only used for kFloat32
  void* workspace;
  std::size_t workspace_bytes;
  cudaStream_t stream;
};

// out = gelu(z), z = input @ weight^T + bias; gelu_grad (if non-null) = gelu'(z).
int linear_gelu_fwd(const LinearGeluFwdArgs& args);

struct LinearGeluBwdArgs {
  DType dtype;
  int64_t m, n, k;
  const void* grad_out;  // [m, n] dense row-major
  const void* gelu_grad; // [m, n] dense row-major: gelu'(z), z the forward's pre-activation
  Matrix input;          // [m, k]; read only when grad_weight is computed (else may be empty)
  Matrix weight;         // [n, k]; read only when grad_input is computed (else may be empty)
  void* grad_z;          // [m, n] dense row-major scratch (required): grad_out * gelu'(z)
  void* grad_input;      // [m, k] or nullptr (not computed)
  void* grad_weight;     // [n, k] or nullptr (not computed)
  void* grad_bias;       // [n] or nullptr; written by the grad_weight GEMM epilogue if possible
  bool allow_tf32;
  void* workspace;
  std::size_t workspace_bytes;
  cudaStream_t stream;
};

// Computes grad_z, then grad_input = grad_z @ weight and grad_weight = grad_z^T @ input.
// *grad_bias_written is set to true only when grad_bias was produced by the cuBLASLt BGRADB
// epilogue; otherwise the caller reduces grad_z over its rows itself.
int linear_gelu_bwd(const LinearGeluBwdArgs& args, bool* grad_bias_written);

// Elementwise out = gelu(z) and gelu_grad = gelu'(z) on dense buffers of numel elements; either
// output may be nullptr (not written), and z may be the same buffer as either.
int gelu_fwd(DType dtype, const void* z, void* out, void* gelu_grad, int64_t numel, bool tanh_approx,
             cudaStream_t stream);

// Elementwise grad_z = grad_out * gelu_grad on dense buffers of numel elements.
int gelu_bwd(DType dtype, const void* grad_out, const void* gelu_grad, void* grad_z, int64_t numel,
             cudaStream_t stream);

const char* status_name(int status);
const char* last_error_message();

// CUDART_VERSION the kernels were compiled against (e.g. 13000).
int compiled_cuda_runtime_version();

}  // namespace effkern_cuda
