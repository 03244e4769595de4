// CPU kernels of effkern_C::prune_24 / compress_24 / decompress_24: effkern's 2:4
// semi-structured format, used offline on (large) checkpoints.
//
// Format. Weight W [N, K], sparse along K, K % 4 == 0; group g of row n is W[n, 4g .. 4g+3].
//   values [N, K / 2] (W's dtype): values[n, 2g] = W[n, 4g + i0], values[n, 2g + 1] = W[n, 4g + i1]
//   meta   uint8 [N, ceil(K / 8)]: group g's 4-bit code i0 | (i1 << 2), i0 < i1, sits in byte
//          g / 2, low nibble for even g, high nibble for odd g; when K % 8 == 4 the unused high
//          nibble of the last byte is 0.
//
// prune_24 keeps, in every group, the 2 entries of largest |w| and zeroes the other 2 (+0.0).
//   Order: larger |w| first; NaN (any sign, any payload) counts as larger than every number,
//   +-inf included, and all NaNs are equal to each other; among equal magnitudes the lower
//   position wins (+0.0 and -0.0 are equal). Kept entries are copied bit for bit.
// compress_24 requires at most 2 nonzeros per group (w != 0: -0.0 is zero, NaN is nonzero).
//   compress_24 and decompress_24 also take int8 (a quantized 2:4 weight); prune_24 floats only.
//   The kept positions are the nonzero ones, completed with the lowest-index zero positions
//   (so pruning and compression agree: compress_24(prune_24(W)) keeps what prune_24 kept).
//   Kept entries, zeros included, are copied bit for bit (a kept -0.0 stays -0.0).
// decompress_24 is the exact inverse: values at the coded positions, +0.0 elsewhere. So
//   decompress_24(*compress_24(W)) == W bit for bit except that a -0.0 at a dropped position
//   comes back as +0.0. Codes with i0 >= i1 and a nonzero unused nibble are errors.
//
// All three work on the raw bit patterns (uint16/32/64): a magnitude is the bit pattern without
// the sign bit, which orders like |w| for IEEE formats (NaN patterns above inf); NaNs are
// clamped to one key just above inf. No float conversions, no per-element allocation; rows are
// split over threads with at::parallel_for, and each group is handled by fixed, branch-free
// arithmetic (prune: a comparison network; compress: which positions are kept, from the nonzero
// flags; decompress: a select per position), all in one integer width, which gcc vectorizes.
// A bad group does not throw inside the parallel loop: the first bad (row, group) is recorded
// and the error is raised afterwards, naming the lowest such row and group.
//
// Errors follow effkern's Python conventions: TORCH_CHECK_VALUE (Python ValueError) for shapes
// and for a weight / meta whose content breaks the format, TORCH_CHECK_TYPE (TypeError) for
// dtypes, TORCH_CHECK (RuntimeError) for devices; each names the op and the argument.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>

