// CUDA pieces shared by effkern's split-K GEMM kernels (int4.cu, sparse24.cu): the error text of
// their C++ APIs, the PTX wrappers of their cp.async pipelines, the fp32 -> 16-bit output quad,
// the ordered split-K reduction and the launch helpers around the kernels.
//
// CUDA headers only (no torch): for .cu files. Everything is in an unnamed namespace, so each .cu
// has its own copy of the kernel stubs, the static per-device caches and the opt-in flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "launch_common.h"

namespace effkern_cuda {
namespace common {
namespace {

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

// The last error of one kernel's C++ API, what its message() returns. Each .cu keeps one,
// thread_local, so that a failure on one thread cannot change the text another thread reads.
class ErrorLog {
 public:
  // prefix starts every message: the kernel's name ("effkern int4: ").
  constexpr explicit ErrorLog(const char* prefix) : prefix_(prefix) {}

  // Sets the text (prefix, then printf format) and returns `status`: `return errors.fail(...)`.
  __attribute__((format(printf, 3, 4))) int fail(int status, const char* fmt, ...) {
    const int used = std::snprintf(text_, sizeof(text_), "%s", prefix_);
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(text_ + used, sizeof(text_) - used, fmt, ap);
    va_end(ap);
    return status;
  }

  // The CUDA runtime call `call` (its source text) returned `err`.
  int fail_cuda(cudaError_t err, const char* call) {
    return fail(kCudaError, "%s failed with %s (%d): %s", call, cudaGetErrorName(err),
                static_cast<int>(err), cudaGetErrorString(err));
  }

  const char* message() const { return text_; }

