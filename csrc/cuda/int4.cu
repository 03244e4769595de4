// Small-M (decoding) W4A16 kernel in the Marlin style: y[M, N] = x[M, K] @ W^T (+ bias) with
// W[n, k] = (q[n, k] - z[n, k / G]) * s[n, k / G], q 4-bit, x/s/z/y float16 or bfloat16.
//
// CUDA headers only (no torch); the binding is int4_binding.cpp. The weight is pre-shuffled
// offline by effkern/int4_cuda_layout.py (shuffle_for_cuda; its header has the diagram).
//
// Operands of mma.sync.m16n8k16.row.col (fp32 accumulation): A = x (16 rows per m-tile, rows
// past M zero-filled), B = W^T (k16 x n8). Padding x to 16 rows wastes tensor-core work (15/16
// of it at M = 1), which a decode step does not notice: it is bound by reading the weight. W as
// the B operand gives every lane pairs of consecutive k of one output column per register,
// which is what two nibbles of one word become after one lop3, so the offline shuffle can turn
// all of a lane's fragments into one 16-byte load. (x as B, n8 = tokens, would waste less
// compute at M <= 8; a memory-bound kernel does not need it.)
//
// Block = 8 warps (256 threads), output tile = (16 * MT) rows x 64 columns, MT in 1..4.
// Pipeline stage = 128 values of k: the 8 warps split it, warp w taking the k16 tile w, so all
// warps accumulate the same output tile over different k; at the end they add their partial
// sums in shared memory in a fixed order. One stage in shared memory (MT = 1: 9 KiB):
//     [  4096 B  weights: 8 shuffled k16 x n64 tiles, 512 B each, tile w = warp w's ]
//     [ MT*4 KiB x: 16*MT rows x 128 k, 16-byte chunks XOR-swizzled by row (ldmatrix)  ]
//     [   512 B  scales: up to 4 group rows x 64 columns (prepared order)             ]
//     [   512 B  zeros:  the same                                                      ]
// filled by cp.async (16 bytes per thread and instruction; the weight with an L2 evict-first
// policy before sm_90: it is read once), kStages = 4 deep. When N / 64 blocks cannot fill the
// GPU, K is also split over blocks (grid.z); each writes fp32 partial sums to a workspace and a
// second kernel adds them in split order, adds the bias and rounds (deterministic, no atomics).
//
// Dequantization of one 32-bit word (8 nibbles, see the layout): for p = 0..3,
//   bits = ((word >> 4p) & 0x000f000f) | MAGIC      (one lop3)
// puts nibble p in the low half and nibble p + 4 in the high half of a 16-bit pair whose value
// is BIAS + q, BIAS = 1024 (float16, MAGIC 0x6400 = 1024.0) or 128 (bfloat16, 0x4300 = 128.0),
// both with unit spacing, so BIAS + q is exact. The prepared zeros hold BIAS + z, so one
// subtraction gives q - z exactly, and one multiplication by the scale rounds once: the same
// value as (q - z) * s computed in any wider precision and rounded once to the 16-bit type.

#include "int4.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "device_common.cuh"

