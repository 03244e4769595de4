// CPU kernels of effkern_C::linear_gelu_fwd / linear_gelu_bwd.
//
// The matrix products use torch's mm (float32 accumulation for float16/bfloat16); everything
// around them is done by the fused loops below: one pass that adds the bias, applies GELU and
// writes gelu'(z) for the backward (forward), one pass that forms grad_out * gelu'(z) and one
// reduction for the bias gradient (backward). Epilogue math runs in the "opmath" type
// (float32 for float16/bfloat16/float32, float64 for float64) and is rounded once.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "linear_gelu_checks.h"

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace effkern_C {
namespace {

// Rows per parallel task: aim for ~32k elements per task so small problems stay serial.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename acc_t>
struct GeluMath {
  static constexpr acc_t kInvSqrt2 = acc_t(0.70710678118654752440);
  static constexpr acc_t kInvSqrt2Pi = acc_t(0.39894228040143267794);
  static constexpr acc_t kSqrt2OverPi = acc_t(0.79788456080286535588);
  static constexpr acc_t kCoef = acc_t(0.044715);

  template <bool kTanh>
  static acc_t gelu(acc_t z) {
    if (kTanh) {
      const acc_t u = kSqrt2OverPi * (z + kCoef * z * z * z);
      return acc_t(0.5) * z * (acc_t(1) + std::tanh(u));
    }
    return acc_t(0.5) * z * (acc_t(1) + std::erf(z * kInvSqrt2));
  }

  template <bool kTanh>
  static acc_t gelu_grad(acc_t z) {
    if (kTanh) {
      const acc_t u = kSqrt2OverPi * (z + kCoef * z * z * z);
      const acc_t t = std::tanh(u);
      return acc_t(0.5) * (acc_t(1) + t) +
             acc_t(0.5) * z * (acc_t(1) - t * t) * kSqrt2OverPi *
                 (acc_t(1) + acc_t(3) * kCoef * z * z);
    }
    return acc_t(0.5) * (acc_t(1) + std::erf(z * kInvSqrt2)) +
           z * std::exp(acc_t(-0.5) * z * z) * kInvSqrt2Pi;
  }
};

// Forward epilogue: z = acc + bias; out = gelu(z); gelu_grad = gelu'(z) (optional).
// acc is the dense [m, n] matmul result in acc_t.
template <typename scalar_t, typename acc_t, bool kTanh>
void bias_gelu_rows(const acc_t* acc, const scalar_t* bias, scalar_t* out, scalar_t* gelu_grad,
                    int64_t m, int64_t n) {
  at::parallel_for(0, m, row_grain(n), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      const acc_t* acc_row = acc + i * n;
      scalar_t* out_row = out + i * n;
      scalar_t* grad_row = gelu_grad != nullptr ? gelu_grad + i * n : nullptr;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t z = acc_row[j] + (bias != nullptr ? static_cast<acc_t>(bias[j]) : acc_t(0));
        if (grad_row != nullptr)
          grad_row[j] = static_cast<scalar_t>(GeluMath<acc_t>::template gelu_grad<kTanh>(z));
        out_row[j] = static_cast<scalar_t>(GeluMath<acc_t>::template gelu<kTanh>(z));
      }
    }
  });
}

// Backward elementwise pass: gz = grad_out * gelu'(z), kept in acc_t for the GEMMs.
template <typename scalar_t, typename acc_t>
void gelu_grad_rows(const scalar_t* grad_out, const scalar_t* gelu_grad, acc_t* gz, int64_t m,
                    int64_t n) {
  at::parallel_for(0, m, row_grain(n), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      const int64_t base = i * n;
      for (int64_t j = 0; j < n; ++j)
        gz[base + j] = static_cast<acc_t>(grad_out[base + j]) * static_cast<acc_t>(gelu_grad[base + j]);
    }
  });
}

