// 2:4 semi-structured sparse GEMM on the sparse tensor cores: y[M, N] = x[M, K] @ W^T (+ bias),
// W [N, K] 2:4 sparse along K, either
//   16-bit: x/W/bias/y float16 or bfloat16, fp32 accumulation (mma.sp m16n8k32), or
//   int8:   x and W int8 with float32 scales per row of x (a_scale) and of W (w_scale), exact
//           int32 accumulation (mma.sp m16n8k64 .s8), y = (acc * a_scale[m]) * w_scale[n] + bias[n]
//           in fp32, bias/y float16 or bfloat16 (W8A8, as effkern.int8.int8_matmul).
// In bytes the two are one kernel: an mma reads 64 bytes of each row of x (32 or 64 k) and 512
// bytes of values per m16 tile, and a metadata word covers 64 dense k (two 16-bit mma, with
// selectors 0 and 1, or one int8 mma, selector 0); only the dense k per byte differs.
//
// CUDA headers only (no torch); the binding is sparse24_binding.cpp. W arrives reordered offline
// by effkern/sparse24_cuda_layout.py (reorder_for_mma_sp; its header has the diagram and the PTX
// ISA rules it follows, and the CPU tests emulate the reads below lane by lane).
//
// Operands of mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16} (int8:
// m16n8k64.row.col.s32.s8.s8.s32, twice the k): A = W (the sparse operand: 16 rows of W x 32
// dense k, stored as 16 x 16 kept values + 2-bit indices), B = x^T (32 k x 8 rows of x; "col" B
// is x row-major, so ldmatrix of x rows gives B directly: for int8 too, each lane's B register j
// being the 4 bytes 16 j + 4 t .. of its row of the k64 step), D = y^T (16 rows of W x 8 rows of
// x). The epilogue transposes D through shared memory into y.
//
// Block = 8 warps, tile = BN rows of W x BM rows of x, pipeline stage = BK dense k (the 16-bit
// values below; int8 doubles BK and each warp's k, the bytes staying the same):
//   config     BN   BM   BK  stages  warps (W rows x x rows x k)  warp tile     blocks/SM  for
//   kDecode8   64    8  128     4    4 x 1 x 2                    16 x  8 x 64    >= 2     M <= 8
//   kDecode16  64   16  128     4    4 x 1 x 2                    16 x 16 x 64    >= 2     M <= 16
//   kMedium   128   64   64     4    4 x 2 x 1                    32 x 32 x 64    >= 2     M <= 64
//   kLarge    128  128   64     3    2 x 4 x 1                    64 x 32 x 64       1     M > 64
// (blocks/SM: the __launch_bounds__ minimum; kLarge's 64 fp32 accumulators per thread spill
// under the 128-register cap of 2 blocks, so it takes 1 block of 8 warps and a 3-deep pipeline.)
// Decode (M <= 16) reads the weight once per 16 rows of x: the 9/16 of the dense bytes (values +
// metadata) dominate; its warps split each 128-deep stage in two k halves and add their sums in
// shared memory at the end, and when the N / 64 blocks cannot fill the GPU, K is split over
// blocks too (grid.z): fp32 partial sums to a workspace, added in split order by a second kernel
// (deterministic, no atomics; int8: the slices' exact int32 sums are added in int64 and then
// dequantized, as one sum would be). The large tile is the compute-bound shape (16 mma.sp per mma step per warp, 64
// accumulators per thread).
//
// One pipeline stage in shared memory (kLarge: 8 KiB + 1 KiB + 16 KiB, 75 KiB for 3 stages; int8
// 2 KiB of metadata, 78 KiB):
//   [ values: BN / 16 m16 tiles x BK / kKStep mma steps x 512 B, exactly as in values_r       ]
//   [ meta:   BN / 16 m16 tiles x BK / 64 k64 blocks x 128 B, exactly as in meta_r             ]
//   [ x:      BM rows x BK k (2 or 1 B each); chunk c (16 B) of row r stored at chunk c ^ (r & 7)]
// all filled by 16-byte cp.async (values and metadata: contiguous runs of BK * 16 (int8: 8) and
// BK * 2 bytes per m16 tile; x: rows past M and k past K zero-filled). A warp then reads its A
// fragment registers with one 16-byte LDS per m16 tile and mma step (512 contiguous bytes per
// warp: no bank conflict), its metadata with one 4-byte LDS per m16 tile and k64 block, and its
// B fragments with one ldmatrix.x4 per n8 tile and mma step (the four 8x8 b16 matrices at bytes
// 0, 16, 32, 48 of the step are b0..b3; the XOR swizzle puts the 8 rows of a matrix in 8
// different 16-byte bank groups).
//
// Rows of W past N (N % 16 == 0 but not a multiple of BN) read the last valid m16 tile again
// (valid metadata: no undefined behavior) and their results are discarded; a warp whose slice of
// a stage lies past the end of its K range (K % BK != 0) skips its mma, and an int8 warp whose
// slice's second k64 step lies past it (K % 128 == 64) skips that step (warp-uniform branches:
// no mma reads metadata that was not copied).