namespace effkern_C {
namespace {

// ------------------------------------------------------------------------------ bit patterns

template <typename scalar_t>
struct Bits;  // type: the unsigned integer of the same size; abs_mask; inf: the bits of +inf
template <>
struct Bits<c10::Half> {
  using type = uint16_t;
  static constexpr type abs_mask = 0x7FFFu, inf = 0x7C00u;
};
template <>
struct Bits<c10::BFloat16> {
  using type = uint16_t;
  static constexpr type abs_mask = 0x7FFFu, inf = 0x7F80u;
};
template <>
struct Bits<float> {
  using type = uint32_t;
  static constexpr type abs_mask = 0x7FFFFFFFu, inf = 0x7F800000u;
};
template <>
struct Bits<double> {
  using type = uint64_t;
  static constexpr type abs_mask = 0x7FFFFFFFFFFFFFFFull, inf = 0x7FF0000000000000ull;
};
// int8 (a quantized weight): compress and decompress only; every bit counts toward "nonzero".
template <>
struct Bits<int8_t> {
  using type = uint8_t;
  static constexpr type abs_mask = 0xFFu;
};

// Magnitude key: |w| as an unsigned integer, every NaN mapped to inf + 1 (one value above inf).
template <typename scalar_t>
inline typename Bits<scalar_t>::type magnitude_key(typename Bits<scalar_t>::type bits) {
  using B = Bits<scalar_t>;
  const typename B::type a = bits & B::abs_mask;
  const typename B::type nan_key = B::inf + 1;
  return a < nan_key ? a : nan_key;  // a min: a conditional move, not a branch
}

// Branch-free selection in one integer width (what lets gcc vectorize the group loops):
// all ones if c (0 or 1) is 1, else 0; and c ? a : b through that mask.
template <typename T>
inline T all_ones_if(T c) {
  return T(T(0) - c);
}
template <typename T>
inline T select(T c, T a, T b) {
  const T m = all_ones_if(c);
  return T((a & m) | (b & T(~m)));
}

// ------------------------------------------------------------------------------ code tables

// For a 4-bit mask of the nonzero positions of a group: its number of nonzeros (the error
// message's; more than 2 is an error).
constexpr std::array<uint8_t, 16> make_nonzero_count_table() {
  std::array<uint8_t, 16> t{};
  for (int mask = 0; mask < 16; ++mask) t[mask] = (mask & 1) + (mask >> 1 & 1) + (mask >> 2 & 1) + (mask >> 3);
  return t;
}
constexpr std::array<uint8_t, 16> kNonzeroCount = make_nonzero_count_table();

// A 4-bit code i0 | (i1 << 2) is valid iff i0 < i1.
constexpr std::array<uint8_t, 16> make_invalid_code_table() {
  std::array<uint8_t, 16> t{};
  for (int c = 0; c < 16; ++c) t[c] = (c & 3) < (c >> 2) ? 0 : 1;
  return t;
}
constexpr std::array<uint8_t, 16> kInvalidCode = make_invalid_code_table();

// ------------------------------------------------------------------------------ helpers

// Rows per parallel task: about 64k elements per task so small tensors stay serial.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)); }

// Lowers `target` to `value` if smaller (a lock-free fetch-min).
void atomic_min(std::atomic<int64_t>& target, int64_t value) {
  int64_t cur = target.load(std::memory_order_relaxed);
  while (value < cur && !target.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
}

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

// Runs process_row(n) over the rows 0..N-1 in parallel; it returns nonzero when row n has a bad
// group. Returns n * G + g of the first bad group (group_bad(n, g)), or kNoError. Nothing throws
// inside the parallel loop: the caller raises, naming that group.
template <typename ProcessRow, typename GroupBad>
int64_t first_bad_group(int64_t N, int64_t K, int64_t G, const ProcessRow& process_row,
                        const GroupBad& group_bad) {
  std::atomic<int64_t> first_bad{kNoError};
  at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (process_row(n)) {
        // Slow path, only on error: find the row's first bad group; later rows of this chunk
        // cannot come first.
        for (int64_t g = 0; g < G; ++g) {
          if (group_bad(n, g)) {
            atomic_min(first_bad, n * G + g);
            break;
          }
        }
        return;
      }
    }
  });
  return first_bad.load();
}

// The value dtypes of the format: the floats, and int8 for compress/decompress (not prune).
bool is_supported_dtype(at::ScalarType t, bool int8_allowed) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble ||
         (int8_allowed && t == at::kChar);
}

const char* supported_dtypes(bool int8_allowed) {
  return int8_allowed ? "float16, bfloat16, float32, float64 or int8"
                      : "float16, bfloat16, float32 or float64";
}

// weight: a 2-D CPU tensor of a supported dtype whose K is a multiple of 4.
void check_weight(const at::Tensor& weight, const char* op, bool int8_allowed) {
  TORCH_CHECK(weight.defined(), op, "weight is an undefined tensor");
  TORCH_CHECK(weight.device().type() == c10::DeviceType::CPU, op,
              "weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, "weight must be 2-D [N, K], got ", weight.dim(),
                    "-D shape ", weight.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(weight.scalar_type(), int8_allowed), op, "weight must be ",
                   supported_dtypes(int8_allowed), ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) % 4 == 0, op,
                    "weight's K (dim 1) must be a multiple of 4 (groups of 4 along K), got K = ",
                    weight.size(1), " (shape ", weight.sizes(), ")");
}

// ------------------------------------------------------------------------------ prune_24