// grad_bias[j] = sum_i gz[i, j], accumulated in acc_t over contiguous row sweeps.
template <typename scalar_t, typename acc_t>
void column_sums(const acc_t* gz, scalar_t* grad_bias, int64_t m, int64_t n) {
  std::vector<acc_t> sums(static_cast<size_t>(n), acc_t(0));
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* row = gz + i * n;
    for (int64_t j = 0; j < n; ++j) sums[j] += row[j];
  }
  for (int64_t j = 0; j < n; ++j) grad_bias[j] = static_cast<scalar_t>(sums[j]);
}

void check_floating(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "effkern_C (CPU): unsupported dtype ", t,
              "; expected float32, float64, float16 or bfloat16");
}

at::ScalarType opmath_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_cpu(const at::Tensor& input,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       bool tanh_approx, bool save_gelu_grad) {
  const LinearGeluShape shape = check_fwd_args(input, weight, bias, c10::DeviceType::CPU);
  const int64_t M = shape.m, N = shape.n;
  const bool has_bias = shape.has_bias;
  check_floating(input.scalar_type());

  at::Tensor out = input.new_empty({M, N});
  at::Tensor gelu_grad = save_gelu_grad ? input.new_empty({M, N}) : input.new_empty({0});
  if (M == 0 || N == 0) return {out, gelu_grad};

  // Matmul in the opmath type (no copy when the input already has it).
  const at::ScalarType acc_type = opmath_scalar_type(input.scalar_type());
  const at::Tensor acc =
      input.to(acc_type).mm(weight.to(acc_type).t()).contiguous();  // [M, N]
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "effkern_linear_gelu_fwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* acc_ptr = acc.const_data_ptr<acc_t>();
        const scalar_t* bias_ptr = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
        scalar_t* grad_ptr = save_gelu_grad ? gelu_grad.mutable_data_ptr<scalar_t>() : nullptr;
        if (tanh_approx) {
          bias_gelu_rows<scalar_t, acc_t, true>(acc_ptr, bias_ptr, out_ptr, grad_ptr, M, N);
        } else {
          bias_gelu_rows<scalar_t, acc_t, false>(acc_ptr, bias_ptr, out_ptr, grad_ptr, M, N);
        }
      });
  return {out, gelu_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& gelu_grad, std::array<bool, 3> output_mask) {
  const LinearGeluShape shape =
      check_bwd_args(grad_out, input, weight, gelu_grad, c10::DeviceType::CPU);
  const int64_t M = shape.m, N = shape.n;
  check_floating(input.scalar_type());

  const bool need_gi = output_mask[0], need_gw = output_mask[1], need_gb = output_mask[2];
  const at::Tensor empty = input.new_empty({0});
  if (!need_gi && !need_gw && !need_gb) return {empty, empty.clone(), empty.clone()};

  const at::ScalarType dtype = input.scalar_type();
  const at::ScalarType acc_type = opmath_scalar_type(dtype);
  const at::Tensor grad_out_c = grad_out.contiguous();
  const at::Tensor gelu_grad_c = gelu_grad.contiguous();
  at::Tensor gz = input.new_empty({M, N}, input.options().dtype(acc_type));

  at::Tensor grad_bias = need_gb ? input.new_empty({N}) : input.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "effkern_linear_gelu_bwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* go_ptr = grad_out_c.const_data_ptr<scalar_t>();
        acc_t* gz_ptr = gz.mutable_data_ptr<acc_t>();
        gelu_grad_rows<scalar_t, acc_t>(go_ptr, gelu_grad_c.const_data_ptr<scalar_t>(), gz_ptr, M, N);
        if (need_gb) column_sums<scalar_t, acc_t>(gz_ptr, grad_bias.mutable_data_ptr<scalar_t>(), M, N);
      });

  // mm handles the empty cases (a zero-length reduction gives zeros).
  const at::Tensor grad_input =
      need_gi ? gz.mm(weight.to(acc_type)).to(dtype) : input.new_empty({0});
  const at::Tensor grad_weight =
      need_gw ? gz.t().mm(input.to(acc_type)).to(dtype) : input.new_empty({0});
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern_C, CPU, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd_cpu);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd_cpu);
}

}  // namespace effkern_C