 private:
  const char* prefix_;
  char text_[512] = "";
};

// Returns the ErrorLog's status from the enclosing function when the CUDA runtime call fails.
#define EFFKERN_CUDA_TRY(errors, call)                                                 \
  do {                                                                                 \
    const cudaError_t effkern_err_ = (call);                                           \
    if (effkern_err_ != cudaSuccess) return (errors).fail_cuda(effkern_err_, #call);   \
  } while (0)

// ---------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// For data read once (streamed weights): first out of L2.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// 16 bytes global -> shared (L1 bypassed).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

// The same with an L2 cache policy, on sm_80 to sm_89. Not from sm_90 on: ptxas (12.8 to 13.0)
// encodes the hinted copy there as LDGSTS [Rx+UR0], desc[UR1] whichever uniform registers it
// loaded the shared base and the policy into (the same instruction bits), so the copy would read
// two uniform registers nothing wrote; tests/test_cuda_sass.py checks the build. The hint only
// steers L2 caching: the plain copy moves the same bytes.
__device__ __forceinline__ void cp_async16_policy(uint32_t dst, const void* src, uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)policy;
  cp_async16(dst, src);
#else
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(src), "l"(policy)
               : "memory");
#endif
}

// 16 bytes, or 16 zero bytes when !valid (src-size 0: nothing is read from src).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// "memory": it reads shared memory that cp.async and plain stores write, so the compiler must
// not move it across them (or across the barriers between them)
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// ---------------------------------------------------------------------------------------
// Output quads: 4 consecutive columns of y, summed in fp32, rounded once to T (half or bf16)
// ---------------------------------------------------------------------------------------

template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
  To r;
  memcpy(&r, &v, sizeof(To));
  return r;
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// (lo, hi) rounded to the nearest T, packed in one word, lo in the low half.
template <typename T>
__device__ uint32_t round_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t round_pair<__half>(float lo, float hi) {
  return bits_as<uint32_t>(__floats2half2_rn(lo, hi));
}

template <>
__device__ __forceinline__ uint32_t round_pair<__nv_bfloat16>(float lo, float hi) {
  return bits_as<uint32_t>(__floats2bfloat162_rn(lo, hi));
}

__device__ __forceinline__ void add_to(float4& sum, const float4& v) {
  sum.x += v.x;
  sum.y += v.y;
  sum.z += v.z;
  sum.w += v.w;
}

// sum += bias[col .. col + 3].
template <typename T>
__device__ __forceinline__ void add_bias(float4& sum, const T* bias, int col) {
  sum.x += to_float(bias[col]);
  sum.y += to_float(bias[col + 1]);
  sum.z += to_float(bias[col + 2]);
  sum.w += to_float(bias[col + 3]);
}

// The quad rounded once to T, for one 8-byte store.
template <typename T>
__device__ __forceinline__ uint2 round_quad(const float4& sum) {
  uint2 packed;
  packed.x = round_pair<T>(sum.x, sum.y);
  packed.y = round_pair<T>(sum.z, sum.w);
  return packed;
}

// A block's output quad y[row, col .. col + 3]: with a workspace (split K), the fp32 sums into
// this split's slice ws[split][M][N] for splitk_reduce_kernel; without, (+ bias) into out.
template <typename T>
__device__ __forceinline__ void write_output_quad(float4 sum, float* ws, int split, T* out,
                                                  const T* bias, int row, int col, int M,
                                                  int N) {
  if (ws != nullptr) {
    *reinterpret_cast<float4*>(ws + (static_cast<size_t>(split) * M + row) * N + col) = sum;
  } else {
    if (bias != nullptr) add_bias(sum, bias, col);
    *reinterpret_cast<uint2*>(out + static_cast<size_t>(row) * N + col) = round_quad<T>(sum);
  }
}

// out[m, n] = (sum over splits, in order, of ws[split][m][n]) + bias[n], rounded once.
template <typename T>
__global__ void __launch_bounds__(256)
    splitk_reduce_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                         T* __restrict__ out, int M, int N, int splits) {
  const size_t quads = static_cast<size_t>(M) * N / 4;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += stride) {
    const float4* partial = reinterpret_cast<const float4*>(ws) + i;
    float4 sum = partial[0];
    for (int s = 1; s < splits; ++s) add_to(sum, partial[static_cast<size_t>(s) * quads]);
    if (bias != nullptr) add_bias(sum, bias, static_cast<int>((i * 4) % static_cast<size_t>(N)));
    reinterpret_cast<uint2*>(out)[i] = round_quad<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------

constexpr int kMaxDevices = 64;

// The current device's SM count, queried once per device.
int device_sm_count(ErrorLog& errors, int* sms) {
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  EFFKERN_CUDA_TRY(errors, cudaGetDevice(&device));
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *sms = cached;
      return kOk;
    }
  }
  int count = 0;
  EFFKERN_CUDA_TRY(errors,
                   cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (count <= 0) return errors.fail(kCudaError, "the device reports %d SMs", count);
  if (cacheable) cache[device].store(count, std::memory_order_relaxed);
  *sms = count;
  return kOk;
}

// Lets kKernel take `bytes` of dynamic shared memory. Above 48 KiB a kernel must opt in, on
// every device; done once per device (the flags are per kKernel: one template instance each).
template <auto kKernel>
int allow_dynamic_smem(ErrorLog& errors, int bytes) {
  if (bytes <= 48 * 1024) return kOk;
  static std::atomic<uint64_t> configured{0};  // bit d: done on device d
  int device = 0;
  EFFKERN_CUDA_TRY(errors, cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? (uint64_t(1) << device) : 0;
  if (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit)) {
    EFFKERN_CUDA_TRY(errors, cudaFuncSetAttribute(
                                 kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  return kOk;
}

// Call right after launching a GEMM kernel with LinearArgs `a`: reports a failed launch, and when
// the plan splits K, calls launch_reduce(blocks) to launch the second kernel (256 threads per
// block, one thread per output quad in grid-stride loops) and reports that launch.
template <typename LinearArgs, typename LaunchReduce>
int finish_split_k_launch(ErrorLog& errors, const LinearArgs& a, LaunchReduce&& launch_reduce) {
  EFFKERN_CUDA_TRY(errors, cudaGetLastError());
  if (a.plan.splits <= 1) return kOk;
  int sms = 0;
  const int st = device_sm_count(errors, &sms);
  if (st != kOk) return st;
  const size_t quads = static_cast<size_t>(a.m) * a.n / 4;
  const size_t blocks = std::min<size_t>((quads + 255) / 256, static_cast<size_t>(sms) * 8);
  launch_reduce(static_cast<unsigned>(std::max<size_t>(blocks, 1)));
  EFFKERN_CUDA_TRY(errors, cudaGetLastError());
  return kOk;
}

// finish_split_k_launch with splitk_reduce_kernel: out = ordered sum of the workspace's fp32
// slices (+ bias).
template <typename T, typename LinearArgs>
int finish_gemm_launch(ErrorLog& errors, const LinearArgs& a) {
  return finish_split_k_launch(errors, a, [&](unsigned blocks) {
    splitk_reduce_kernel<T><<<blocks, 256, 0, a.stream>>>(
        static_cast<const float*>(a.workspace), static_cast<const T*>(a.bias),
        static_cast<T*>(a.out), static_cast<int>(a.m), static_cast<int>(a.n), a.plan.splits);
  });
}

}  // namespace
}  // namespace common
}  // namespace effkern_cuda
