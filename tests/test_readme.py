"""The README's API examples, run.

Every ```python block of README.md (read from the file: no example is copied here) runs
statement by statement, once under each backend that runs on CPU tensors, in a namespace this
test prepares with small tensors for the names the fragments leave to the reader (x, weight,
bias, linear, model, q/k/v, a_q/b_q, GPTQ and AWQ checkpoint tensors). Then what the README
says of each line, in its comment or in the prose under the block, is checked on what that
line made, against float64 with effkern.testing's tolerance where it is a number.

A check finds its line by text the README line holds (its comment, mostly): a reworded line
fails here until its check follows, and so does a line or a block that no check looks at.
Tracebacks name README.md and its line numbers.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
import math
import pathlib
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import effkern as ek

from op_checks import (assert_dequantized_from, assert_linear_matches_float64, assert_matches_float64,
                       needs_backend)
from test_int4 import awq_checkpoint, gptq_checkpoint

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BACKENDS = ["auto", "reference", "triton"]
# The examples create one thing on device="cuda" (ek.nn.LinearGELU(..., device="cuda")). Where there
# is no GPU that argument is replaced by "cpu" (said in the check of that line, which asserts where
# the layer landed); with a GPU the line runs as written. Everything else here is on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------- reading and running

def readme_blocks() -> list[tuple[str, int, str]]:
    """(heading of the section, README line of the block's first statement, source) of each
    ```python block at the left margin (the indented fences in lists are format tables)."""
    blocks, heading, inside, start, body = [], None, None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if inside is not None:
            if line.lstrip().startswith("```"):
                if inside == "python":
                    blocks.append((heading, start, "\n".join(body)))
                inside = None
            else:
                body.append(line)
        elif line.lstrip().startswith("```"):
            inside, start, body = line.lstrip()[3:].strip(), number + 1, []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


@dataclasses.dataclass
class Step:
    """One statement of a block, as run."""
    text: str  # its README line(s), comment included
    line: int  # README line number
    ns: dict  # the namespace after it ran (a shallow copy)
    value: object = None  # an expression statement's value
    on_cpu_instead_of_cuda: bool = False  # device="cuda" was replaced by "cpu"
    checked: bool = False


class _OnTestDevice(ast.NodeTransformer):
    """device="cuda" -> device="cpu" where there is no GPU (see DEVICE); ``replaced`` says if it did."""

    def __init__(self):
        self.replaced = False

    def visit_keyword(self, node):
        if (DEVICE != "cuda" and node.arg == "device" and isinstance(node.value, ast.Constant)
                and node.value.value == "cuda"):
            self.replaced = True
            cpu = ast.copy_location(ast.Constant("cpu"), node.value)
            return ast.copy_location(ast.keyword(arg="device", value=cpu), node)
        return self.generic_visit(node)


def run_block(source: str, first_line: int, ns: dict, before: dict[str, Callable[[dict], None]]) -> list[Step]:
    """Runs the block's statements in ``ns`` one by one; ``before`` maps text of a statement to a
    function that updates ``ns`` just before that statement runs."""
    tree = ast.parse(source)
    lines = source.splitlines()
    steps, used = [], set()
    for stmt in tree.body:
        text = "\n".join(lines[stmt.lineno - 1:stmt.end_lineno])
        for key, update in before.items():
            if key in text:
                update(ns)
                used.add(key)
        device = _OnTestDevice()
        node = ast.fix_missing_locations(device.visit(stmt))
        ast.increment_lineno(node, first_line - 1)  # tracebacks give README.md's line numbers
        value = None
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), str(README), "eval"), ns)
        else:
            exec(compile(ast.Module([node], type_ignores=[]), str(README), "exec"), ns)
        steps.append(Step(text, first_line + stmt.lineno - 1, dict(ns), value, device.replaced))
    assert used == set(before), f"no statement of the block holds {set(before) - used}: update this test"
    return steps


def step(steps: list[Step], text: str) -> Step:
    """The one statement of the block whose README text holds ``text``."""
    found = [s for s in steps if text in s.text]
    assert len(found) == 1, (f"README: {len(found)} statements of the block hold {text!r} (expected one); "
                             f"if the README changed, update this test's check")
    found[0].checked = True
    return found[0]


# ---------------------------------------------------------------------------- helpers of the checks