#include "sparse24.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "device_common.cuh"

namespace effkern_cuda {
namespace sp24 {

using namespace common;

namespace {

thread_local ErrorLog g_errors{"effkern sparse24: "};

// ---------------------------------------------------------------------------------------
// Tile configurations
// ---------------------------------------------------------------------------------------

constexpr int kValueStepBytes = 512;  // one m16 tile x mma step of values_r: 32 lanes x 16 B
constexpr int kMetaBlockBytes = 128;  // one m16 x k64 block of meta_r: 32 lanes x 4 B

// What the kernel takes from its input type T (__half, __nv_bfloat16 or int8_t).
template <typename T>
struct Operand {
  static constexpr bool kInt8 = std::is_same<T, int8_t>::value;
  using Acc = typename std::conditional<kInt8, int32_t, float>::type;  // exact for int8
  static constexpr int kKStep = 64 / static_cast<int>(sizeof(T));  // dense k per mma: 32 or 64
  static constexpr int kStepsPerMetaWord = kMetaK / kKStep;        // 2 (selectors 0, 1) or 1
  static constexpr int kValueBytesPerK = kValueStepBytes / kKStep;  // of a values_r row: 16 or 8
};

template <typename T, int kWarpsN_, int kWarpsM_, int kWarpsK_, int kMI_, int kNI_, int kStages_,
          int kMinBlocks_, bool kStreamWeights_>
struct TileConfig {
  using Op = Operand<T>;
  static constexpr int kWarpsN = kWarpsN_;  // warps along the rows of W
  static constexpr int kWarpsM = kWarpsM_;  // warps along the rows of x
  static constexpr int kWarpsK = kWarpsK_;  // warps splitting each stage's k (2 mma steps each)
  static constexpr int kMI = kMI_;          // m16 tiles (16 rows of W) per warp
  static constexpr int kNI = kNI_;          // n8 tiles (8 rows of x) per warp
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__: blocks per SM
  // Weights read once per block (one row block of x): L2 evict-first for them (before sm_90,
  // see cp_async16_policy).
  static constexpr bool kStreamWeights = kStreamWeights_;

  static constexpr int kBlockN = kWarpsN * kMI * kTileRows;
  static constexpr int kBlockM = kWarpsM * kNI * 8;
  static constexpr int kWarpK = 2 * Op::kKStep;  // dense k of a warp's slice of a stage
  static constexpr int kBlockK = kWarpsK * kWarpK;

  static constexpr int kTileValueBytes = kBlockK / Op::kKStep * kValueStepBytes;  // 16 or 8 BK
  static constexpr int kTileMetaBytes = kBlockK / kMetaK * kMetaBlockBytes;       // = 2 BK
  static constexpr int kWarpMetaWords = kWarpK / kMetaK;  // per lane and m16 tile: 1 or 2
  static constexpr int kValueBytes = kBlockN / kTileRows * kTileValueBytes;
  static constexpr int kMetaBytes = kBlockN / kTileRows * kTileMetaBytes;
  static constexpr int kXRowBytes = kBlockK * static_cast<int>(sizeof(T));
  static constexpr int kXChunksPerRow = kXRowBytes / 16;
  static constexpr int kKPerXChunk = 16 / static_cast<int>(sizeof(T));
  static constexpr int kMetaOffset = kValueBytes;
  static constexpr int kXOffset = kValueBytes + kMetaBytes;
  static constexpr int kStageBytes = kXOffset + kBlockM * kXRowBytes;

  // Epilogue: Acc (4 bytes) [kWarpsK][BM][BN + 4] (the +4: conflict-free fragment stores).
  static constexpr int kRedStride = kBlockN + 4;
  static constexpr int kRedBytes = kWarpsK * kBlockM * kRedStride * 4;
  static constexpr int kSmemBytes =
      kStages * kStageBytes > kRedBytes ? kStages * kStageBytes : kRedBytes;