// One row: for every group keep the top 2 by (magnitude key descending, position ascending).
// b_ij (i < j) is "i ranks before j"; an entry's rank is the number of entries before it, and
// the entries of rank 0 and 1 are kept. Six comparisons, no branches.
template <typename scalar_t>
void prune_row(const typename Bits<scalar_t>::type* __restrict in,
               typename Bits<scalar_t>::type* __restrict out, int64_t groups) {
  using T = typename Bits<scalar_t>::type;
  for (int64_t g = 0; g < groups; ++g) {
    const T w0 = in[4 * g], w1 = in[4 * g + 1], w2 = in[4 * g + 2], w3 = in[4 * g + 3];
    const T k0 = magnitude_key<scalar_t>(w0), k1 = magnitude_key<scalar_t>(w1);
    const T k2 = magnitude_key<scalar_t>(w2), k3 = magnitude_key<scalar_t>(w3);
    // All arithmetic in T (one vector width); ranks are 0..3, so nothing wraps.
    const T b01 = k0 >= k1, b02 = k0 >= k2, b03 = k0 >= k3;
    const T b12 = k1 >= k2, b13 = k1 >= k3, b23 = k2 >= k3;
    const T r0 = T(3) - b01 - b02 - b03;
    const T r1 = T(2) + b01 - b12 - b13;
    const T r2 = T(1) + b02 + b12 - b23;
    const T r3 = b03 + b13 + b23;
    // keep -> all ones, drop -> 0 (then the entry becomes +0.0)
    out[4 * g] = w0 & all_ones_if(T(r0 < 2));
    out[4 * g + 1] = w1 & all_ones_if(T(r1 < 2));
    out[4 * g + 2] = w2 & all_ones_if(T(r2 < 2));
    out[4 * g + 3] = w3 & all_ones_if(T(r3 < 2));
  }
}

at::Tensor prune_24_cpu(const at::Tensor& weight) {
  const char* op = "effkern_C::prune_24: ";
  check_weight(weight, op, /*int8_allowed=*/false);
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = K / 4;
  at::Tensor out = w.new_empty({N, K});
  if (N == 0 || K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                  "effkern_prune_24_cpu", [&] {
    using T = typename Bits<scalar_t>::type;
    const T* in_ptr = reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>());
    T* out_ptr = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) prune_row<scalar_t>(in_ptr + n * K, out_ptr + n * K, G);
    });
  });
  return out;
}

// ------------------------------------------------------------------------------ compress_24

template <typename scalar_t>
inline uint32_t nonzero_mask(const typename Bits<scalar_t>::type* w) {
  using B = Bits<scalar_t>;
  return static_cast<uint32_t>((w[0] & B::abs_mask) != 0) |
         (static_cast<uint32_t>((w[1] & B::abs_mask) != 0) << 1) |
         (static_cast<uint32_t>((w[2] & B::abs_mask) != 0) << 2) |
         (static_cast<uint32_t>((w[3] & B::abs_mask) != 0) << 3);
}

// One group: writes its 2 values and returns code | too_many << 4 (too_many: more than 2
// nonzeros; the op then raises, and code and values are don't-cares).
// Kept: the nonzeros, completed with the lowest-index zeros: zero j is kept iff fewer than
// 2 - nonzeros zeros come before it. i0 is the first kept position, i1 the last. Selects, no
// indexing by data, all in T.
template <typename scalar_t>
inline typename Bits<scalar_t>::type compress_group(const typename Bits<scalar_t>::type* w,
                                                    typename Bits<scalar_t>::type* v) {
  using T = typename Bits<scalar_t>::type;
  constexpr T m = Bits<scalar_t>::abs_mask;
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  const T z0 = (w0 & m) == 0, z1 = (w1 & m) == 0, z2 = (w2 & m) == 0, z3 = (w3 & m) == 0;
  const T nonzeros = T(4) - z0 - z1 - z2 - z3;
  const T zeros_needed = select(T(nonzeros < 2), T(T(2) - nonzeros), T(0));
  const T k0 = T(1 - z0) | T(zeros_needed > 0);
  const T k1 = T(1 - z1) | T(z1 & T(z0 < zeros_needed));
  const T k2 = T(1 - z2) | T(z2 & T(T(z0 + z1) < zeros_needed));
  const T k3 = T(1 - z3) | T(z3 & T(T(z0 + z1 + z2) < zeros_needed));
  v[0] = select(k0, w0, select(k1, w1, w2));
  v[1] = select(k3, w3, select(k2, w2, w1));
  const T i0 = select(k0, T(0), select(k1, T(1), T(2)));
  const T i1 = select(k3, T(3), select(k2, T(2), T(1)));
  return T(i0 | i1 << 2 | T(nonzeros > 2) << 4);
}