namespace effkern_cuda {
namespace w4a16 {

using namespace common;

namespace {

thread_local ErrorLog g_errors{"effkern int4: "};

// ---------------------------------------------------------------------------------------
// Shared-memory geometry
// ---------------------------------------------------------------------------------------

constexpr int kNSub = kTileN / 8;                        // 8 n8-subtiles per block tile
constexpr int kTileBytes = 32 * 16;                      // one k16 x n64 tile: 32 lanes x 16 B
constexpr int kStageWeightBytes = kTileBytes * kWarps;   // 4096
constexpr int kXRowBytes = kStageK * 2;                  // 256: one row of x per stage
constexpr int kXChunks = kXRowBytes / 16;                // 16 chunks of 16 B per row
constexpr int kMinGroup = 32;
constexpr int kMaxGroupsPerStage = kStageK / kMinGroup;  // 4
constexpr int kGroupRowBytes = kTileN * 2;               // 128: 64 columns of scales
constexpr int kScaleBytes = kMaxGroupsPerStage * kGroupRowBytes;  // 512 (scales; zeros again)
constexpr int kRedStride = kTileN + 8;  // floats per row of the reduction buffer (bank offset)

static_assert(kThreads * 16 == kStageWeightBytes, "one 16-byte cp.async per thread per stage");
static_assert(kThreads == kTileM * kXChunks, "one x chunk per thread per 16-row m-tile");
static_assert(kStages >= 3, "the pipeline needs at least 3 stages");

__host__ __device__ constexpr int stage_bytes(int m_tiles) {
  return kStageWeightBytes + m_tiles * kTileM * kXRowBytes + 2 * kScaleBytes;
}

__host__ __device__ constexpr int smem_bytes(int m_tiles) {
  return kStages * stage_bytes(m_tiles) > kWarps * kTileM * kRedStride * 4
             ? kStages * stage_bytes(m_tiles)
             : kWarps * kTileM * kRedStride * 4;
}

// ---------------------------------------------------------------------------------------
// Per-dtype pieces: exponent-trick constant, 16-bit pair arithmetic, mma
// ---------------------------------------------------------------------------------------

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024.0, 1024.0)
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // (128.0, 128.0)
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The pair (s, s) from the 16-bit value `half_index` (0 low, 1 high) of a 32-bit word.
__device__ __forceinline__ uint32_t dup_half(uint32_t word, int half_index) {
  return __byte_perm(word, 0, half_index ? 0x3232 : 0x1010);
}

// Nibbles p and p + 4 of `word`, as the dequantized pair ((q_p - z) * s, (q_{p+4} - z) * s).
// zero2/scale2 hold (BIAS + z, BIAS + z) and (s, s).
template <typename T, int kP>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, uint32_t zero2, uint32_t scale2) {
  using T2 = typename Traits<T>::T2;
  const T2 biased = bits_as<T2>(and_or(word >> (4 * kP), 0x000f000fu, Traits<T>::kMagic));
  const T2 q_minus_z = __hsub2_rn(biased, bits_as<T2>(zero2));  // exact: small integers
  return bits_as<uint32_t>(__hmul2_rn(q_minus_z, bits_as<T2>(scale2)));  // the one rounding
}

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------

// grid = (N / 64, ceil(M / (16 MT)), splits). ws == nullptr: write out (+ bias) directly;
// otherwise write fp32 partial sums ws[split][M][N] for splitk_reduce_kernel.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    w4a16_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                 const T* __restrict__ scales, const T* __restrict__ zeros,
                 const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ ws, int M,
                 int N, int K, int G, int stages_per_split, int total_stages) {
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int kStageBytes = stage_bytes(MT);
  constexpr int kXOffset = kStageWeightBytes;
  constexpr int kScaleOffset = kXOffset + MT * kTileM * kXRowBytes;
  constexpr int kZeroOffset = kScaleOffset + kScaleBytes;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int n_block = blockIdx.x;
  const int m0 = blockIdx.y * (MT * kTileM);
  const int split = blockIdx.z;
  const int stage_begin = split * stages_per_split;
  const int n_stages = min(stages_per_split, total_stages - stage_begin);

  // This block's weight stream: (K / 16) tiles of 512 bytes, contiguous.
  const uint8_t* w_src = qweight + static_cast<size_t>(n_block) * (K / kTileK) * kTileBytes;
  const uint64_t evict_first = l2_evict_first_policy();
  const int groups_per_stage = G >= kStageK ? 1 : kStageK / G;
  // The group row (within the stage's scales) of this warp's k16 tile.
  const int warp_group = G >= kStageK ? 0 : (warp * kTileK) / G;

  // Group row of the next stage to load, kept up to date as stages are loaded in order (no
  // division in the loop): the stage starting at load_k0 begins in group load_group, which
  // ends at load_group_end.
  int load_k0 = stage_begin * kStageK;
  int load_group = load_k0 / G;
  int load_group_end = (load_group + 1) * G;

  auto load_stage = [&](int stage, int slot) {
    uint8_t* dst = smem + slot * kStageBytes;
    const int k0 = stage * kStageK;
    // Weights: 4096 contiguous bytes, thread tid copies bytes [16 tid, 16 tid + 16).
    cp_async16_policy(smem_u32(dst + tid * 16),
                    w_src + static_cast<size_t>(stage) * kStageWeightBytes + tid * 16,
                    evict_first);
    // x: row r, 16-byte chunk c of the stage stored at chunk c ^ (r & 7) (ldmatrix reads 8
    // rows of one chunk: the swizzle spreads them over all banks). Rows >= M are zeros.
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int r = j * kTileM + (tid >> 4);
      const int c = tid & 15;
      const int row = m0 + r;
      const bool valid = row < M;
      const T* src = x + static_cast<size_t>(valid ? row : 0) * K + k0 + c * 8;
      cp_async16_zfill(smem_u32(dst + kXOffset + r * kXRowBytes + ((c ^ (r & 7)) * 16)), src,
                       valid);
    }
    // Scales and zeros: groups_per_stage rows x 64 columns (8 chunks each), both arrays.
    const int chunks = groups_per_stage * 8;
    if (tid < 2 * chunks) {
      const bool is_zero = tid >= chunks;
      const int i = is_zero ? tid - chunks : tid;
      const int r = i >> 3;
      const int c = i & 7;
      const size_t group = static_cast<size_t>(load_group + r);
      const T* src = (is_zero ? zeros : scales) + group * N + n_block * kTileN + c * 8;
      cp_async16(smem_u32(dst + (is_zero ? kZeroOffset : kScaleOffset) + r * kGroupRowBytes +
                          c * 16),
                 src);
    }
    load_k0 += kStageK;  // stages are loaded in order: advance to the next one's group
    while (load_k0 >= load_group_end) {
      ++load_group;
      load_group_end += G;
    }
  };

  float acc[MT][kNSub][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int c = 0; c < kNSub; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][c][e] = 0.f;

  // Prologue: stages 0 .. kStages-2 in flight. One commit group per stage, empty ones
  // included, so that wait_group<kStages - 2> below always means "stage it has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_stages) load_stage(stage_begin + s, s);
    cp_async_commit();
  }

  const int group_id = lane >> 2;  // mma groupID: the B column / C row this lane holds
  for (int it = 0; it < n_stages; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` visible to all; every warp is done with stage it - 1
    {
      const int next = it + kStages - 1;  // refills the slot of stage it - 1
      if (next < n_stages) load_stage(stage_begin + next, next % kStages);
      cp_async_commit();
    }
    const uint8_t* st = smem + (it % kStages) * kStageBytes;

    // This lane's 16 bytes of warp `warp`'s k16 x n64 tile: 4 words, 32 nibbles.
    const uint4 wq = *reinterpret_cast<const uint4*>(st + warp * kTileBytes + lane * 16);
    // Scales / zeros of columns 8c + group_id, c = 0..7 (prepared order: 16 contiguous bytes).
    const uint4 sv = *reinterpret_cast<const uint4*>(st + kScaleOffset +
                                                     warp_group * kGroupRowBytes + group_id * 16);
    const uint4 zv = *reinterpret_cast<const uint4*>(st + kZeroOffset +
                                                     warp_group * kGroupRowBytes + group_id * 16);

    // A fragments: ldmatrix.x4, matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
    // (rows 0-7, k 8-15), (rows 8-15, k 8-15) of the m-tile = a0a1, a2a3, a4a5, a6a7.
    uint32_t a[MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int r = j * kTileM + (lane & 15);
      const int c = warp * 2 + (lane >> 4);
      ldmatrix_x4(a[j], smem_u32(st + kXOffset + r * kXRowBytes + ((c ^ (r & 7)) * 16)));
    }

    // B fragments: word i -> subtiles 2i, 2i+1; nibble pair p -> subtile 2i + p/2, register
    // p % 2 ({b0,b1} = k rows 2t, 2t+1 or {b2,b3} = rows 2t+8, 2t+9), nibble p in the low half.
    const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
    const uint32_t s_words[4] = {sv.x, sv.y, sv.z, sv.w};
    const uint32_t z_words[4] = {zv.x, zv.y, zv.z, zv.w};
    uint32_t b[kNSub][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // subtile 2i: scale/zero in the low half of word i; subtile 2i+1: the high half
      const uint32_t s_lo = dup_half(s_words[i], 0), s_hi = dup_half(s_words[i], 1);
      const uint32_t z_lo = dup_half(z_words[i], 0), z_hi = dup_half(z_words[i], 1);
      b[2 * i][0] = dequant_pair<T, 0>(words[i], z_lo, s_lo);
      b[2 * i][1] = dequant_pair<T, 1>(words[i], z_lo, s_lo);
      b[2 * i + 1][0] = dequant_pair<T, 2>(words[i], z_hi, s_hi);
      b[2 * i + 1][1] = dequant_pair<T, 3>(words[i], z_hi, s_hi);
    }

#pragma unroll
    for (int c = 0; c < kNSub; ++c)
#pragma unroll
      for (int j = 0; j < MT; ++j) Traits<T>::mma(acc[j][c], a[j], b[c][0], b[c][1]);
  }

  // Epilogue: the 8 warps' partial sums meet in shared memory (the pipeline buffers are free
  // once every copy has landed and every warp is past its last stage).
  cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);  // [kWarps][16][kRedStride]
  const int tig = lane & 3;
  const int r_out = tid >> 4;        // 16 rows x 16 column quads: one quad per thread
  const int c_out = (tid & 15) * 4;
  const int col = n_block * kTileN + c_out;
#pragma unroll
  for (int j = 0; j < MT; ++j) {
#pragma unroll
    for (int c = 0; c < kNSub; ++c) {
      float* p = red + (warp * kTileM + group_id) * kRedStride + c * 8 + tig * 2;
      *reinterpret_cast<float2*>(p) = make_float2(acc[j][c][0], acc[j][c][1]);
      *reinterpret_cast<float2*>(p + 8 * kRedStride) = make_float2(acc[j][c][2], acc[j][c][3]);
    }
    __syncthreads();
    float4 sum = *reinterpret_cast<const float4*>(red + r_out * kRedStride + c_out);
#pragma unroll
    for (int w = 1; w < kWarps; ++w)
      add_to(sum,
             *reinterpret_cast<const float4*>(red + (w * kTileM + r_out) * kRedStride + c_out));
    const int row = m0 + j * kTileM + r_out;
    if (row < M) write_output_quad(sum, ws, split, out, bias, row, col, M, N);
    if (j + 1 < MT) __syncthreads();  // `red` is rewritten for the next m-tile
  }
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

template <typename T, int MT>
int launch(const LinearArgs& a) {
  const Plan& p = a.plan;
  constexpr int kSmem = smem_bytes(MT);
  constexpr auto kernel = w4a16_kernel<T, MT>;
  const int st = allow_dynamic_smem<kernel>(g_errors, kSmem);
  if (st != kOk) return st;
  const bool split = p.splits > 1;
  const dim3 grid(static_cast<unsigned>(p.grid_n), static_cast<unsigned>(p.grid_m),
                  static_cast<unsigned>(p.splits));
  kernel<<<grid, kThreads, kSmem, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const uint8_t*>(a.qweight),
      static_cast<const T*>(a.scales), static_cast<const T*>(a.zeros),
      split ? nullptr : static_cast<const T*>(a.bias), static_cast<T*>(a.out),
      split ? static_cast<float*>(a.workspace) : nullptr, static_cast<int>(a.m),
      static_cast<int>(a.n), static_cast<int>(a.k), static_cast<int>(a.group_size),
      p.stages_per_split, static_cast<int>(a.k / kStageK));
  return finish_gemm_launch<T>(g_errors, a);
}

template <typename T>
int launch_typed(const LinearArgs& a) {
  switch (a.plan.m_tiles) {
    case 1: return launch<T, 1>(a);
    case 2: return launch<T, 2>(a);
    case 3: return launch<T, 3>(a);
    case 4: return launch<T, 4>(a);
    default: break;
  }
  return g_errors.fail(kInvalidArgument, "plan.m_tiles = %d is not in 1..4", a.plan.m_tiles);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

int make_plan(int64_t m, int64_t n, int64_t k, int num_sms, Plan* plan) {
  if (m < 1 || n < 1 || k < 1)
    return g_errors.fail(kInvalidArgument, "make_plan needs M, N, K >= 1 (got %lld, %lld, %lld)",
                         static_cast<long long>(m), static_cast<long long>(n),
                         static_cast<long long>(k));
  if (n % kTileN != 0 || k % kStageK != 0)
    return g_errors.fail(kInvalidArgument,
                         "N must be a multiple of %d and K of %d (got %lld, %lld)", kTileN,
                         kStageK, static_cast<long long>(n), static_cast<long long>(k));
  // 32-bit indices inside the kernel: x row offsets (m * k), qweight bytes (n * k / 2).
  const int64_t kIntMax = 0x7fffffff;
  if (m > kIntMax || n > kIntMax || k > kIntMax / 8)
    return g_errors.fail(kInvalidArgument, "problem too large for 32-bit sizes");
  if (num_sms <= 0) {
    const int st = device_sm_count(g_errors, &num_sms);
    if (st != kOk) return st;
  }
  Plan p{};
  p.m_tiles = static_cast<int>(std::min<int64_t>(kMaxMTiles, (m + kTileM - 1) / kTileM));
  const int64_t rows_per_block = int64_t(p.m_tiles) * kTileM;
  const int64_t grid_m = (m + rows_per_block - 1) / rows_per_block;
  if (grid_m > kMaxGridY)
    return g_errors.fail(kInvalidArgument, "M = %lld needs %lld row blocks (max %lld)",
                         static_cast<long long>(m), static_cast<long long>(grid_m),
                         static_cast<long long>(kMaxGridY));
  p.grid_m = static_cast<int>(grid_m);
  p.grid_n = static_cast<int>(n / kTileN);
  plan_split_k(&p, m, n, static_cast<int>(k / kStageK), kStages, num_sms);
  p.smem_bytes = static_cast<size_t>(smem_bytes(p.m_tiles));
  *plan = p;
  return kOk;
}

int linear(const LinearArgs& a) {
  const Plan& p = a.plan;
  if (a.group_size < 1)  // supports() reads -1 as K, but the kernel takes the resolved G
    return g_errors.fail(kInvalidArgument, "group_size must be resolved (K for -1), got %lld",
                         static_cast<long long>(a.group_size));
  if (!supports(a.n, a.k, a.group_size))
    return g_errors.fail(kInvalidArgument,
                         "unsupported shape N = %lld, K = %lld, group size %lld (needs N %% 64 == "
                         "0, K %% 128 == 0, G %% 32 == 0, K %% G == 0, G | 128 or 128 | G)",
                         static_cast<long long>(a.n), static_cast<long long>(a.k),
                         static_cast<long long>(a.group_size));
  if (a.m == 0) return kOk;
  if (p.m_tiles < 1 || p.m_tiles > kMaxMTiles || p.grid_n != a.n / kTileN ||
      int64_t(p.grid_m) * p.m_tiles * kTileM < a.m ||
      !split_k_matches(p.splits, p.stages_per_split, a.k / kStageK))
    return g_errors.fail(kInvalidArgument, "the plan does not match the problem (make it with "
                                           "make_plan for the same M, N, K)");
  if (p.splits > 1 && a.workspace == nullptr)
    return g_errors.fail(kInvalidArgument, "a split-K plan needs a workspace of %zu bytes",
                         p.workspace_bytes);
  if (!aligned(a.x, 16) || !aligned(a.qweight, 16) || !aligned(a.scales, 16) ||
      !aligned(a.zeros, 16) || !aligned(a.out, 8) || !aligned(a.workspace, 16) ||
      !aligned(a.bias, 8))
    return g_errors.fail(kInvalidArgument, "x, qweight, scales, zeros and the workspace must be "
                                           "16-byte aligned, out and bias 8-byte aligned");
  switch (a.dtype) {
    case DType::kFloat16: return launch_typed<__half>(a);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a);
  }
  return g_errors.fail(kInvalidArgument, "unsupported dtype %d", static_cast<int>(a.dtype));
}

const char* message() { return g_errors.message(); }

}  // namespace w4a16
}  // namespace effkern_cuda