  // 16-byte chunks each stage copies
  static constexpr int kValueChunks = kValueBytes / 16;
  static constexpr int kValueChunksPerTile = kTileValueBytes / 16;
  static constexpr int kMetaChunks = kMetaBytes / 16;
  static constexpr int kMetaChunksPerTile = kTileMetaBytes / 16;
  static constexpr int kXChunks = kBlockM * kXChunksPerRow;

  static_assert(kWarpsN * kWarpsM * kWarpsK * 32 == kThreads, "8 warps per block");
  static_assert(kStages >= 3, "the pipeline needs at least 3 stages");
  static_assert(kXChunksPerRow >= 8 && (kXChunksPerRow & (kXChunksPerRow - 1)) == 0,
                "the x swizzle needs >= 8 (a power of 2) 16-byte chunks per row");
  static_assert(kBlockN % 32 == 0, "conflict-free epilogue stores need BN % 32 == 0");
  static_assert(kStageBytes % 16 == 0 && kMetaOffset % 16 == 0 && kXOffset % 16 == 0,
                "16-byte aligned stage parts");
};

template <typename T>
using Decode8 = TileConfig<T, 4, 1, 2, 1, 1, 4, 2, true>;
template <typename T>
using Decode16 = TileConfig<T, 4, 1, 2, 1, 2, 4, 2, true>;
template <typename T>
using Medium = TileConfig<T, 4, 2, 1, 2, 4, 4, 2, false>;
// 3 stages: 76800 B of shared memory (int8: 79872 B), which every sm_8x/sm_90 GPU grants a
// block (sm_86/sm_89 allow 99 KiB; 4 stages would need 102400 B)
template <typename T>
using Large = TileConfig<T, 2, 4, 1, 4, 4, 3, 1, false>;

template <typename T, typename F>
auto with_config(Config c, F&& f) -> decltype(f(Decode8<T>{})) {
  switch (c) {
    case Config::kDecode8: return f(Decode8<T>{});
    case Config::kDecode16: return f(Decode16<T>{});
    case Config::kMedium: return f(Medium<T>{});
    case Config::kLarge: break;
  }
  return f(Large<T>{});
}

// ---------------------------------------------------------------------------------------
// The sparse mma (per dtype)
// ---------------------------------------------------------------------------------------

// d += A (16 x 32, 2:4 sparse: a = its 16 x 16 kept values, e = their indices) * B (32 x 8, b);
// int8: A 16 x 64 (16 x 32 kept), B 64 x 8, d exact int32.
// kSel: the sparsity selector, i.e. which thread pair of each quad supplies e (0: threads 0, 1;
// 1: threads 2, 3); int8 m16n8k64 reads all four threads' e and takes selector 0.
// ordered_metadata: the two indices of every group are increasing from the LSB
// (reorder_for_mma_sp checks it), which PTX advises over plain mma.sp for performance. The
// ::ordered_metadata form needs PTX ISA 8.5 (CUDA 12.5); older toolkits get plain mma.sp, which
// reads metadata whose indices are increasing the same way.
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define EFFKERN_MMA_SP "mma.sp::ordered_metadata"
#else
#define EFFKERN_MMA_SP "mma.sp"
#endif
template <typename T, int kSel>
__device__ __forceinline__ void mma_sp(typename Operand<T>::Acc (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[4], uint32_t e) {
  static_assert(kSel >= 0 && kSel < Operand<T>::kStepsPerMetaWord,
                "m16n8k32 with 16-bit types takes selector 0 or 1, m16n8k64 with int8 selector 0");
  if constexpr (Operand<T>::kInt8) {
    asm(EFFKERN_MMA_SP ".sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e), "n"(kSel));
  } else if constexpr (std::is_same<T, __half>::value) {
    asm(EFFKERN_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e), "n"(kSel));
  } else {
    asm(EFFKERN_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e), "n"(kSel));
  }
}

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------

// One mma step of a warp: kStep 0 is the first half of the warp's slice of the stage (k32 of
// 16-bit, k64 of int8), 1 the second. 16-bit: both use the same metadata registers e (lane l's
// word of the k64 block), the selector choosing which thread pair's word the hardware reads;
// int8: each step has a word of its own (e[i][kStep]), selector 0.
template <typename T, typename Cfg, int kStep>
__device__ __forceinline__ void mma_step(typename Operand<T>::Acc (&acc)[Cfg::kMI][Cfg::kNI][4],
                                         const uint8_t* values_lane, uint32_t x_base,
                                         const uint32_t (&e)[Cfg::kMI][Cfg::kWarpMetaWords],
                                         int x_row0, int x_chunk0, int lane) {
  constexpr int kWord = kStep / Operand<T>::kStepsPerMetaWord;
  constexpr int kSel = kStep % Operand<T>::kStepsPerMetaWord;
  uint32_t a[Cfg::kMI][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMI; ++i) {
    const uint4 v = *reinterpret_cast<const uint4*>(values_lane + i * Cfg::kTileValueBytes +
                                                    kStep * kValueStepBytes);
    a[i][0] = v.x;
    a[i][1] = v.y;
    a[i][2] = v.z;
    a[i][3] = v.w;
  }
  // ldmatrix.x4: lanes 8q .. 8q + 7 address the rows of matrix q = rows x_row0 + 8j + 0..7 of
  // x at chunk x_chunk0 + 4 kStep + q (bytes 16q .. of the step); matrix q lands in b[q]. One n8
  // tile at a time keeps 4 B registers live instead of 4 kNI.
  const int chunk = x_chunk0 + kStep * 4 + (lane >> 3);
#pragma unroll
  for (int j = 0; j < Cfg::kNI; ++j) {
    uint32_t b[4];
    const int r = x_row0 + j * 8 + (lane & 7);  // r & 7 == lane & 7
    ldmatrix_x4(b, x_base + r * Cfg::kXRowBytes + ((chunk ^ (lane & 7)) << 4));
#pragma unroll
    for (int i = 0; i < Cfg::kMI; ++i) mma_sp<T, kSel>(acc[i][j], a[i], b, e[i][kWord]);
  }
}

// The fp32 sums of an output quad y[row, col .. col + 3] from the accumulators' sums s: as they
// are (16-bit), or int8's exact sums dequantized, (s * a_scale[row]) * w_scale[col + c], in the
// order of effkern.int8.int8_matmul_reference.
__device__ __forceinline__ float4 output_sums(const float4& s, const float*, const float*, int,
                                              int) {
  return s;
}
__device__ __forceinline__ float4 output_sums(const int4& s, const float* a_scale,
                                              const float* w_scale, int row, int col) {
  const float as = a_scale[row];
  return make_float4(static_cast<float>(s.x) * as * w_scale[col],
                     static_cast<float>(s.y) * as * w_scale[col + 1],
                     static_cast<float>(s.z) * as * w_scale[col + 2],
                     static_cast<float>(s.w) * as * w_scale[col + 3]);
}

using common::add_to;  // float4; int4 here
__device__ __forceinline__ void add_to(int4& sum, const int4& v) {
  sum.x += v.x;
  sum.y += v.y;
  sum.z += v.z;
  sum.w += v.w;
}

// grid = (ceil(N / BN), ceil(M / BM), splits). ws == nullptr: write out (+ bias) directly;
// otherwise partial sums ws[split][M][N] for the reduction: fp32 for splitk_reduce_kernel, int8's
// exact int32 ones for splitk_reduce_int8_kernel. T: x's and the values'
// type; TOut: out's and bias's (T itself for 16-bit; a_scale and w_scale only for int8).
template <typename T, typename TOut, typename Cfg>
__global__ void __launch_bounds__(kThreads, Cfg::kMinBlocks)
    sparse24_kernel(const T* __restrict__ x, const uint8_t* __restrict__ values,
                    const uint8_t* __restrict__ meta, const float* __restrict__ a_scale,
                    const float* __restrict__ w_scale, const TOut* __restrict__ bias,
                    TOut* __restrict__ out, float* __restrict__ ws, int M, int N, int K,
                    int stages_per_split, int total_stages) {
  using Op = Operand<T>;
  using Acc = typename Op::Acc;
  using Acc4 = typename std::conditional<Op::kInt8, int4, float4>::type;
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int kBN = Cfg::kBlockN, kBM = Cfg::kBlockM, kBK = Cfg::kBlockK;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wn = warp % Cfg::kWarpsN;
  const int wm = (warp / Cfg::kWarpsN) % Cfg::kWarpsM;
  const int wk = warp / (Cfg::kWarpsN * Cfg::kWarpsM);

  const int n0 = blockIdx.x * kBN;
  const int m0 = blockIdx.y * kBM;
  const int split = blockIdx.z;
  const int stage_begin = split * stages_per_split;
  const int n_stages = min(stages_per_split, total_stages - stage_begin);
  const int k_end = min(K, (stage_begin + n_stages) * kBK);

  const int tile0 = n0 / kTileRows;
  const int last_tile = N / kTileRows - 1;
  // values_r row: 8 K values; meta_r row: K / 2 words
  const size_t value_row_bytes = static_cast<size_t>(K) * Op::kValueBytesPerK;
  const size_t meta_row_bytes = static_cast<size_t>(K) * 2;
  uint64_t weight_policy = 0;
  if constexpr (Cfg::kStreamWeights) weight_policy = l2_evict_first_policy();

  auto load_stage = [&](int stage, int slot) {
    uint8_t* dst = smem + slot * Cfg::kStageBytes;
    const int k0 = stage * kBK;
    // values: m16 tile `tile` of the block, bytes [b k0, b (k0 + BK)) of its values_r row, b =
    // its bytes per dense k (16 or 8)
#pragma unroll
    for (int i = 0; i < (Cfg::kValueChunks + kThreads - 1) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      if (Cfg::kValueChunks % kThreads == 0 || idx < Cfg::kValueChunks) {
        const int tile = idx / Cfg::kValueChunksPerTile;
        const int off = idx % Cfg::kValueChunksPerTile;
        if (k0 + (off / 32) * Op::kKStep < K) {  // 32 chunks per mma step
          const int trow = min(tile0 + tile, last_tile);
          const uint8_t* src = values + static_cast<size_t>(trow) * value_row_bytes +
                               static_cast<size_t>(k0) * Op::kValueBytesPerK + off * 16;
          if constexpr (Cfg::kStreamWeights)
            cp_async16_policy(smem_u32(dst + idx * 16), src, weight_policy);
          else
            cp_async16(smem_u32(dst + idx * 16), src);
        }
      }
    }
    // metadata: m16 tile `tile`, bytes [2 k0, 2 (k0 + BK)) of its meta_r row
#pragma unroll
    for (int i = 0; i < (Cfg::kMetaChunks + kThreads - 1) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      if (Cfg::kMetaChunks % kThreads == 0 || idx < Cfg::kMetaChunks) {
        const int tile = idx / Cfg::kMetaChunksPerTile;  // BK / 8 chunks per m16 tile
        const int off = idx % Cfg::kMetaChunksPerTile;
        if (k0 + (off / 8) * kMetaK < K) {  // 8 chunks per k64 block
          const int trow = min(tile0 + tile, last_tile);
          const uint8_t* src = meta + static_cast<size_t>(trow) * meta_row_bytes +
                               static_cast<size_t>(k0) * 2 + off * 16;
          cp_async16(smem_u32(dst + Cfg::kMetaOffset + idx * 16), src);
        }
      }
    }
    // x: row r, chunk c (16 bytes: 8 or 16 values of k) -> chunk c ^ (r & 7) of row r; zeros
    // past M or K
#pragma unroll
    for (int i = 0; i < (Cfg::kXChunks + kThreads - 1) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      if (Cfg::kXChunks % kThreads == 0 || idx < Cfg::kXChunks) {
        const int r = idx / Cfg::kXChunksPerRow;
        const int c = idx % Cfg::kXChunksPerRow;
        const int row = m0 + r;
        const int kk = k0 + c * Cfg::kKPerXChunk;
        const bool valid = row < M && kk < K;
        const T* src = x + (valid ? static_cast<size_t>(row) * K + kk : 0);
        cp_async16_zfill(
            smem_u32(dst + Cfg::kXOffset + r * Cfg::kXRowBytes + ((c ^ (r & 7)) << 4)), src,
            valid);
      }
    }
  };

  Acc acc[Cfg::kMI][Cfg::kNI][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = Acc(0);

  // Prologue: stages 0 .. kStages - 2 in flight, one commit group per stage (empty ones too,
  // so that wait_group<kStages - 2> below always means "stage `it` has landed").
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < n_stages) load_stage(stage_begin + s, s);
    cp_async_commit();
  }