// One row; returns nonzero iff some group of the row has more than 2 nonzeros.
template <typename scalar_t>
uint32_t compress_row(const typename Bits<scalar_t>::type* __restrict in,
                      typename Bits<scalar_t>::type* __restrict vals, uint8_t* __restrict meta,
                      int64_t groups) {
  using T = typename Bits<scalar_t>::type;
  T bad = 0;
  const int64_t pairs = groups / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const T lo = compress_group<scalar_t>(in + 8 * p, vals + 4 * p);
    const T hi = compress_group<scalar_t>(in + 8 * p + 4, vals + 4 * p + 2);
    meta[p] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
    bad |= (lo | hi) >> 4;
  }
  if (groups % 2) {
    const T lo = compress_group<scalar_t>(in + 8 * pairs, vals + 4 * pairs);
    meta[pairs] = static_cast<uint8_t>(lo & 15);
    bad |= lo >> 4;
  }
  return bad;
}

std::tuple<at::Tensor, at::Tensor> compress_24_cpu(const at::Tensor& weight) {
  const char* op = "effkern_C::compress_24: ";
  check_weight(weight, op, /*int8_allowed=*/true);
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = K / 4, B = (K + 7) / 8;
  at::Tensor values = w.new_empty({N, K / 2});
  at::Tensor meta = w.new_empty({N, B}, w.options().dtype(at::kByte));
  if (N == 0 || K == 0) return {values, meta};

  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kChar, w.scalar_type(),
                                  "effkern_compress_24_cpu", [&] {
    using T = typename Bits<scalar_t>::type;
    const T* in_ptr = reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>());
    T* val_ptr = reinterpret_cast<T*>(values.mutable_data_ptr<scalar_t>());
    uint8_t* meta_ptr = meta.mutable_data_ptr<uint8_t>();
    // n * G + g of the first group with more than 2 nonzeros
    const int64_t bad = first_bad_group(
        N, K, G,
        [&](int64_t n) {
          return compress_row<scalar_t>(in_ptr + n * K, val_ptr + n * (K / 2), meta_ptr + n * B,
                                        G);
        },
        [&](int64_t n, int64_t g) {
          return kNonzeroCount[nonzero_mask<scalar_t>(in_ptr + n * K + 4 * g)] > 2;
        });
    if (bad != kNoError) {
      const int64_t n = bad / G, g = bad % G;
      const int count = kNonzeroCount[nonzero_mask<scalar_t>(in_ptr + n * K + 4 * g)];
      TORCH_CHECK_VALUE(false, op, "weight is not 2:4 sparse: row ", n, ", group ", g, " (k = ",
                        4 * g, "..", 4 * g + 3, ") has ", count,
                        " nonzeros, at most 2 are allowed in every group of 4 along K "
                        "(prune it first with prune_24)");
    }
  });
  return {values, meta};
}

// ------------------------------------------------------------------------------ decompress_24

// One group from its code: position j gets v[0] if j == i0, else v[1] if j == i1, else +0.0
// (invalid codes write something and are reported by the caller).
template <typename T>
inline void decompress_group(const T* v, T code, T* out) {
  const T i0 = code & 3, i1 = code >> 2;
  for (int j = 0; j < 4; ++j) out[j] = select(T(i0 == T(j)), v[0], select(T(i1 == T(j)), v[1], T(0)));
}

// One row; returns nonzero iff some code of the row is invalid (or the unused nibble is set).
template <typename T>
uint32_t decompress_row(const T* __restrict vals, const uint8_t* __restrict meta, T* __restrict out,
                        int64_t groups) {
  T bad = 0;  // a code is valid iff i0 < i1
  const int64_t pairs = groups / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const T byte = meta[p];
    const T lo = byte & 15, hi = byte >> 4;
    bad |= T((lo & 3) >= (lo >> 2)) | T((hi & 3) >= (hi >> 2));
    decompress_group<T>(vals + 4 * p, lo, out + 8 * p);
    decompress_group<T>(vals + 4 * p + 2, hi, out + 8 * p + 4);
  }
  if (groups % 2) {
    const T byte = meta[pairs];
    const T lo = byte & 15;
    bad |= T((lo & 3) >= (lo >> 2)) | T((byte >> 4) != 0);
    decompress_group<T>(vals + 4 * pairs, lo, out + 8 * pairs);
  }
  return bad;
}

