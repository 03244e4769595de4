"""2:4 sparsity: the C++ CPU kernels effkern_C::prune_24 / compress_24 / decompress_24.

They are checked bit for bit against the independent pure-PyTorch formulation below (which is
itself checked against a per-group Python spec of the rules), for every dtype (compress and
decompress also for int8, a quantized weight), shapes with
K % 8 == 0 and K % 8 == 4, N == 1, non-contiguous inputs, ties, NaN, signed zeros and groups
with 0 or 1 nonzeros, plus round trips and the errors. On the same hard cases, effkern's ops
on the reference backend (effkern.sparse24's PyTorch formulation, what runs on GPU tensors) and,
marked gpu, on CUDA tensors give the C++ kernels' bits.

The format (csrc/cpu/sparse24.cpp): weight W [N, K], K % 4 == 0, group g of row n = W[n, 4g:4g+4].
  prune_24:      keep the 2 largest |w| of every group, the others become +0.0. Order: NaN first
                 (all NaNs equal), then larger |w|; equal magnitudes keep the lower position.
  compress_24:   values [N, K/2] = W at the kept positions i0 < i1 of every group (its nonzeros,
                 completed with its lowest-index zeros; more than 2 nonzeros is an error),
                 meta uint8 [N, ceil(K/8)] = code i0 | i1 << 2, low nibble for even g.
  decompress_24: the inverse, +0.0 elsewhere; invalid codes are errors.

`python tests/test_sparse24_cpu.py` times the C++ ops against the reference on an
8192 x 8192 float16 weight (not part of the test run).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern import _ext

if not _ext.available():
    pytest.skip(f"the C++ extension effkern._C is not built: {_ext.load_error()}", allow_module_level=True)
if not hasattr(torch.ops.effkern_C, "compress_24"):
    _why = "effkern._C was built without the sparse24 ops: rebuild it (pip install --no-build-isolation -e .)"
    if os.environ.get("EFFKERN_REQUIRE_EXT") == "1":
        raise RuntimeError(_why)
    pytest.skip(_why, allow_module_level=True)

prune_24 = torch.ops.effkern_C.prune_24
compress_24 = torch.ops.effkern_C.compress_24
decompress_24 = torch.ops.effkern_C.decompress_24

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64, torch.int8: torch.int8}
# (N, K): K % 8 == 0 and K % 8 == 4, N == 1, more rows than one parallel task takes
SHAPES = [(1, 4), (1, 8), (1, 12), (2, 4), (3, 8), (5, 20), (17, 64), (9, 132), (600, 256)]


# ---------------------------------------------------------------------------- reference

def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating tensor, as the signed integer type of its size."""
    return t.contiguous().view(BITS[t.dtype])


def _ranks_before(a_i: torch.Tensor, a_j: torch.Tensor) -> torch.Tensor:
    """Entry i (lower position) ranks before entry j: NaN first, then larger |w|, ties to i."""
    return a_i.isnan() | (~a_j.isnan() & (a_i >= a_j))


