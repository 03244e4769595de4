"""The CUDA-graph checks (op_checks.assert_cuda_graph_replays_like_eager and the benchmark's
graph timing), run on the CPU against tests/fake_cuda_graph.py's stand-in for torch.cuda's graph
API: they pass capturable ops, through the Triton interpreter and with a backward, and fail ops
that a graph cannot replay (a value read to the host at capture, an output kept in Python, work
done outside the capture)."""

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from bench import harness

import fake_cuda_graph
from op_checks import assert_cuda_graph_replays_like_eager


@pytest.fixture
def fake_graphs(monkeypatch):
    fake_cuda_graph.install(monkeypatch)


def _inputs(*shape, requires_grad=True):
    def make(seed):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        return [x.requires_grad_(requires_grad)]

    return make


def test_passes_an_op_through_the_triton_interpreter(fake_graphs):
    qw, scale = ek.quantize_int8(torch.randn(24, 40))
    b = torch.randn(24)
    assert_cuda_graph_replays_like_eager("triton", lambda x: ek.int8_weight_only_linear(x, qw, scale, b),
                                         _inputs(3, 40))


def test_passes_forward_and_backward_of_every_input(fake_graphs):
    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*s, generator=g).requires_grad_() for s in ((5, 16), (12, 16), (12,))]

    assert_cuda_graph_replays_like_eager("reference", lambda x, w, b: ek.linear_gelu(x, w, b), inputs)


def test_catches_a_value_read_to_the_host_at_capture(fake_graphs):
    def per_tensor_scaled(x):
        return x / x.abs().max().item()  # the capture's maximum, a Python float, stays in the graph

    with pytest.raises(AssertionError):
        assert_cuda_graph_replays_like_eager("reference", per_tensor_scaled, _inputs(4, 8))


def test_catches_a_tensor_made_from_host_data_at_capture(fake_graphs):
    def doubled(x):
        return x * torch.tensor([2.0], device=x.device)

    with pytest.raises(RuntimeError, match="during a CUDA graph capture"):
        assert_cuda_graph_replays_like_eager("reference", doubled, _inputs(4, 8))


def _training_steps():
    """(name, backend, fn, inputs): one op of each family, whose forward and backward capture."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    b = torch.randn(16, generator=torch.Generator().manual_seed(1))
    qw, scale = ek.quantize_int8(w)
    q4 = ek.quantize_int4(w, group_size=32)
    values, meta = ek.compress_24(ek.prune_24(w))
    yield "linear_gelu", "triton", lambda x: ek.linear_gelu(x, w, b), _inputs(3, 64)
    yield "int8_linear", "triton", lambda x: ek.int8_linear(x, qw, scale, b), _inputs(3, 64)
    yield "int4_linear", "triton", lambda x: ek.int4_linear(x, *q4, group_size=32, bias=b), _inputs(3, 64)
    yield "sparse24_linear", "triton", lambda x: ek.sparse24_linear(x, values, meta, b), _inputs(3, 64)
    yield ("flash_attention", "triton", lambda q: ek.flash_attention(q, q * 0.5, q * 2.0, causal=True).float(),
           lambda seed: [torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(seed)).half()
                         .requires_grad_()])


@pytest.mark.parametrize("case", list(_training_steps()), ids=lambda case: case[0])
def test_every_family_captures_forward_and_backward(fake_graphs, case):
    """Each family's op and its backward under the fake graph: no value read to the host, no tensor
    made from host data (the int4 backward made its nibble shifts with torch.tensor until it
    was caught here), the replays follow their inputs."""
    _, backend, fn, inputs = case
    assert_cuda_graph_replays_like_eager(backend, fn, inputs)


def test_catches_an_output_kept_in_python(fake_graphs):
    kept = {}

    def memoized(x):
        if "out" not in kept:
            kept["out"] = x * 2
        return kept["out"]

    with pytest.raises(AssertionError):
        assert_cuda_graph_replays_like_eager("reference", memoized, _inputs(4, 8, requires_grad=False))


def test_benchmark_graph_timing_returns_what_the_replays_wrote(fake_graphs, monkeypatch):
    # a CPU timer in place of CUDA events: measure_graph's capture and replay are what is tested
    monkeypatch.setattr(harness, "measure", lambda call, reset, device, budget_ms=100.0: harness._measure_cpu(
        call, reset, 1.0))
    sets = [[torch.randn(6, 10)] for _ in range(3)]
    w = torch.randn(4, 10)

    def call_with(fn):
        return lambda i: fn(*sets[i % len(sets)])

    ms, replayed = harness.measure_graph(call_with(lambda x: F.linear(x, w)), len(sets))
    assert ms > 0
    torch.testing.assert_close(replayed, F.linear(sets[0][0], w))

    def not_captured(x):  # its work happens outside the capture: the graph holds only a fill
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(x.shape[0], w.shape[0])
        return F.linear(x, w)

    _, replayed = harness.measure_graph(call_with(not_captured), len(sets))
    assert not torch.allclose(replayed, F.linear(sets[0][0], w))