def float_dtype(backend: str) -> torch.dtype:
    """The namespaces' float dtype: bfloat16 under auto, float32 under reference and triton (the
    interpreter's tl.dot cannot multiply bfloat16; attention's kernels take float16 there)."""
    return torch.bfloat16 if backend == "auto" else torch.float32


def lin(n_in: int, n_out: int, dtype: torch.dtype) -> torch.nn.Linear:
    return torch.nn.Linear(n_in, n_out, dtype=dtype)


def strided(*shape, dtype) -> torch.Tensor:
    """randn of ``shape``, a view that is not contiguous ("any leading dims and any strides")."""
    t = torch.randn(shape[1], shape[0], *shape[2:]).transpose(0, 1).to(dtype)
    assert not t.is_contiguous()
    return t


def dequantized_int8(qweight, scale, dtype=torch.float64):
    return qweight.to(dtype) * scale.to(dtype)[:, None]


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The README's rule, written out: scale = absmax(row) / 127 in float32, q = round half to
    even of x / scale (correctly rounded division), clamped to [-127, 127]; a zero row gets 0s."""
    scale = x.float().abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, torch.round(x.float() / scale[..., None]), 0).clamp(-127, 127)
    return q.to(torch.int8), scale


def assert_state_dict_round_trips(layer: torch.nn.Module, fresh: torch.nn.Module, x: torch.Tensor):
    """``fresh`` (a new module of the same shape) loads ``layer``'s state_dict strictly and then
    holds the same tensors and computes the same output, bit for bit."""
    state = layer.state_dict()
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    for name, value in fresh.state_dict().items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


# ---------------------------------------------------------------------------- the blocks

class Example:
    """One README block: the namespace it runs in (``setup``), updates just before some of its
    statements (``before``) and the checks of what it made (``check``)."""
    heading: str
    before: dict[str, Callable[[dict], None]] = {}

    def setup(self, backend: str) -> dict:
        raise NotImplementedError

    def check(self, steps: list[Step], backend: str, capsys) -> None:
        raise NotImplementedError


class API(Example):
    heading = "API"

    def setup(self, backend):
        torch._dynamo.reset()
        dtype = float_dtype(backend)
        # one module of each weight format (every family with a module)
        model = torch.nn.Sequential(ek.nn.LinearGELU.from_linear(lin(32, 48, dtype)),
                                    ek.nn.Int8Linear.from_linear(lin(48, 32, dtype)),
                                    ek.nn.Int4Linear.from_linear(lin(32, 32, dtype), group_size=32),
                                    ek.nn.Sparse24Linear.from_linear(lin(32, 16, dtype)))
        return dict(x=strided(2, 3, 32, dtype=dtype), weight=(torch.randn(48, 32) / math.sqrt(32)).to(dtype),
                    bias=torch.randn(48).to(dtype), linear=lin(32, 48, dtype), model=model)

    def check(self, steps, backend, capsys):
        ns = steps[0].ns
        x, weight, bias, linear, model = (ns[n] for n in ("x", "weight", "bias", "linear", "model"))
        assert step(steps, "import torch, effkern as ek").ns["ek"] is ek

        for text, approximate in (("# == F.gelu(F.linear(x, weight, bias))", "none"),
                                  ('approximate="tanh")', "tanh"),
                                  ("recompute_preact=True)", "none")):
            y = step(steps, text).ns["y"]
            exact = F.gelu(F.linear(x.double(), weight.double(), bias.double()), approximate=approximate)
            assert_matches_float64(y, exact, F.gelu(F.linear(x, weight, bias), approximate=approximate),
                                   reduction=x.shape[-1], what=text)

        # "less activation memory": the [M, N] gelu'(z) a training forward keeps is not kept with
        # recompute_preact=True, and the gradients are still right
        with ek.use_backend(backend):
            kept, leaves = {False: [], True: []}, {}
            for recompute in kept:
                leaves[recompute] = leaf = x.detach().requires_grad_()
                with torch.autograd.graph.saved_tensors_hooks(lambda t, r=recompute: kept[r].append(t.shape) or t,
                                                              lambda t: t):
                    out = ek.linear_gelu(leaf, weight, bias, recompute_preact=recompute)
                out.sum().backward()
            M, N = x.shape[:-1].numel(), weight.shape[0]
            assert (M, N) in kept[False] and (M, N) not in kept[True], kept
        exact = x.double().requires_grad_()
        F.gelu(F.linear(exact, weight.double(), bias.double())).sum().backward()
        same = x.detach().requires_grad_()
        F.gelu(F.linear(same, weight, bias)).sum().backward()
        assert_matches_float64(leaves[True].grad, exact.grad, same.grad, reduction=N,
                               what="recompute_preact grad_input")

        made = step(steps, "ek.nn.LinearGELU(4096, 16384, bias=True")
        # the line asks for device="cuda": without a GPU the layer is made on the CPU instead
        assert made.on_cpu_instead_of_cuda == (DEVICE == "cpu")
        layer = made.ns["layer"]
        assert isinstance(layer, torch.nn.Linear) and layer.weight.device.type == DEVICE
        assert layer.weight.shape == (16384, 4096) and layer.bias.shape == (16384,)
        assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16

        layer = step(steps, "# shares linear's Parameters, same state_dict").ns["layer"]
        assert layer.weight is linear.weight and layer.bias is linear.bias
        mine, theirs = layer.state_dict(), linear.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(mine[k].data_ptr() == theirs[k].data_ptr() for k in mine)  # the same tensors, not copies
        layer.load_state_dict(theirs)  # strict: nothing missing, nothing unexpected
        with torch.no_grad(), ek.use_backend(backend):
            exact = F.gelu(F.linear(x.double(), linear.weight.double(), linear.bias.double()))
            assert_matches_float64(layer(x), exact, F.gelu(linear(x)), reduction=x.shape[-1], what="from_linear")

        compiled = step(steps, "# no graph break at effkern ops").ns["model"]
        assert compiled._orig_mod is model
        torch._dynamo.utils.counters.clear()
        with torch.no_grad(), ek.use_backend(backend):
            got, eager = compiled(x), model(x)  # fullgraph=True: a graph break would raise here
        assert not torch._dynamo.utils.counters["graph_break"]
        torch.testing.assert_close(got, eager, rtol=0, atol=0)

        chosen = step(steps, 'with ek.use_backend("triton"): ...')
        comment = chosen.text.split("#", 1)[1]
        assert tuple(name.strip() for name in comment.split("|")) == ek.BACKENDS
        for name in ek.BACKENDS:
            with ek.use_backend(name):
                pass

        report = step(steps, "# versions, GPU, extension, backend per op").value
        assert {"torch", "triton", "gpu", "extension"} <= report.keys()
        assert report["auto"].keys() >= {"linear_gelu", "attention", "int8", "int4", "sparse24"}
        assert "effkern._C" in capsys.readouterr().out


def attention_formula(q, k, v, scale, window, softcap, dtype):
    """The README's definition in ``dtype``: bottom-right causal within window=(left, right), a
    softcap, softmax; a query that sees no key gives 0 and lse -inf. Returns (out, lse)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    Sq, Skv = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap)
    diagonal = torch.arange(Sq)[:, None] + (Skv - Sq)
    j = torch.arange(Skv)[None, :]
    sees = (j <= diagonal + window[1]) & (j >= diagonal - window[0])
    s = s.masked_fill(~sees, -math.inf)
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, -1)
    p = torch.where(sees, torch.softmax(s, -1), 0)
    return p @ v, lse