  const int x_row0 = wm * Cfg::kNI * 8;
  const int x_chunk0 = wk * (Cfg::kWarpK / Cfg::kKPerXChunk);  // 8 chunks per warp slice
  for (int it = 0; it < n_stages; ++it) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // stage `it` visible to all; every warp is done with stage it - 1
    {
      const int next = it + Cfg::kStages - 1;  // refills the slot of stage it - 1
      if (next < n_stages) load_stage(stage_begin + next, next % Cfg::kStages);
      cp_async_commit();
    }
    const uint8_t* st = smem + (it % Cfg::kStages) * Cfg::kStageBytes;
    const int k_warp = (stage_begin + it) * kBK + wk * Cfg::kWarpK;
    if (k_warp < k_end) {  // warp-uniform
      // this lane's 16 bytes of the warp's first m16 tile, first mma step of its slice
      const uint8_t* values_lane =
          st + (wn * Cfg::kMI) * Cfg::kTileValueBytes + wk * 2 * kValueStepBytes + lane * 16;
      const uint8_t* meta_lane = st + Cfg::kMetaOffset + (wn * Cfg::kMI) * Cfg::kTileMetaBytes +
                                 wk * Cfg::kWarpMetaWords * kMetaBlockBytes + lane * 4;
      uint32_t e[Cfg::kMI][Cfg::kWarpMetaWords];
#pragma unroll
      for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
        for (int w = 0; w < Cfg::kWarpMetaWords; ++w)
          e[i][w] = *reinterpret_cast<const uint32_t*>(meta_lane + i * Cfg::kTileMetaBytes +
                                                       w * kMetaBlockBytes);
      const uint32_t x_base = smem_u32(st + Cfg::kXOffset);
      mma_step<T, Cfg, 0>(acc, values_lane, x_base, e, x_row0, x_chunk0, lane);
      // a 16-bit slice (k64) lies wholly inside K or past it; an int8 one (k128) may end at its
      // first step (K % 64 == 0 only)
      if (!Op::kInt8 || k_warp + Op::kKStep < k_end)
        mma_step<T, Cfg, 1>(acc, values_lane, x_base, e, x_row0, x_chunk0, lane);
    }
  }