def prune_24_ref(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    g = w.reshape(N, K // 4, 4)
    a = g.double().abs()  # exact for every input dtype
    rank = torch.zeros(g.shape, dtype=torch.int64)
    for i in range(4):
        for j in range(i + 1, 4):
            first = _ranks_before(a[..., i], a[..., j])
            rank[..., j] += first
            rank[..., i] += ~first
    return torch.where(rank < 2, as_bits(g), 0).reshape(N, K).view(w.dtype)


def compress_24_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = w.shape
    G = K // 4
    g = w.reshape(N, G, 4)
    nz = g != 0  # NaN is nonzero, -0.0 is zero
    count = nz.sum(-1)
    bad = (count > 2).nonzero()
    if len(bad):
        n, gi = bad[0].tolist()
        raise ValueError(f"row {n}, group {gi} has {count[n, gi].item()} nonzeros")
    # nonzeros first, then zeros, each by position; the first two, in position order
    kept = torch.sort((~nz).to(torch.int8), dim=-1, stable=True).indices[..., :2].sort(-1).values
    # gathered as integers: torch's gather/scatter on bfloat16 rewrite NaN bit patterns
    values = torch.gather(as_bits(g), -1, kept).reshape(N, 2 * G).view(w.dtype)
    codes = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)
    if G % 2:
        codes = F.pad(codes, (0, 1))
    meta = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return values, meta


def decompress_24_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    N, H = values.shape
    G = H // 2
    codes = torch.stack([meta & 15, meta >> 4], -1).reshape(N, -1)
    if G % 2 and (codes[:, -1] != 0).any():
        raise ValueError("unused nibble set")
    codes = codes[:, :G].long()
    i0, i1 = codes & 3, codes >> 2
    if (i0 >= i1).any():
        raise ValueError("invalid code")
    out = torch.zeros(N, G, 4, dtype=BITS[values.dtype])
    out.scatter_(-1, torch.stack([i0, i1], -1), as_bits(values).reshape(N, G, 2))
    return out.reshape(N, 4 * G).view(values.dtype)


# The rules once more, one group at a time in plain Python: the spec the reference is held to.

def spec_prune_kept(group: list[float]) -> list[int]:
    order = sorted(range(4), key=lambda i: (0, 0.0, i) if math.isnan(group[i]) else (1, -abs(group[i]), i))
    return sorted(order[:2])


def spec_compress_kept(group: list[float]) -> list[int]:
    nonzero = [i for i in range(4) if group[i] != 0]
    return sorted((nonzero + [i for i in range(4) if i not in nonzero])[:2])


# ---------------------------------------------------------------------------- helpers

def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = as_bits(actual), as_bits(expected)
    if not torch.equal(a, e):
        where = (a != e).nonzero()[:5].tolist()
        raise AssertionError(f"bit patterns differ at {where}: {actual[tuple(zip(*where))]} vs "
                             f"{expected[tuple(zip(*where))]}")


def nasty_weight(N: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weight full of ties (small integers, both signs), +-0.0, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    r = torch.rand(N, K, generator=g, dtype=torch.float64)
    ints = torch.randint(-2, 3, (N, K), generator=g).double() * 0.5
    w = torch.where(r < 0.5, ints, w)
    w = torch.where(r < 0.10, torch.tensor(-0.0, dtype=torch.float64), w)
    w = torch.where(r < 0.06, torch.tensor(math.inf, dtype=torch.float64), w)
    w = torch.where(r < 0.04, torch.tensor(-math.inf, dtype=torch.float64), w)
    w = torch.where(r < 0.02, torch.tensor(math.nan, dtype=torch.float64), w)
    return w.to(dtype)


def sparse_weight(N: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A 2:4-sparse weight with every nonzero pattern: groups with 0, 1 and 2 nonzeros (NaN and
    inf included) and -0.0 at kept and dropped positions."""
    g = torch.Generator().manual_seed(seed)
    w = nasty_weight(N, K, torch.float64, seed).reshape(N, K // 4, 4)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]  # 2 random positions
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(N, K // 4, 1, generator=g) > 0.2  # some groups lose both
    mask[..., 0] &= torch.rand(N, K // 4, generator=g) > 0.3  # and some one
    zeros = torch.where(torch.rand(w.shape, generator=g) < 0.3, -0.0, 0.0).double()
    return torch.where(mask, w, zeros).reshape(N, K).to(dtype)


def strided_variants(w: torch.Tensor):
    """w itself and non-contiguous tensors with w's values."""
    yield "contiguous", w
    yield "transposed", w.t().contiguous().t()
    wide = torch.zeros(w.shape[0], 2 * w.shape[1], dtype=w.dtype)
    wide[:, 1::2] = w
    yield "column stride 2", wide[:, 1::2]
    tall = torch.zeros(3 * w.shape[0], w.shape[1], dtype=w.dtype)
    tall[::3] = w
    yield "row stride 3", tall[::3]


# ---------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_follows_the_per_group_spec(dtype):
    N, K = 37, 24
    w = nasty_weight(N, K, dtype, seed=1)
    pruned, w_bits = as_bits(prune_24_ref(w)), as_bits(w)
    for n in range(N):
        for gi in range(K // 4):
            kept = spec_prune_kept(w[n, 4 * gi:4 * gi + 4].tolist())
            expected = [w_bits[n, 4 * gi + i].item() if i in kept else 0 for i in range(4)]
            assert pruned[n, 4 * gi:4 * gi + 4].tolist() == expected

    sparse = sparse_weight(N, K, dtype, seed=2)
    values, meta = compress_24_ref(sparse)
    s_bits, v_bits = as_bits(sparse), as_bits(values)
    restored = torch.zeros(N, K, dtype=BITS[dtype])  # kept positions bit for bit, +0.0 elsewhere
    for n in range(N):
        for gi in range(K // 4):
            i0, i1 = spec_compress_kept(sparse[n, 4 * gi:4 * gi + 4].tolist())
            assert v_bits[n, 2 * gi].item() == s_bits[n, 4 * gi + i0].item()
            assert v_bits[n, 2 * gi + 1].item() == s_bits[n, 4 * gi + i1].item()
            assert (meta[n, gi // 2].item() >> (4 * (gi % 2))) & 15 == i0 | (i1 << 2)
            restored[n, 4 * gi + i0] = s_bits[n, 4 * gi + i0]
            restored[n, 4 * gi + i1] = s_bits[n, 4 * gi + i1]
        if K % 8 == 4:
            assert meta[n, -1] >> 4 == 0
    assert torch.equal(as_bits(decompress_24_ref(values, meta)), restored)


# ---------------------------------------------------------------------------- C++ vs reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpp_matches_reference(dtype, shape, poison_empty):
    N, K = shape
    w = nasty_weight(N, K, dtype, seed=N * 1000 + K)
    sparse = sparse_weight(N, K, dtype, seed=N * 1000 + K + 1)
    values_ref, meta_ref = compress_24_ref(sparse)
    for name, w_in in strided_variants(w):
        assert_same_bits(prune_24(w_in), prune_24_ref(w))
    for name, s_in in strided_variants(sparse):
        values, meta = compress_24(s_in)
        assert meta.dtype == torch.uint8 and meta.shape == (N, (K + 7) // 8), name
        assert values.is_contiguous() and meta.is_contiguous()
        assert_same_bits(values, values_ref)
        assert torch.equal(meta, meta_ref), name
    for name, v_in in strided_variants(values_ref):
        m_in = meta_ref.t().contiguous().t() if name == "transposed" else meta_ref
        assert_same_bits(decompress_24(v_in, m_in), decompress_24_ref(values_ref, meta_ref))
    if K % 8 == 4:
        assert (meta_ref[:, -1] >> 4 == 0).all()


def sparse_int8_weight(N: int, K: int, seed: int = 0) -> torch.Tensor:
    """A 2:4-sparse int8 weight (a quantized one) over the whole range, -128 included, with groups
    of 0, 1 and 2 nonzeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (N, K // 4, 4), generator=g, dtype=torch.int8)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(N, K // 4, 1, generator=g) > 0.2
    mask[..., 0] &= torch.rand(N, K // 4, generator=g) > 0.3
    return torch.where(mask, w, torch.zeros_like(w)).reshape(N, K)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpp_int8_compress_and_decompress_match_reference(shape, poison_empty):
    N, K = shape
    sparse = sparse_int8_weight(N, K, seed=N * 1000 + K)
    values_ref, meta_ref = compress_24_ref(sparse)
    for name, s_in in strided_variants(sparse):
        values, meta = compress_24(s_in)
        assert values.dtype == torch.int8 and torch.equal(values, values_ref), name
        assert torch.equal(meta, meta_ref), name
    for name, v_in in strided_variants(values_ref):
        assert torch.equal(decompress_24(v_in, meta_ref), sparse), name
    bad = sparse.clone()
    bad[N - 1, :4] = torch.tensor([1, -128, 3, 0], dtype=torch.int8)
    with pytest.raises(ValueError, match=rf"not 2:4 sparse: row {N - 1}, group 0 .* has 3 nonzeros"):
        compress_24(bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trips(dtype):
    N, K = 23, 44
    w = nasty_weight(N, K, dtype, seed=5)
    pruned = prune_24(w)
    # prune -> compress -> decompress gives the pruned weight back, bit for bit: compression
    # keeps exactly the positions pruning kept (zeros included, by the same lowest-index rule)
    assert_same_bits(decompress_24(*compress_24(pruned)), pruned)
    assert_same_bits(prune_24(pruned), pruned)
    # compress -> decompress -> compress is the identity on (values, meta)
    values, meta = compress_24(sparse_weight(N, K, dtype, seed=6))
    values2, meta2 = compress_24(decompress_24(values, meta))
    assert_same_bits(values2, values)
    assert torch.equal(meta2, meta)


def test_compress_decompress_loses_only_the_sign_of_dropped_zeros():
    w = torch.tensor([[-0.0, 0.0, -0.0, 2.0, 0.0, -0.0, 1.0, -0.0]])
    out = decompress_24(*compress_24(w))
    # group 0 keeps positions 0 and 3 (its nonzero, completed by the lowest zero): -0.0 stays;
    # group 1 keeps 0 and 2: the dropped -0.0 at 1 and 3 come back as +0.0
    assert_same_bits(out, torch.tensor([[-0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_nan_and_few_nonzeros_by_hand(dtype):
    nan, inf = math.nan, math.inf
    w = torch.tensor([[1, -1, 1, 0.5,      # tie of |1|: positions 0 and 1
                       0.5, 1, -1, 1,      # tie: 1 and 2
                       0, -0.0, 0, 0,      # all zero: 0 and 1, -0.0 kept as it is
                       2, 2, 2, 2,         # 0 and 1
                       nan, 1, 2, 3,       # NaN beats everything: 0 and 3
                       inf, nan, 5, -inf,  # NaN, then inf before -inf (lower position): 0, 1
                       -inf, 7, nan, nan,  # two NaNs: 2 and 3
                       3, 0, 0, -4]], dtype=dtype)  # -4 and 3
    expected = torch.tensor([[1, -1, 0, 0,
                              0, 1, -1, 0,
                              0, -0.0, 0, 0,
                              2, 2, 0, 0,
                              nan, 0, 0, 3,
                              inf, nan, 0, 0,
                              0, 0, nan, nan,
                              3, 0, 0, -4]], dtype=dtype)
    assert_same_bits(prune_24(w), expected)
    assert_same_bits(prune_24_ref(w), expected)

    sparse = torch.tensor([[0, 0, 0, 0,        # no nonzeros: 0, 1
                            0, 0, 5, 0,        # one: 0, 2
                            0, 0, 0, 7,        # one at the end: 0, 3
                            -0.0, 0, 3, 0,     # -0.0 is zero; kept -0.0 keeps its sign: 0, 2
                            6, 0, 0, 0,        # 0, 1
                            0, nan, 0, -inf,   # NaN and inf are nonzero: 1, 3
                            0, 0, 1, 2,        # 2, 3
                            0, 1, 0, 0]], dtype=dtype)  # 0, 1 (K % 8 == 0 here)
    values, meta = compress_24(sparse)
    assert_same_bits(values, torch.tensor([[0, 0, 0, 5, 0, 7, -0.0, 3, 6, 0, nan, -inf, 1, 2, 0, 1]],
                                          dtype=dtype))
    codes = [0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2, 0 | 2 << 2, 0 | 1 << 2, 1 | 3 << 2, 2 | 3 << 2, 0 | 1 << 2]
    assert meta.tolist() == [[codes[i] | codes[i + 1] << 4 for i in range(0, 8, 2)]]
    values3, meta3 = compress_24(sparse[:, :12])  # K % 8 == 4: the last high nibble is 0
    assert meta3.tolist() == [[codes[0] | codes[1] << 4, codes[2]]]
    assert_same_bits(values3, values[:, :6])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nan_payloads_and_signs_are_all_one_nan(dtype):
    """Every NaN pattern ranks the same (so ties between NaNs go to the lower position) and
    kept NaNs are copied bit for bit."""
    int_t = BITS[dtype]
    nbits = torch.finfo(dtype).bits
    exp_bits = {torch.float16: 5, torch.bfloat16: 8, torch.float32: 8, torch.float64: 11}[dtype]
    mant = nbits - 1 - exp_bits
    quiet = ((1 << exp_bits) - 1) << mant | 1 << (mant - 1)
    sign = -(1 << (nbits - 1))  # the sign bit as a signed integer
    patterns = [quiet | 5, sign | quiet, quiet | 1, sign | quiet | 3]  # payloads and signs differ
    nans = torch.tensor(patterns, dtype=int_t).view(dtype)
    assert nans.isnan().all()
    w = torch.stack([nans, torch.cat([torch.tensor([9.0, -9.0], dtype=dtype), nans[2:]])]).reshape(1, 8)
    out = prune_24(w)
    bits = out.view(int_t)[0].tolist()
    assert bits[:4] == [patterns[0], patterns[1], 0, 0]  # 4 NaNs: the first two
    assert bits[4:] == [0, 0, patterns[2], patterns[3]]  # NaNs beat +-9
    values, meta = compress_24(out)
    assert_same_bits(decompress_24(values, meta), out)


def test_parallel_rows_and_first_error():
    """Enough rows for several parallel tasks: the error names the lowest bad row and group."""
    N, K = 4096, 64
    w = sparse_weight(N, K, torch.float32, seed=7)
    values, meta = compress_24(w)
    values_ref, meta_ref = compress_24_ref(w)
    assert_same_bits(values, values_ref)
    assert torch.equal(meta, meta_ref)
    assert_same_bits(decompress_24(values, meta), decompress_24_ref(values, meta))
    bad = w.clone()
    bad[3000, 20:24] = 1.0
    bad[2500, 0:3] = 1.0
    bad[1000, 48:52] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    bad[1000, 36:40] = torch.tensor([1.0, 0.0, 2.0, math.nan])
    with pytest.raises(ValueError, match=r"row 1000, group 9 \(k = 36\.\.39\) has 3 nonzeros"):
        compress_24(bad)
    bad_meta = meta.clone()
    bad_meta[3000, 1] = 0x44 | 0x0F  # code 15 = (3, 3)
    bad_meta[1700, 5] = 0x06 | 0x40  # low nibble code 6 = (2, 1): group 10
    bad_meta[1700, 6] = 0x00
    with pytest.raises(ValueError, match=r"invalid meta code 6 at row 1700, group 10 \(k = 40\.\.43"):
        decompress_24(values, bad_meta)


def test_empty_shapes():
    for N, K in [(0, 8), (3, 0), (0, 0)]:
        w = torch.zeros(N, K, dtype=torch.float16)
        assert prune_24(w).shape == (N, K)
        values, meta = compress_24(w)
        assert values.shape == (N, K // 2) and meta.shape == (N, (K + 7) // 8)
        assert meta.dtype == torch.uint8
        assert decompress_24(values, meta).shape == (N, K)


# ---------------------------------------------------------------------------- effkern's ops on every backend

def hard_cases(dtype: torch.dtype):
    """(w, sparse) pairs for prune_24 and compress_24: nasty and 2:4-sparse weights, K % 8 == 4 and 0."""
    for N, K in ((37, 44), (9, 136)):
        yield nasty_weight(N, K, dtype, seed=K), sparse_weight(N, K, dtype, seed=K + 1)


def cpp_format_results(w: torch.Tensor, sparse: torch.Tensor) -> list[torch.Tensor]:
    values, meta = compress_24(sparse)
    return [prune_24(w), values, meta, decompress_24(values, meta)]


def effkern_format_results(w: torch.Tensor, sparse: torch.Tensor, device: str) -> list[torch.Tensor]:
    """cpp_format_results through effkern's ops on ``device`` tensors under the current backend, on the CPU."""
    values, meta = ek.compress_24(sparse.to(device))
    return [t.cpu() for t in (ek.prune_24(w.to(device)), values, meta, ek.decompress_24(values, meta))]


def assert_format_results_agree(actual: list, expected: list):
    for name, a, e in zip(("prune_24", "values", "meta", "decompress_24"), actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), f"{name}: the bits differ"


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_effkern_ops_give_the_cpp_bits_on_every_backend(backend, dtype):
    """ek.prune_24 / compress_24 / decompress_24 on CPU tensors: the PyTorch reference and the
    op's dispatch to these kernels, on ties, +-0.0, NaN and +-inf."""
    for w, sparse in hard_cases(dtype):
        with ek.use_backend(backend):
            actual = effkern_format_results(w, sparse, "cpu")
        assert_format_results_agree(actual, cpp_format_results(w, sparse))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_effkern_ops_give_the_cpp_bits(dtype):
    for w, sparse in hard_cases(dtype):
        assert_format_results_agree(effkern_format_results(w, sparse, "cuda"), cpp_format_results(w, sparse))


# ---------------------------------------------------------------------------- errors
# ValueError for shapes and for content that breaks the format, TypeError for dtypes (the
# project's Python conventions; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE in C++).

def test_errors_on_the_weight():
    w = torch.randn(4, 8)
    for op in (prune_24, compress_24):
        with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\], got 1-D shape \[8\]"):
            op(w[0])
        with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\], got 3-D"):
            op(w.reshape(2, 2, 8))
        with pytest.raises(ValueError, match=r"multiple of 4.*got K = 6 \(shape \[4, 6\]\)"):
            op(w[:, :6])
        accepted = ("float16, bfloat16, float32 or float64" if op is prune_24
                    else "float16, bfloat16, float32, float64 or int8")
        for bad_dtype in (torch.int32, torch.uint8, torch.complex64, torch.bool):
            with pytest.raises(TypeError, match=f"weight must be {accepted}, got"):
                op(w.to(bad_dtype))
    with pytest.raises(TypeError, match="weight must be float16, bfloat16, float32 or float64, got Char"):
        prune_24(w.to(torch.int8))  # pruning ranks float magnitudes: prune, then quantize
    bad = prune_24(torch.randn(4, 12))
    bad[2, 4:7] = torch.tensor([1.0, -0.5, 2.0])
    with pytest.raises(ValueError, match=r"compress_24: weight is not 2:4 sparse: row 2, group 1 "
                                           r"\(k = 4\.\.7\) has 3 nonzeros"):
        compress_24(bad)
    bad[2, 4:8] = torch.tensor([1.0, math.nan, math.inf, 2.0])
    with pytest.raises(ValueError, match=r"row 2, group 1 \(k = 4\.\.7\) has 4 nonzeros"):
        compress_24(bad)


def test_errors_on_values_and_meta():
    values, meta = compress_24(prune_24(torch.randn(3, 12)))  # values [3, 6], meta [3, 2]
    with pytest.raises(ValueError, match=r"values must be 2-D \[N, K / 2\], got 1-D"):
        decompress_24(values[0], meta)
    with pytest.raises(ValueError, match=r"dim 1 must be even, got shape \[3, 5\]"):
        decompress_24(values[:, :5], meta)
    with pytest.raises(TypeError, match="values must be float16, bfloat16, float32, float64 or int8, got Int"):
        decompress_24(values.int(), meta)
    with pytest.raises(TypeError, match="meta must be uint8, got Int"):
        decompress_24(values, meta.int())
    with pytest.raises(ValueError, match=r"meta must be \[N, ceil\(K / 8\)\] = \[3, 2\] for values of "
                                           r"shape \[3, 6\] \(K = 12\), got shape \[3, 3\]"):
        decompress_24(values, torch.zeros(3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"meta must be .* got shape \[2, 2\]"):
        decompress_24(values, meta[:2])
    with pytest.raises(ValueError, match=r"meta must be .* got shape \[6\]"):
        decompress_24(values, meta.reshape(6))
    for code in (0, 5, 10, 15, 1 | 0 << 2, 3 | 1 << 2):  # i0 == i1 or i0 > i1
        bad = meta.clone()
        bad[1, 1] = code  # group 2, the last (K = 12 has 3 groups)
        with pytest.raises(ValueError, match=rf"invalid meta code {code} at row 1, group 2 \(k = 8\.\.11"):
            decompress_24(values, bad)
    bad = meta.clone()
    bad[2, 0] = (bad[2, 0] & 15) | (2 << 4)  # group 1: code 2 = (2, 0)
    with pytest.raises(ValueError, match=r"invalid meta code 2 at row 2, group 1 "):
        decompress_24(values, bad)
    bad = meta.clone()
    bad[0, 1] |= 0x40  # the unused high nibble of the last byte (K % 8 == 4)
    with pytest.raises(ValueError, match=r"invalid meta at row 0: .*high nibble of the last byte"):
        decompress_24(values, bad)


def test_errors_on_equal_positions_in_every_group_of_a_byte():
    """Codes with i0 == i1 (0, 5, 10, 15: a zero-filled meta gives code 0) are invalid in the
    groups of a full byte too, low nibble and high nibble, not only in the odd last group (the
    C++ kernel checks a row's byte pairs and its last odd group apart)."""
    values, meta = compress_24(prune_24(torch.randn(3, 16)))  # K = 16: 4 groups, meta [3, 2]
    for group in range(4):
        shift = 4 * (group % 2)
        for code in (0, 5, 10, 15):
            bad = meta.clone()
            bad[1, group // 2] = (int(bad[1, group // 2]) & (0xF0 >> shift)) | (code << shift)
            with pytest.raises(ValueError, match=rf"invalid meta code {code} at row 1, group {group} "):
                decompress_24(values, bad)


# ---------------------------------------------------------------------------- timing

def _median_seconds(fn, repeats):
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    torch.manual_seed(0)
    N = K = 8192
    w = prune_24(torch.randn(N, K, dtype=torch.float16))
    print(f"{N} x {K} float16 2:4 weight ({w.numel() * 2 / 2**20:.0f} MiB), "
          f"torch threads: {torch.get_num_threads()}")
    compress_24(w)  # warm-up
    t_cpp = _median_seconds(lambda: compress_24(w), 7)
    t_ref = _median_seconds(lambda: compress_24_ref(w), 3)
    print(f"compress_24   C++ {t_cpp * 1e3:8.1f} ms   reference {t_ref * 1e3:8.1f} ms   ({t_ref / t_cpp:.1f}x)")
    dense = torch.randn(N, K, dtype=torch.float16)
    t_cpp = _median_seconds(lambda: prune_24(dense), 7)
    t_ref = _median_seconds(lambda: prune_24_ref(dense), 3)
    print(f"prune_24      C++ {t_cpp * 1e3:8.1f} ms   reference {t_ref * 1e3:8.1f} ms   ({t_ref / t_cpp:.1f}x)")
    values, meta = compress_24(w)
    t_cpp = _median_seconds(lambda: decompress_24(values, meta), 7)
    t_ref = _median_seconds(lambda: decompress_24_ref(values, meta), 3)
    print(f"decompress_24 C++ {t_cpp * 1e3:8.1f} ms   reference {t_ref * 1e3:8.1f} ms   ({t_ref / t_cpp:.1f}x)")
    t_copy = _median_seconds(lambda: w.clone(), 7)
    print(f"(w.clone() for scale: {t_copy * 1e3:.1f} ms)")