class Attention(Example):
    heading = "Flash attention"

    def setup(self, backend):
        # Sq > Skv: torch's causal is top-left, effkern's bottom-right (its first Sq - Skv rows see no key)
        dtype = torch.float16 if backend == "triton" else float_dtype(backend)
        return dict(q=torch.randn(1, 2, 6, 16, dtype=dtype), k=torch.randn(1, 2, 4, 16, dtype=dtype),
                    v=torch.randn(1, 2, 4, 16, dtype=dtype))

    def check(self, steps, backend, capsys):
        ns = steps[0].ns
        q, k, v = ns["q"], ns["k"], ns["v"]
        sdpa = step(steps, "# F.scaled_dot_product_attention's signature")
        # torch's SDPA is a builtin without an inspectable signature; its docstring starts with it
        doc = F.scaled_dot_product_attention.__doc__
        torch_params = ast.parse("def " + doc[:doc.index(")") + 1] + ": pass").body[0].args
        names = [a.arg for a in torch_params.args]
        defaults = [ast.literal_eval(d) for d in torch_params.defaults]
        ours = inspect.signature(ek.scaled_dot_product_attention).parameters
        assert list(ours) == names
        assert [p.default for p in ours.values()][len(names) - len(defaults):] == defaults
        out = sdpa.ns["out"]
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        assert_matches_float64(out, exact, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               reduction=k.shape[2], what="scaled_dot_product_attention")

        flash = step(steps, "window=(256, 0), softcap=30.0, return_lse=True")
        out, lse = flash.ns["out"], flash.ns["lse"]
        B, H, Sq, D = q.shape
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
        args = (q, k, v, D ** -0.5, (256, 0), 30.0)
        exact, exact_lse = attention_formula(*args, torch.float64)
        same, same_lse = attention_formula(*args, q.dtype)
        assert_matches_float64(out, exact, same, reduction=k.shape[2], what="flash_attention")
        unseen = torch.isinf(exact_lse)
        assert unseen.any()  # the case this shape is for
        assert torch.equal(torch.isinf(lse), unseen) and (lse[unseen] < 0).all()
        assert (out[unseen] == 0).all()
        assert_matches_float64(lse[~unseen], exact_lse[~unseen], same_lse[~unseen], reduction=k.shape[2],
                               what="lse")


