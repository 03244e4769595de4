"""The accuracy checks of tests/op_checks.py, against deliberately wrong results: what they must
pass (the rounding they allow) and what they must fail (a dropped bias, a lost column, one sum off
by one, an element two units in the last place off)."""

import pytest
import torch

from effkern.testing import tolerance, within_tolerance
from op_checks import assert_bad_call_raises, assert_dequantized_from, assert_matches_float64, assert_opcheck_passes


def _int8_case(dtype, M=24, N=40, seed=0):
    """int32 sums, fp32 scales and a bias in ``dtype`` (the output's)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**14), 2**14, (M, N), generator=g, dtype=torch.int32)
    a_scale, b_scale = torch.rand(M, generator=g) / 100, torch.rand(N, generator=g) / 100
    return acc, a_scale, b_scale, torch.randn(N, generator=g).to(dtype)


def _dequantized(acc, a_scale, b_scale, bias):
    return (acc.float() * a_scale[:, None]) * b_scale[None, :] + bias.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantized_check_takes_the_roundings_it_names(dtype):
    acc, a_scale, b_scale, bias = _int8_case(dtype)
    exact32 = _dequantized(acc, a_scale, b_scale, bias)
    assert_dequantized_from(exact32.to(dtype), acc, a_scale, b_scale, bias)
    if dtype == torch.bfloat16:  # the interpreter's rounding toward zero
        toward_zero = (exact32.view(torch.int32) & -(1 << 16)).view(torch.float32).to(dtype)
        assert_dequantized_from(toward_zero, acc, a_scale, b_scale, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wrong", ["acc plus one", "one element two ulps off", "bias dropped", "bias dropped, one rounding",
                                   "one ulp above both"])
def test_dequantized_check_rejects_wrong_results(dtype, wrong):
    acc, a_scale, b_scale, bias = _int8_case(dtype)
    exact32 = _dequantized(acc, a_scale, b_scale, bias)
    if wrong == "acc plus one":
        out = _dequantized(acc + 1, a_scale, b_scale, bias).to(dtype)
    elif wrong == "one element two ulps off":
        out = exact32.to(dtype)
        up = out[3, 5].float() * 2
        out[3, 5] = torch.nextafter(torch.nextafter(out[3, 5], up.to(dtype)), up.to(dtype))
    elif wrong == "bias dropped":
        out = (exact32 - bias.float()).to(dtype)
    elif wrong == "bias dropped, one rounding":  # a kernel whose fused multiply-add lost its addend
        out = ((acc.float() * a_scale[:, None]).double() * b_scale[None, :].double()).float().to(dtype)
    else:  # one element one value of out's dtype past the nearest rounding, away from zero, at the top
        # of its binade, 1.75 times its power of two (where a bound of eps * |x| would take 1.75 units
        # in the last place)
        out = exact32.to(dtype)
        top = ((exact32.abs() / exact32.abs().log2().floor().exp2()) - 1.75).abs().flatten().argmin()
        row, col = divmod(int(top), exact32.shape[1])
        out[row, col] = torch.nextafter(out[row, col], out[row, col] * 2)
    with pytest.raises(AssertionError):
        assert_dequantized_from(out, acc, a_scale, b_scale, bias)


def test_float64_check_holds_an_outlier_column_apart():
    """A column 50x the others: held apart, a dropped bias elsewhere fails; in one maximum with
    them it passes (which is why the int8 tests hold their outlier weight row's column apart)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g) / 8, torch.randn(16, generator=g) / 40
    w[8] *= 50
    exact = (x.double() @ w.double().T) + b.double()
    same = (x.half() @ w.half().T + b.half()).float()
    wrong = same - b
    wrong[:, 8] = same[:, 8]
    assert_matches_float64(same.half(), exact, same.half(), reduction=64, apart=(8,))
    assert_matches_float64(wrong.half(), exact, same.half(), reduction=64)
    with pytest.raises(AssertionError, match="other columns"):
        assert_matches_float64(wrong.half(), exact, same.half(), reduction=64, apart=(8,))


# ---------------------------------------------------------------------------- the other checkers

def test_bad_call_check_wants_the_named_exception_and_message():
    """assert_bad_call_raises passes only for the exception type and message the case names: a
    check that took any exception would pass an op that fails for another reason."""
    def op(x):
        raise ValueError("effkern.op: x must be 2-D")

    assert_bad_call_raises("reference", op, ("right", (1,), ValueError, "must be 2-D"))
    with pytest.raises(ValueError):  # another type: the op's own error comes through
        assert_bad_call_raises("reference", op, ("wrong type", (1,), TypeError, "must be 2-D"))
    with pytest.raises(AssertionError, match="did not match"):
        assert_bad_call_raises("reference", op, ("wrong message", (1,), ValueError, "must be 3-D"))


@torch.library.custom_op("effkern_checks::fake_of_the_wrong_shape", mutates_args=())
def _fake_of_the_wrong_shape(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_fake_of_the_wrong_shape.register_fake
def _(x):
    return x.new_empty(x.shape[0] + 1)


def test_opcheck_check_fails_an_op_whose_fake_disagrees():
    """assert_opcheck_passes runs all of torch.library.opcheck's tests: an op whose fake gives
    another shape than the op itself fails it (the schema alone would pass)."""
    op = torch.ops.effkern_checks.fake_of_the_wrong_shape.default
    with pytest.raises(Exception, match="fake|shape|meta"):
        assert_opcheck_passes("reference", [(op, (torch.randn(3),))])


def test_tolerance_is_factor_times_pytorchs_error_plus_the_floor():
    """effkern.testing's rule, number by number: factor x PyTorch's error, plus two units in the
    last place of the output dtype and sqrt(reduction) fp32 units, both at the reference's largest
    magnitude. A looser rule (a larger factor, a linear sum noise, another dtype's eps) lets
    wrong kernels through on larger problems than test_checker_rejects_wrong_kernels' own."""
    eps16, eps32 = torch.finfo(torch.float16).eps, torch.finfo(torch.float32).eps
    assert tolerance(1e-3, 4.0, torch.float16, reduction=100) == pytest.approx(2e-3 + (2 * eps16 + 10 * eps32) * 4)
    assert tolerance(0.0, 1.0, torch.float32, reduction=4096) == pytest.approx(2 * eps32 + 64 * eps32)
    ref = torch.ones(8, dtype=torch.float64)
    torch_same = (ref + 1e-3).float()  # PyTorch's error: 1e-3, far above the floor
    assert within_tolerance((ref + 1.9e-3).float(), ref, torch_same)[0]
    assert not within_tolerance((ref + 2.1e-3).float(), ref, torch_same)[0]  # more than 2x PyTorch's
