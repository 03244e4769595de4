"""ek.swap: effkern's modules put into whole models, in place."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effkern as ek
from effkern._swap import LINEAR_CONVERSIONS


class Block(nn.Module):
    """Linears in a Sequential, in attributes, in a ModuleList and in a ModuleDict, a subclass of
    nn.Linear inside nn.MultiheadAttention, and a GELU that forward calls after a Linear outside
    any Sequential (which swap cannot see and must leave alone)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width),
                                 nn.GELU(approximate="tanh"))
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.up = nn.Linear(width, width)
        self.act = nn.GELU()
        self.heads = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.named = nn.ModuleDict({"out": nn.Linear(width, 16, bias=False)})

    def forward(self, x):
        x = x + self.mlp(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.act(self.up(x))
        for head in self.heads:
            x = x + head(x)
        return self.named["out"](x)


def make_block(width: int = 32) -> Block:
    torch.manual_seed(0)
    return Block(width)


def test_fuses_linear_then_gelu_in_a_sequential_exactly():
    model = make_block()
    before = copy.deepcopy(model)
    params = dict(model.named_parameters())
    x = torch.randn(2, 5, 32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="effkern")  # nothing to report: no warning
        assert ek.swap(model) is model
    mlp = model.mlp
    assert [type(m) for m in mlp] == [ek.nn.LinearGELU, nn.Identity, ek.nn.LinearGELU, nn.Identity]
    assert [m.approximate for m in mlp[::2]] == ["none", "tanh"]
    # the Parameters are the same objects (an optimizer built before keeps working), the
    # state_dict keys the same, and the output equal bit for bit (on CPU both are F.gelu(F.linear))
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == before.state_dict().keys()
    assert torch.equal(model(x), before(x))
    # everything else stays: the GELU after self.up is called in forward, not in a Sequential
    assert type(model.up) is nn.Linear and type(model.act) is nn.GELU
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert all(type(m) is nn.Linear for m in [*model.heads, model.named["out"]])


def test_fuses_only_a_linear_directly_followed_by_a_gelu():
    seq = nn.Sequential(nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Dropout(0.0), nn.GELU(),
                        nn.Linear(8, 8))
    kinds = [type(m) for m in seq]
    ek.swap(seq)
    assert [type(m) for m in seq] == kinds


def test_fuses_in_a_sequential_subclass_only_with_sequentials_forward():
    """A subclass with its own forward may use a Linear's output itself: fusing would change it."""

    class Stages(nn.Sequential):  # every stage's output, as a feature extractor returns them
        def forward(self, x):
            outs = []
            for module in self:
                x = module(x)
                outs.append(x)
            return outs

    class Plain(nn.Sequential):  # nn.Sequential's forward: fused
        pass

    torch.manual_seed(0)
    stages, plain = Stages(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)), Plain(nn.Linear(8, 8), nn.GELU())
    x = torch.randn(2, 8)
    before = stages(x)
    ek.swap(nn.ModuleList([stages, plain]))
    assert [type(m) for m in stages] == [nn.Linear, nn.GELU, nn.Linear]
    assert all(torch.equal(a, b) for a, b in zip(stages(x), before, strict=True))
    assert [type(m) for m in plain] == [ek.nn.LinearGELU, nn.Identity]


def test_leaves_modules_with_hooks_and_says_so():
    seq = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU())
    seq[0].register_forward_hook(lambda module, args, out: out)
    seq[3].register_forward_pre_hook(lambda module, args: None)
    with pytest.warns(UserWarning, match=r"effkern.swap: .*0: it or the GELU after it has hooks; "
                                          r"2: it or the GELU after it has hooks"):
        ek.swap(seq)
    assert [type(m) for m in seq] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU]
    hooked = nn.Sequential(nn.Linear(8, 8))
    hooked[0].register_full_backward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"0: it has hooks"):
        ek.swap(hooked, "int8")
    assert type(hooked[0]) is nn.Linear


@pytest.mark.parametrize("linear", list(LINEAR_CONVERSIONS))
def test_converts_every_plain_linear_like_from_linear(linear):
    model, by_hand = make_block(), make_block()
    cls, fixed, _ = LINEAR_CONVERSIONS[linear]
    options = {"group_size": 32} if linear == "int4" else {}  # the block is 32 wide
    x = torch.randn(2, 5, 32)
    ek.swap(model, linear, **options)
    # by hand: every nn.Linear (not the attention's out_proj, a subclass) through from_linear
    for parent in [by_hand.mlp, by_hand, by_hand.heads, by_hand.named]:
        for key, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, key, cls.from_linear(child, **fixed, **options))
    assert [type(m) for m in model.modules()] == [type(m) for m in by_hand.modules()]
    assert sum(type(m) is cls for m in model.modules()) == 6
    if "mode" in fixed:
        assert {m.mode for m in model.modules() if type(m) is cls} == {fixed["mode"]}
    # the GELUs stay: a converted Linear is no longer an nn.Linear to fuse
    assert type(model.mlp[1]) is nn.GELU
    assert model.state_dict().keys() == by_hand.state_dict().keys()
    for (name, got), want in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert torch.equal(model(x), by_hand(x))