  // Epilogue: D = y^T fragments -> shared memory as [k warp][row of x][row of W] (Acc), then
  // every thread takes 4 consecutive columns of y, adds the k warps' sums in order (exactly, for
  // int8), dequantizes (int8), adds the bias and stores them (y rows are contiguous along N:
  // coalesced).
  cp_async_wait<0>();
  __syncthreads();  // pipeline buffers free: every copy landed, every warp past its last stage
  Acc* red = reinterpret_cast<Acc*>(smem);
  {
    const int g = lane >> 2;  // D row (row of W) within the m16 tile; +8 for d2, d3
    const int t = lane & 3;   // D columns 2t, 2t + 1 (rows of x) within the n8 tile
#pragma unroll
    for (int i = 0; i < Cfg::kMI; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::kNI; ++j) {
        const int n_local = (wn * Cfg::kMI + i) * kTileRows + g;
        const int m_local = x_row0 + j * 8 + 2 * t;
        Acc* p = red + (wk * kBM + m_local) * Cfg::kRedStride + n_local;
        p[0] = acc[i][j][0];
        p[Cfg::kRedStride] = acc[i][j][1];
        p[8] = acc[i][j][2];
        p[Cfg::kRedStride + 8] = acc[i][j][3];
      }
    }
  }
  __syncthreads();
  constexpr int kQuadsPerRow = kBN / 4;
  constexpr int kQuads = kBM * kQuadsPerRow;
#pragma unroll
  for (int i = 0; i < (kQuads + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    if (kQuads % kThreads != 0 && idx >= kQuads) break;
    const int m_local = idx / kQuadsPerRow;
    const int n_local = (idx % kQuadsPerRow) * 4;
    Acc4 sum = *reinterpret_cast<const Acc4*>(red + m_local * Cfg::kRedStride + n_local);
#pragma unroll
    for (int w = 1; w < Cfg::kWarpsK; ++w) {
      add_to(sum, *reinterpret_cast<const Acc4*>(
                      red + (w * kBM + m_local) * Cfg::kRedStride + n_local));
    }
    const int row = m0 + m_local;
    const int col = n0 + n_local;
    if (row < M && col < N) {
      if (Op::kInt8 && ws != nullptr)
        *reinterpret_cast<Acc4*>(reinterpret_cast<Acc*>(ws) +
                                 (static_cast<size_t>(split) * M + row) * N + col) = sum;
      else
        write_output_quad(output_sums(sum, a_scale, w_scale, row, col), ws, split, out, bias, row,
                          col, M, N);
    }
  }
}

// out[m, n] = (the split-K partials of int8, ws[split][m][n] exact int32, added in int64 and
// rounded once to fp32) * a_scale[m] * w_scale[n] + bias[n], rounded once to TOut: the one sum's
// dequantization, as without a split (and as effkern.int8.int8_matmul_reference).
template <typename TOut>
__global__ void __launch_bounds__(256)
    splitk_reduce_int8_kernel(const int4* __restrict__ ws, const float* __restrict__ a_scale,
                              const float* __restrict__ w_scale, const TOut* __restrict__ bias,
                              TOut* __restrict__ out, int M, int N, int splits) {
  const size_t quads = static_cast<size_t>(M) * N / 4;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += stride) {
    const int4 first = ws[i];
    long long x = first.x, y = first.y, z = first.z, w = first.w;
    for (int s = 1; s < splits; ++s) {
      const int4 p = ws[static_cast<size_t>(s) * quads + i];
      x += p.x;
      y += p.y;
      z += p.z;
      w += p.w;
    }
    const int row = static_cast<int>(i * 4 / static_cast<size_t>(N));
    const int col = static_cast<int>(i * 4 % static_cast<size_t>(N));  // N % 4 == 0: one row
    const float as = a_scale[row];
    float4 sum = make_float4(static_cast<float>(x) * as * w_scale[col],
                             static_cast<float>(y) * as * w_scale[col + 1],
                             static_cast<float>(z) * as * w_scale[col + 2],
                             static_cast<float>(w) * as * w_scale[col + 3]);
    if (bias != nullptr) add_bias(sum, bias, col);
    reinterpret_cast<uint2*>(out)[i] = round_quad<TOut>(sum);
  }
}