class Int8(Example):
    heading = "INT8 matmul (W8A8, W8A16)"

    def setup(self, backend):
        g = torch.Generator().manual_seed(1)
        x = strided(2, 3, 40, dtype=float_dtype(backend))
        x[1, 2] = 0  # "A row of zeros gets scale 0 and q = 0 (no NaN)"
        return dict(linear=lin(40, 24, x.dtype), x=x,
                    a_q=torch.randint(-128, 128, (3, 7), dtype=torch.int8, generator=g),  # -128 too: any int8
                    b_q=torch.randint(-128, 128, (5, 7), dtype=torch.int8, generator=g))

    def check(self, steps, backend, capsys):
        ns = steps[0].ns
        linear, x, a_q, b_q = ns["linear"], ns["x"], ns["a_q"], ns["b_q"]
        N, K = linear.weight.shape

        made = step(steps, "# int8 [N, K], float32 [N]: per output channel").ns
        qw, w_scale = made["qw"], made["w_scale"]
        assert qw.dtype == torch.int8 and qw.shape == (N, K)
        assert w_scale.dtype == torch.float32 and w_scale.shape == (N,)
        expected_q, expected_scale = per_token_int8(linear.weight.detach())  # one rule for weights and tokens
        assert torch.equal(qw, expected_q) and torch.equal(w_scale, expected_scale)

        xq_rule, xs_rule = per_token_int8(x)
        acc = xq_rule.reshape(-1, K).long() @ qw.long().t()
        y = step(steps, "# W8A8: x quantized per token on the fly").ns["y"]
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
        assert_dequantized_from(y.reshape(-1, N), acc, xs_rule.reshape(-1), w_scale, linear.bias, what="int8_linear")

        y = step(steps, "# W8A16: int8 weight, 16-bit activations").ns["y"]
        assert y.dtype == x.dtype
        assert_linear_matches_float64(y, x, dequantized_int8(qw, w_scale), dequantized_int8(qw, w_scale, x.dtype),
                                      linear.bias, what="int8_weight_only_linear")

        made = step(steps, "# int8 [..., K], float32 [...]").ns
        xq, x_scale = made["xq"], made["x_scale"]
        assert xq.dtype == torch.int8 and xq.shape == x.shape
        assert x_scale.dtype == torch.float32 and x_scale.shape == x.shape[:-1]
        assert torch.equal(xq, xq_rule) and torch.equal(x_scale, xs_rule)
        assert x_scale[1, 2] == 0 and (xq[1, 2] == 0).all()  # the zero row

        y = step(steps, "out_dtype=torch.bfloat16)").ns["y"]
        assert y.dtype == torch.bfloat16 and y.shape == (*x.shape[:-1], N)
        assert_dequantized_from(y.reshape(-1, N), acc, x_scale.reshape(-1), w_scale, what="int8_matmul")

        acc = step(steps, "# int32 a_q @ b_q.T, exact, any M, N, K").ns["acc"]
        assert acc.dtype == torch.int32
        assert torch.equal(acc.long(), a_q.long() @ b_q.long().t())

        layer = step(steps, '# or "w8a16"; state_dict round-trips').ns["layer"]
        assert layer.mode == "w8a8" and layer.bias is linear.bias
        with ek.use_backend(backend):
            assert_state_dict_round_trips(layer, ek.nn.Int8Linear(K, N, mode="w8a8", dtype=x.dtype), x)
            w8a16 = ek.nn.Int8Linear.from_linear(linear, mode="w8a16")
            assert_state_dict_round_trips(w8a16, ek.nn.Int8Linear(K, N, mode="w8a16", dtype=x.dtype), x)