def test_leaves_the_linears_of_a_transformer_encoder_layer():
    """nn.TransformerEncoderLayer in eval mode reads linear1.weight and linear2.weight itself (its
    fast path): converted, they would raise AttributeError there."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match=r"layers.0.linear1: its TransformerEncoderLayer reads its .weight "
                                         r"\(the inference fast path\); layers.0.linear2: .*; layers.1.linear2: "):
        ek.swap(model, "int8")
    assert all(type(m) is nn.Linear for layer in model.layers for m in (layer.linear1, layer.linear2))
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_options_reach_from_linear():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    ek.swap(model, "int4", group_size=32, symmetric=True)
    assert [m.group_size for m in model] == [32, 32]
    assert all(torch.equal(m.zeros, torch.full_like(m.zeros, 8)) for m in model)
    pruned = nn.Linear(16, 8)
    weight = ek.prune_24(pruned.weight.detach())
    with torch.no_grad():
        pruned.weight.copy_(weight)
    dense = nn.Linear(16, 8)
    seq = nn.Sequential(pruned, dense)
    # prune=False takes a weight that is 2:4 already and leaves one that is not, saying why
    with pytest.warns(UserWarning, match=r"1: .*not 2:4 sparse: row \d+, group \d+"):
        ek.swap(seq, "sparse24", prune=False)
    assert type(seq[0]) is ek.nn.Sparse24Linear and seq[1] is dense
    assert torch.equal(seq[0].dense_weight(), weight)


def test_a_linear_the_format_cannot_take_stays_and_may_be_fused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 20), nn.GELU(), nn.Linear(20, 32), nn.Linear(32, 16))
    odd_n, odd_k = model[0], model[2]
    with pytest.warns(UserWarning) as caught:
        ek.swap(model, "int4", group_size=32)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("effkern.swap: left these nn.Linear as they were: 0: ")
    assert "N=20" in message.split("; 2: ")[0] and "K=20" in message.split("; 2: ")[1]
    assert type(model[0]) is ek.nn.LinearGELU and model[0].weight is odd_n.weight
    assert model[2] is odd_k
    assert type(model[3]) is ek.nn.Int4Linear and model[3].group_size == 32


def test_filter_fn_sees_each_module_with_its_name():
    model = make_block()
    seen = []

    def not_out(module, name):
        seen.append(name)
        return name != "named.out" and not name.startswith("mlp.")

    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    ek.swap(model, "w8a16", filter_fn=not_out)
    # once per Linear, in the order of model.named_modules(); the answer holds for the fusion too
    assert seen == linears == ["mlp.0", "mlp.2", "up", "heads.0", "heads.1", "named.out"]
    assert type(model.named["out"]) is nn.Linear and type(model.up) is ek.nn.Int8Linear
    # the Linears the filter kept out of the conversion are kept out of the fusion too
    assert [type(m) for m in model.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU]


def test_a_module_reached_twice_is_replaced_by_one_module():
    shared_linear, shared_seq = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.GELU())
    model = nn.ModuleDict({"a": shared_linear, "b": shared_linear, "c": shared_seq, "d": shared_seq})
    seen = []
    ek.swap(model, "int8", filter_fn=lambda module, name: seen.append(name) is None)
    assert seen == ["a", "c.0"]  # asked once per module, under its first name, as named_modules() lists it
    assert type(model["a"]) is ek.nn.Int8Linear and model["a"] is model["b"]
    assert model["c"] is model["d"] is shared_seq and type(shared_seq[0]) is ek.nn.Int8Linear
    hooked = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    hooked[1].register_forward_hook(lambda module, args, out: out)
    with pytest.warns(UserWarning) as caught:
        ek.swap(nn.ModuleList([hooked, hooked]))
    (message,) = [str(w.message) for w in caught]
    assert message.endswith("as they were: 0.0: it or the GELU after it has hooks")  # named once
    twice = nn.Sequential(shared_linear, nn.GELU(), shared_linear)
    ek.swap(twice, fuse_gelu=True)
    # the first place becomes a LinearGELU, the second keeps the plain Linear; both share weights
    assert type(twice[0]) is ek.nn.LinearGELU and twice[2] is shared_linear
    assert twice[0].weight is shared_linear.weight


def test_a_tied_weight_is_converted_and_said_to_be_untied():
    """An lm_head sharing its weight with the embedding: the replacement holds its own copy."""
    emb, head, other = nn.Embedding(32, 16), nn.Linear(16, 32, bias=False), nn.Linear(16, 32)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "also": head, "other": other})
    with pytest.warns(UserWarning, match=r"^effkern.swap: these nn.Linear shared their weight .*: head: tied to "
                                         r"emb.weight$") as caught:
        ek.swap(model, "sparse24")
    assert len(caught) == 1  # "also" is the same module, "other" ties nothing
    assert type(model["head"]) is ek.nn.Sparse24Linear and model["also"] is model["head"]
    assert model["emb"].weight is emb.weight
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="effkern")
        ek.swap(nn.ModuleDict({"emb": emb, "head": head}), "int8", filter_fn=lambda module, name: name != "head")


def test_a_linear_model_is_returned_converted():
    linear = nn.Linear(16, 8)
    layer = ek.swap(linear, "int8")
    assert type(layer) is ek.nn.Int8Linear and layer.bias is linear.bias
    assert type(linear) is nn.Linear  # nothing to replace it in: the caller takes the result
    assert ek.swap(linear) is linear


def test_swap_twice_changes_nothing_more():
    model = make_block()
    ek.swap(model, "int8")
    kinds = [type(m) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    ek.swap(model, "int8")
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fuse_gelu_false_fuses_nothing():
    seq = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    ek.swap(seq, fuse_gelu=False)
    assert [type(m) for m in seq] == [nn.Linear, nn.GELU]


def test_swapped_model_state_dict_loads_into_a_fresh_swapped_model():
    trained, fresh = make_block(), Block()
    for model in (trained, fresh):
        ek.swap(model, "int4", group_size=32)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.equal(fresh(x), trained(x))


def test_swapped_model_trains_and_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))
    ek.swap(model)
    ek.swap(model, "w8a16")  # the Linear the first call left: the LinearGELUs are not nn.Linear
    assert [type(m) for m in model] == [ek.nn.LinearGELU, nn.Identity, ek.nn.LinearGELU, nn.Identity, ek.nn.Int8Linear]
    x = torch.randn(6, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(x).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    expected = model(x).square().mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, [p.grad for p in model.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ek.swap(torch.randn(2, 2)), TypeError, "model must be an nn.Module, got Tensor"),
    (lambda: ek.swap(nn.Linear(8, 8), "fp8"), ValueError, r"linear must be None or one of \('int8', "),
    (lambda: ek.swap(nn.Linear(8, 8), group_size=32), ValueError,
     r"linear=None takes the options \(\), got \['group_size'\]"),
    (lambda: ek.swap(nn.Linear(8, 8), "int8", prune=True), ValueError, r"takes the options \(\), got \['prune'\]"),
    (lambda: ek.swap(nn.Linear(8, 8), "int4", groupsize=32), ValueError,
     r"'int4' takes the options \('group_size', 'symmetric'\), got \['groupsize'\]"),
    (lambda: ek.swap(nn.Linear(128, 128), "int4", group_size=100), ValueError,
     r"group_size must be one of \(32, 64, 128, 256, -1\), got 100"),
], ids=["not-a-module", "unknown-format", "options-without-format", "option-of-another-format", "misspelt-option",
        "bad-group-size"])
def test_bad_calls_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("linear", [None, *LINEAR_CONVERSIONS])
def test_gpu_swapped_model_matches_its_reference_backend(linear):
    """The swapped modules on a GPU (auto backend: the kernels) against the same modules on the
    reference backend, in bf16: what swap built runs there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().bfloat16()
    ek.swap(model, linear)
    x = torch.randn(3, 7, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
        with ek.use_backend("reference"):
            want = model(x)
    assert got.dtype == torch.bfloat16 and got.isfinite().all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())


def test_a_replaced_weight_is_freed_during_the_walk():
    """swap keeps no reference to what it replaced: converting a large model in place needs room
    for one layer's float weight at a time, not for the whole float model next to the new one."""
    import weakref

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    first = weakref.ref(model[0].weight)
    freed_before_the_second = []

    def filter_fn(module, name):
        if name == "1":
            freed_before_the_second.append(first() is None)
        return True

    ek.swap(model, "int8", filter_fn=filter_fn)
    assert freed_before_the_second == [True]