// finish_gemm_launch's int8 counterpart: the reduction is splitk_reduce_int8_kernel.
template <typename TOut>
int finish_int8_launch(const LinearArgs& a) {
  return finish_split_k_launch(g_errors, a, [&](unsigned blocks) {
    splitk_reduce_int8_kernel<TOut><<<blocks, 256, 0, a.stream>>>(
        static_cast<const int4*>(a.workspace), a.a_scale, a.w_scale,
        static_cast<const TOut*>(a.bias), static_cast<TOut*>(a.out), static_cast<int>(a.m),
        static_cast<int>(a.n), a.plan.splits);
  });
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

template <typename T, typename TOut, typename Cfg>
int launch(const LinearArgs& a) {
  const Plan& p = a.plan;
  constexpr auto kernel = sparse24_kernel<T, TOut, Cfg>;
  constexpr int kSmem = Cfg::kSmemBytes;
  const int st = allow_dynamic_smem<kernel>(g_errors, kSmem);
  if (st != kOk) return st;
  const bool split = p.splits > 1;
  const dim3 grid(static_cast<unsigned>(p.grid_n), static_cast<unsigned>(p.grid_m),
                  static_cast<unsigned>(p.splits));
  const int total_stages = static_cast<int>((a.k + Cfg::kBlockK - 1) / Cfg::kBlockK);
  kernel<<<grid, kThreads, kSmem, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const uint8_t*>(a.values),
      static_cast<const uint8_t*>(a.meta), a.a_scale, a.w_scale,
      split ? nullptr : static_cast<const TOut*>(a.bias), static_cast<TOut*>(a.out),
      split ? static_cast<float*>(a.workspace) : nullptr, static_cast<int>(a.m),
      static_cast<int>(a.n), static_cast<int>(a.k), p.stages_per_split, total_stages);
  if constexpr (Operand<T>::kInt8) return finish_int8_launch<TOut>(a);
  return finish_gemm_launch<TOut>(g_errors, a);
}