class Int4(Example):
    heading = "INT4 weight-only matmul (W4A16)"
    # The block's last two lines take a GPTQ and an AWQ checkpoint's tensors (gptq_qweight, ...,
    # awq_scales): test_int4's synthetic checkpoints, bound just before each line runs.
    checkpoints = {}

    def _gptq(self, ns):
        (qweight, qzeros, scales, _), self.checkpoints["gptq"] = gptq_checkpoint(16, 64, 32, act_order=False)
        ns.update(gptq_qweight=qweight, gptq_qzeros=qzeros, gptq_scales=scales)

    def _awq(self, ns):
        (qweight, qzeros, scales), self.checkpoints["awq"] = awq_checkpoint(16, 64, 32)
        ns.update(awq_qweight=qweight, awq_qzeros=qzeros, awq_scales=scales)

    @property
    def before(self):
        return {"Int4Linear.from_gptq(": self._gptq, "Int4Linear.from_awq(": self._awq}

    def setup(self, backend):
        dtype = float_dtype(backend)
        return dict(linear=lin(128, 16, dtype), x=torch.randn(2, 3, 128).to(dtype))  # K = 128: one group of 128

    def check(self, steps, backend, capsys):
        ns = steps[0].ns
        linear, x = ns["linear"], ns["x"]
        N, K = linear.weight.shape
        G = 128

        made = step(steps, "qw, scales, zeros = ek.quantize_int4(linear.weight, group_size=128").ns
        qw, scales, zeros = made["qw"], made["scales"], made["zeros"]
        assert qw.dtype == torch.int32 and qw.shape == (N, K // 8)
        for t in (scales, zeros):
            assert t.dtype == linear.weight.dtype and t.shape == (N, K // G)
        assert ((zeros >= 0) & (zeros <= 15) & (zeros == zeros.round())).all()
        # every weight within half a step of its level, up to the rounding of w / scale (a float32
        # quotient below 16: off by at most half an ulp of 16, 4 eps of a step)
        levels = ek.dequantize_int4(qw, scales, zeros, G, torch.float64)
        step_size = scales.double().repeat_interleave(G, 1)
        slack = 0.5 + 4 * torch.finfo(torch.float32).eps
        assert ((linear.weight.double() - levels).abs() <= step_size * slack).all()

        y = step(steps, "ek.int4_linear(x, qw, scales, zeros, group_size=128").ns["y"]
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
        assert_linear_matches_float64(y, x, levels, levels.to(x.dtype), linear.bias, what="int4_linear")

        w = step(steps, "# [N, K] in the scales' dtype").ns["w"]
        assert w.shape == (N, K) and w.dtype == scales.dtype
        q = ek.unpack_int4(qw).float()
        assert torch.equal(w, ((q - zeros.float().repeat_interleave(G, 1))
                               * scales.float().repeat_interleave(G, 1)).to(w.dtype))

        layer = step(steps, "Int4Linear.from_linear(linear, group_size=128)").ns["layer"]
        assert layer.group_size == G and layer.bias is linear.bias
        with ek.use_backend(backend):
            assert_state_dict_round_trips(layer, ek.nn.Int4Linear(K, N, group_size=G, dtype=x.dtype), x)

        for fmt, text in (("gptq", "from_gptq(gptq_qweight, gptq_qzeros, gptq_scales, g_idx=None, bias=None)"),
                          ("awq", "from_awq(awq_qweight, awq_qzeros, awq_scales, bias=None)")):
            layer = step(steps, text).ns["layer"]
            assert layer.group_size == 32 and layer.perm is None and layer.bias is None
            assert torch.equal(layer.dequantized_weight(torch.float64), self.checkpoints[fmt]), fmt  # exact


def assert_in_compressed_format(w, values, meta):
    """values and meta are w in the README's format: group g of row n keeps positions i0 < i1, its
    nonzeros completed with its lowest free positions (-0.0 counting as zero); values[n, 2g] =
    w[n, 4g + i0], values[n, 2g + 1] = w[n, 4g + i1]; meta[n, g // 2] holds code i0 | i1 << 2,
    group 2b in bits 3..0 and 2b + 1 in bits 7..4 (and 0 past the last group, effkern/sparse24.py)."""
    N, K = w.shape
    for n in range(N):
        for g in range(K // 4):
            group = w[n, 4 * g:4 * g + 4]
            nonzero = [i for i in range(4) if group[i] != 0]
            i0, i1 = sorted(nonzero + [i for i in range(4) if i not in nonzero][:2 - len(nonzero)])
            code = int(meta[n, g // 2]) >> (4 * (g % 2)) & 0xF
            assert code == i0 | i1 << 2, (n, g, bin(code), i0, i1)
            kept = torch.stack((group[i0], group[i1]))
            got = values[n, 2 * g:2 * g + 2]
            assert torch.equal(got, kept) and torch.equal(got.signbit(), kept.signbit()), (n, g)
        if K // 4 % 2:
            assert int(meta[n, -1]) >> 4 == 0


class Sparse24(Example):
    heading = "2:4 semi-structured sparse matmul"

    def setup(self, backend):
        # K = 20: 5 groups of 4, so meta's ceil(K / 8) = 3 bytes has a half-used last one
        dtype = float_dtype(backend)
        linear = lin(20, 12, dtype)
        with torch.no_grad():  # groups the prose speaks of: equal magnitudes, zeros, -0.0
            linear.weight[0, 0:4] = torch.tensor([0.5, -0.5, 0.5, 0.25])  # ties: positions 0 and 1 kept
            linear.weight[1, 4:8] = torch.tensor([0.0, -0.0, 0.75, 0.0])  # one nonzero: kept with position 0
            linear.weight[2, 8:12] = torch.tensor([-0.0, 0.0, 0.0, 0.25])  # -0.0 counts as zero
        return dict(linear=linear, x=strided(2, 3, 20, dtype=dtype), bias=torch.randn(12).to(dtype))

    def check(self, steps, backend, capsys):
        ns = steps[0].ns
        linear, x, bias = ns["linear"], ns["x"], ns["bias"]
        N, K = linear.weight.shape
        dense = linear.weight.detach()

        w = step(steps, "# zero the 2 smallest |w| of every 4 along K").ns["w"]
        groups = dense.view(N, K // 4, 4)
        # the two largest |w| of each group; between equal magnitudes the lower positions
        kept = torch.argsort(-groups.abs(), dim=-1, stable=True)[..., :2]
        expected = torch.zeros_like(groups).scatter(-1, kept, groups.gather(-1, kept)).view(N, K)
        assert torch.equal(w, expected) and torch.equal(w.signbit(), expected.signbit())

        made = step(steps, "# values [N, K/2]; meta uint8 [N, ceil(K/8)]").ns
        values, meta = made["values"], made["meta"]
        assert values.shape == (N, K // 2) and values.dtype == w.dtype
        assert meta.shape == (N, math.ceil(K / 8)) and meta.dtype == torch.uint8
        assert_in_compressed_format(w, values, meta)

        assert torch.equal(step(steps, "# exact inverse").ns["w_back"], w)

        y = step(steps, "# == F.linear(x, w, bias)").ns["y"]
        assert_linear_matches_float64(y, x, w.double(), w, bias, what="sparse24_linear")

        layer = step(steps, "Sparse24Linear.from_linear(linear, prune=True)   # state_dict round-trips").ns["layer"]
        assert torch.equal(layer.dense_weight(), w) and layer.bias is linear.bias
        with ek.use_backend(backend):
            assert_state_dict_round_trips(layer, ek.nn.Sparse24Linear(K, N, dtype=x.dtype), x)

        made = step(steps, "# a pruned zero quantizes to 0").ns
        qweight, scale = made["qweight"], made["scale"]
        assert (qweight[w == 0] == 0).all()

        made = step(steps, "# values int8 [N, K/2]").ns
        values, meta = made["values"], made["meta"]
        assert values.dtype == torch.int8 and values.shape == (N, K // 2)
        assert_in_compressed_format(qweight, values, meta)
        assert torch.equal(ek.decompress_24(values, meta), qweight)

        y = step(steps, "# == ek.int8_linear(x, qweight, scale, bias)").ns["y"]
        with ek.use_backend(backend):
            assert torch.equal(y, ek.int8_linear(x, qweight, scale, bias))  # the same bits (CPU: no fma)

        layer = step(steps, "Sparse24Int8Linear.from_linear(linear, prune=True)").ns["layer"]
        assert torch.equal(layer.values, values) and torch.equal(layer.meta, meta)
        assert torch.equal(layer.weight_scale, scale) and layer.bias is linear.bias
        with torch.no_grad(), ek.use_backend(backend):
            assert torch.equal(layer(x), ek.sparse24_int8_linear(x, values, meta, scale, linear.bias))


class Swap(Example):
    heading = "Whole models: `ek.swap`"

    @staticmethod
    def model(dtype) -> torch.nn.Sequential:
        """The same small model each call: two Linears and a GELU, and a head named lm_head."""
        torch.manual_seed(2)
        layers = dict(fc1=lin(64, 128, dtype), act=torch.nn.GELU(), fc2=lin(128, 64, dtype), lm_head=lin(64, 32, dtype))
        return torch.nn.Sequential(collections.OrderedDict(layers))

    def setup(self, backend):
        self.dtype = float_dtype(backend)
        self.before = {"model = ek.swap(": lambda ns: ns.update(model=self.model(self.dtype))}  # each from the start
        return dict(x=strided(2, 3, 64, dtype=self.dtype))

    def check(self, steps, backend, capsys):
        x = steps[0].ns["x"]

        def same_as(made, *layers):
            """``made`` holds ``layers`` (the original model's, converted by hand), computing the same bits."""
            assert [type(m) for m in made] == [type(m) for m in layers]
            by_hand = torch.nn.Sequential(*layers)
            with torch.no_grad(), ek.use_backend(backend):
                assert torch.equal(made(x), by_hand(x))

        fused = step(steps, "# nn.Linear then nn.GELU in an nn.Sequential -> ek.nn.LinearGELU").ns["model"]
        plain = self.model(self.dtype)
        same_as(fused, ek.nn.LinearGELU.from_linear(plain.fc1), torch.nn.Identity(), plain.fc2, plain.lm_head)
        assert list(fused.state_dict()) == list(plain.state_dict())

        converted = {"int8": step(steps, '# every nn.Linear -> Int8Linear (W8A8); "w8a16" for W8A16'),
                     "int4": step(steps, "# -> Int4Linear"),
                     "sparse24": step(steps, '# -> Sparse24Linear; "sparse24_int8"')}
        by_name = {"int8": (ek.nn.Int8Linear, dict(mode="w8a8")), "w8a16": (ek.nn.Int8Linear, dict(mode="w8a16")),
                   "int4": (ek.nn.Int4Linear, dict(group_size=64, symmetric=False)),
                   "sparse24": (ek.nn.Sparse24Linear, dict(prune=True)),
                   "sparse24_int8": (ek.nn.Sparse24Int8Linear, dict(prune=True))}
        for name, (cls, kwargs) in by_name.items():
            # the formats the comments name run too: w8a16 and sparse24_int8
            made = converted[name].ns["model"] if name in converted else ek.swap(self.model(self.dtype), name)
            plain = self.model(self.dtype)
            same_as(made, cls.from_linear(plain.fc1, **kwargs), plain.act, cls.from_linear(plain.fc2, **kwargs),
                    cls.from_linear(plain.lm_head, **kwargs))

        filtered = step(steps, 'filter_fn=lambda module, name: name != "lm_head")').ns["model"]
        plain = self.model(self.dtype)
        same_as(filtered, ek.nn.Int8Linear.from_linear(plain.fc1), plain.act, ek.nn.Int8Linear.from_linear(plain.fc2),
                plain.lm_head)


EXAMPLES = {example.heading: example for example in (API(), Attention(), Int8(), Int4(), Sparse24(), Swap())}
BLOCKS = readme_blocks()


def test_the_readme_has_its_examples():
    assert [heading for heading, _, _ in BLOCKS] == list(EXAMPLES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heading,first_line,source", BLOCKS, ids=[f"line{b[1]}" for b in BLOCKS])
def test_readme_example(heading, first_line, source, backend, capsys):
    needs_backend(backend)
    example: Optional[Example] = EXAMPLES.get(heading)
    assert example is not None, f"README.md:{first_line}: a python block under {heading!r} that no check here runs"
    ns = {"torch": torch, "ek": ek, **example.setup(backend)}  # the first block's import, for the others
    with ek.use_backend(backend):
        steps = run_block(source, first_line, ns, example.before)
    example.check(steps, backend, capsys)
    unchecked = [f"README.md:{s.line}: {s.text}" for s in steps if not s.checked]
    assert not unchecked, "README lines no check looks at:\n" + "\n".join(unchecked)