// The 4-bit code of group g in a meta row.
inline uint32_t meta_code(const uint8_t* meta_row, int64_t g) {
  return g % 2 ? meta_row[g / 2] >> 4 : meta_row[g / 2] & 15;
}

at::Tensor decompress_24_cpu(const at::Tensor& values, const at::Tensor& meta) {
  const char* op = "effkern_C::decompress_24: ";
  TORCH_CHECK(values.defined() && meta.defined(), op, "values and meta must be defined tensors");
  TORCH_CHECK(values.device().type() == c10::DeviceType::CPU, op,
              "values must be a CPU tensor, got device ", values.device());
  TORCH_CHECK(meta.device() == values.device(), op, "meta is on ", meta.device(),
              " but values is on ", values.device());
  TORCH_CHECK_VALUE(values.dim() == 2, op, "values must be 2-D [N, K / 2], got ", values.dim(),
                    "-D shape ", values.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(values.scalar_type(), /*int8_allowed=*/true), op,
                   "values must be ", supported_dtypes(true), ", got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.size(1) % 2 == 0, op,
                    "values must be [N, K / 2] with K a multiple of 4, so its dim 1 must be "
                    "even, got shape ", values.sizes());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, op, "meta must be uint8, got ",
                   meta.scalar_type());
  const int64_t N = values.size(0), K = 2 * values.size(1), G = K / 4, B = (K + 7) / 8;
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == B, op,
                    "meta must be [N, ceil(K / 8)] = [", N, ", ", B, "] for values of shape ",
                    values.sizes(), " (K = ", K, "), got shape ", meta.sizes());

  const at::Tensor v = values.contiguous();
  const at::Tensor m = meta.contiguous();
  at::Tensor out = v.new_empty({N, K});
  if (N == 0 || K == 0) return out;

  int64_t bad = kNoError;  // n * G + g of the first invalid code
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kChar, v.scalar_type(),
                                  "effkern_decompress_24_cpu", [&] {
    using T = typename Bits<scalar_t>::type;
    const T* val_ptr = reinterpret_cast<const T*>(v.const_data_ptr<scalar_t>());
    const uint8_t* meta_ptr = m.const_data_ptr<uint8_t>();
    T* out_ptr = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    bad = first_bad_group(
        N, K, G,
        [&](int64_t n) {
          return decompress_row<T>(val_ptr + n * (K / 2), meta_ptr + n * B, out_ptr + n * K, G);
        },
        [&](int64_t n, int64_t g) {
          const uint8_t* meta_row = meta_ptr + n * B;
          const bool unused_set = g == G - 1 && G % 2 && (meta_row[g / 2] >> 4) != 0;
          return kInvalidCode[meta_code(meta_row, g)] || unused_set;
        });
  });
  if (bad != kNoError) {
    const int64_t n = bad / G, g = bad % G;
    const uint8_t byte = m.const_data_ptr<uint8_t>()[n * B + g / 2];
    const uint32_t code = meta_code(m.const_data_ptr<uint8_t>() + n * B, g);
    if (kInvalidCode[code]) {
      TORCH_CHECK_VALUE(false, op, "invalid meta code ", code, " at row ", n, ", group ", g,
                        " (k = ", 4 * g, "..", 4 * g + 3, ", byte ", g / 2, " = ",
                        static_cast<int>(byte),
                        "): the code is i0 | (i1 << 2) and needs i0 < i1, got i0 = ", code & 3,
                        ", i1 = ", code >> 2);
    }
    TORCH_CHECK_VALUE(false, op, "invalid meta at row ", n, ": K = ", K,
                      " has an odd number of groups, so the high nibble of the last byte (byte ",
                      g / 2, ", after group ", g, ") must be 0, got byte ", static_cast<int>(byte));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern_C, CPU, m) {
  m.impl("prune_24", &prune_24_cpu);
  m.impl("compress_24", &compress_24_cpu);
  m.impl("decompress_24", &decompress_24_cpu);
}

}  // namespace effkern_C