Config config_for(int64_t m) {
  if (m <= 8) return Config::kDecode8;
  if (m <= 16) return Config::kDecode16;
  if (m <= 64) return Config::kMedium;
  return Config::kLarge;
}

// What a plan takes from its tile configuration.
struct ConfigShape {
  int block_n, block_m, block_k;
  int stages;  // pipeline depth
  size_t smem_bytes;
};

template <typename T>
ConfigShape config_shape_of(Config c) {
  return with_config<T>(c, [](auto cfg) {
    using Cfg = decltype(cfg);
    return ConfigShape{Cfg::kBlockN, Cfg::kBlockM, Cfg::kBlockK, Cfg::kStages,
                       static_cast<size_t>(Cfg::kSmemBytes)};
  });
}

// Both 16-bit types have the same shapes.
ConfigShape config_shape(Config c, bool int8_inputs) {
  return int8_inputs ? config_shape_of<int8_t>(c) : config_shape_of<__half>(c);
}

// supports()'s rule, for messages.
const char* shape_rule(bool int8_inputs) {
  return int8_inputs ? "N % 16 == 0, K % 64 == 0, K <= 131072" : "N % 16 == 0, K % 64 == 0";
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

int make_plan(bool int8_inputs, int64_t m, int64_t n, int64_t k, int num_sms, Plan* plan) {
  if (m < 1 || m > kMaxM)
    return g_errors.fail(kInvalidArgument, "make_plan needs 1 <= M <= %lld (got %lld)",
                         static_cast<long long>(kMaxM), static_cast<long long>(m));
  if (!supports(int8_inputs, n, k))
    return g_errors.fail(kInvalidArgument, "unsupported shape N = %lld, K = %lld (needs %s)",
                         static_cast<long long>(n), static_cast<long long>(k),
                         shape_rule(int8_inputs));
  if (m * n > (int64_t(1) << 40))
    return g_errors.fail(kInvalidArgument, "M * N = %lld is too large",
                         static_cast<long long>(m * n));
  if (num_sms <= 0) {
    const int st = device_sm_count(g_errors, &num_sms);
    if (st != kOk) return st;
  }
  Plan p{};
  p.config = config_for(m);
  const ConfigShape shape = config_shape(p.config, int8_inputs);
  p.block_n = shape.block_n;
  p.block_m = shape.block_m;
  p.block_k = shape.block_k;
  p.smem_bytes = shape.smem_bytes;
  p.grid_n = static_cast<int>((n + p.block_n - 1) / p.block_n);
  const int64_t grid_m = (m + p.block_m - 1) / p.block_m;
  if (grid_m > kMaxGridY)
    return g_errors.fail(kInvalidArgument, "M = %lld needs %lld row blocks (max %lld)",
                         static_cast<long long>(m), static_cast<long long>(grid_m),
                         static_cast<long long>(kMaxGridY));
  p.grid_m = static_cast<int>(grid_m);
  plan_split_k(&p, m, n, static_cast<int>((k + p.block_k - 1) / p.block_k), shape.stages,
               num_sms);
  *plan = p;
  return kOk;
}

int linear(const LinearArgs& a) {
  const Plan& p = a.plan;
  if (!supports(a.int8_inputs, a.n, a.k))
    return g_errors.fail(kInvalidArgument, "unsupported shape N = %lld, K = %lld (needs %s)",
                         static_cast<long long>(a.n), static_cast<long long>(a.k),
                         shape_rule(a.int8_inputs));
  if (a.m == 0) return kOk;
  if (a.m < 0 || a.m > kMaxM)
    return g_errors.fail(kInvalidArgument, "M = %lld out of range", static_cast<long long>(a.m));
  // The plan must be the one make_plan gives for this problem's tile configuration.
  const Config config = config_for(a.m);
  const ConfigShape shape = config_shape(config, a.int8_inputs);
  if (p.config != config || p.block_n != shape.block_n || p.block_m != shape.block_m ||
      p.block_k != shape.block_k || int64_t(p.grid_n) * p.block_n < a.n ||
      int64_t(p.grid_n - 1) * p.block_n >= a.n || int64_t(p.grid_m) * p.block_m < a.m ||
      !split_k_matches(p.splits, p.stages_per_split, (a.k + shape.block_k - 1) / shape.block_k))
    return g_errors.fail(kInvalidArgument, "the plan does not match the problem (make it with "
                                           "make_plan for the same M, N, K)");
  if (p.splits > 1 && a.workspace == nullptr)
    return g_errors.fail(kInvalidArgument, "a split-K plan needs a workspace of %zu bytes",
                         p.workspace_bytes);
  if (!aligned(a.x, 16) || !aligned(a.values, 16) || !aligned(a.meta, 16) ||
      !aligned(a.out, 8) || !aligned(a.workspace, 16) || !aligned(a.bias, 8))
    return g_errors.fail(kInvalidArgument, "x, values, meta and the workspace must be 16-byte "
                                           "aligned, out and bias 8-byte aligned");
  if (a.int8_inputs && (a.a_scale == nullptr || a.w_scale == nullptr))
    return g_errors.fail(kInvalidArgument, "int8 inputs need a_scale and w_scale");
  // input type T (x and values), output type TOut (out and bias)
  auto run = [&](auto input_tag, auto output_tag) {
    using T = decltype(input_tag);
    using TOut = decltype(output_tag);
    return with_config<T>(p.config,
                          [&](auto cfg) { return launch<T, TOut, decltype(cfg)>(a); });
  };
  switch (a.dtype) {
    case DType::kFloat16:
      return a.int8_inputs ? run(int8_t{}, __half{}) : run(__half{}, __half{});
    case DType::kBFloat16:
      return a.int8_inputs ? run(int8_t{}, __nv_bfloat16{})
                           : run(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return g_errors.fail(kInvalidArgument, "unsupported dtype %d", static_cast<int>(a.dtype));
}

const char* message() { return g_errors.message(); }

}  // namespace sp24
}  // namespace effkern_cuda
