"""effkern.swap: put effkern's modules into a whole model, in place.

    model = ek.swap(model)                      # nn.Linear + nn.GELU in an nn.Sequential -> LinearGELU
    model = ek.swap(model, "int8")              # every nn.Linear -> Int8Linear (W8A8)
    model = ek.swap(model, "int4", group_size=64, filter_fn=lambda module, name: name != "lm_head")

Only modules whose behaviour effkern's replacement reproduces are touched: ``nn.Linear`` itself
(not a subclass such as nn.MultiheadAttention's ``out_proj``, whose owner reads its ``weight``
directly, nor a parametrized one; nor the Linears of an nn.TransformerEncoderLayer, which reads
their weights too) and ``nn.GELU``, each without hooks (a replacement would drop them).
Attention is not a module in most models: use ``ek.scaled_dot_product_attention`` where the
model calls ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

from .int4 import GROUP_SIZES
from .nn import Int4Linear, Int8Linear, LinearGELU, Sparse24Int8Linear, Sparse24Linear

# name: (module class, the from_linear arguments the name fixes, the ones swap's caller may set)
LINEAR_CONVERSIONS = {
    "int8": (Int8Linear, {"mode": "w8a8"}, ()),
    "w8a16": (Int8Linear, {"mode": "w8a16"}, ()),
    "int4": (Int4Linear, {}, ("group_size", "symmetric")),
    "sparse24": (Sparse24Linear, {}, ("prune",)),
    "sparse24_int8": (Sparse24Int8Linear, {}, ("prune",)),
}


# Modules whose forward reads their Linears' ``.weight`` itself: nn.TransformerEncoderLayer's
# inference fast path (and nn.TransformerEncoder's, through its first layer) passes linear1's and
# linear2's weights to a fused kernel. (nn.MultiheadAttention's out_proj is a subclass, left anyway.)
WEIGHT_READING_OWNERS = (nn.TransformerEncoderLayer,)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def swap(model: nn.Module, linear: str | None = None, *, fuse_gelu: bool = True,
         filter_fn: Callable[[nn.Module, str], bool] | None = None, **options) -> nn.Module:
    """Replace ``model``'s modules by effkern's, in place, and return the model.

    ``linear``: every ``nn.Linear`` becomes ``"int8"`` Int8Linear W8A8, ``"w8a16"`` Int8Linear
    W8A16, ``"int4"`` Int4Linear (``options``: ``group_size``, ``symmetric``), ``"sparse24"``
    Sparse24Linear or ``"sparse24_int8"`` Sparse24Int8Linear (``options``: ``prune``), through
    the class's ``from_linear``. A Linear that the format cannot take (its shape; with
    ``prune=False``, a weight that is not 2:4), that has hooks or whose owner reads its
    ``.weight`` (nn.TransformerEncoderLayer) stays an nn.Linear, and one warning names each with
    the reason.

    ``fuse_gelu``: then an ``nn.Linear`` followed directly by an ``nn.GELU`` in an
    ``nn.Sequential`` (or a subclass that keeps nn.Sequential's ``forward``) becomes one
    ``ek.nn.LinearGELU`` sharing the Linear's Parameters, with GELU's ``approximate``; the GELU's
    place holds an ``nn.Identity``, so indices and state_dict keys stay as they were. (Elsewhere
    the order of calls is in ``forward``'s code, which swap does not read.) An nn.LazyLinear is
    an nn.Linear only after its first forward: swap it after one.

    A converted Linear whose weight Parameter other modules hold too (an lm_head tied to the
    embedding) is converted all the same, and a second warning names it: its replacement holds
    its own copy, and the others keep the Parameter.

    ``filter_fn(module, name)``: only the Linears for which it returns True are replaced or
    fused (``name`` as in ``model.named_modules()``). A module reached by several paths is
    replaced by one module everywhere. When ``model`` itself is an nn.Linear, the returned
    module is its replacement: use the return value.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"effkern.swap: model must be an nn.Module, got {type(model).__name__}")
    if linear is not None and linear not in LINEAR_CONVERSIONS:
        raise ValueError(f"effkern.swap: linear must be None or one of {tuple(LINEAR_CONVERSIONS)}, got {linear!r}")
    cls, fixed, settable = LINEAR_CONVERSIONS[linear] if linear is not None else (None, {}, ())
    unknown = sorted(set(options) - set(settable))
    if unknown:
        raise ValueError(f"effkern.swap: linear={linear!r} takes the options {settable}, got {unknown}")
    # a bad value is the caller's mistake, not a layer's shape: raise it here, before the walk,
    # rather than leave every Linear with the same per-layer warning
    if "group_size" in options and options["group_size"] not in GROUP_SIZES:
        raise ValueError(f"effkern.swap: group_size must be one of {GROUP_SIZES}, got {options['group_size']!r}")
    decided: dict[int, bool] = {}  # id of a Linear -> filter_fn's answer, asked once per module
    replaced: dict[int, nn.Module] = {}  # id of an original Linear -> what stands in its place
    left: dict[str, str] = {}  # name of a Linear left as it was -> why
    visited: set[int] = set()
    # who holds each Parameter (tied weights: an lm_head sharing the embedding's): a converted
    # Linear's replacement holds its own copy of the weight, so a tie is dropped; say so. Ids, not
    # the modules: a reference here would keep every replaced float weight alive until the end
    holders: dict[int, list[tuple[str, int]]] = {}
    if cls is not None:
        for holder_name, holder in model.named_modules():
            for param_name, param in holder._parameters.items():
                if param is not None:
                    holders.setdefault(id(param), []).append((f"{holder_name}.{param_name}".lstrip("."), id(holder)))
    untied: dict[str, str] = {}  # name of a converted Linear -> the other holders of its weight

    def wanted(module: nn.Module, name: str) -> bool:
        if id(module) not in decided:
            decided[id(module)] = filter_fn is None or bool(filter_fn(module, name))
        return decided[id(module)]

    def convert(module: nn.Module, name: str, owner: nn.Module | None) -> nn.Module:
        if cls is None or type(module) is not nn.Linear or not wanted(module, name):
            return module
        if id(module) not in replaced:
            replaced[id(module)] = module
            if isinstance(owner, WEIGHT_READING_OWNERS):
                left[name] = f"its {type(owner).__name__} reads its .weight (the inference fast path)"
            elif _hooked(module):
                left[name] = "it has hooks"
            else:
                try:
                    replaced[id(module)] = cls.from_linear(module, **fixed, **options)
                except ValueError as error:
                    left[name] = str(error)
                else:
                    others = [other for other, holder in holders.get(id(module.weight), ()) if holder != id(module)]
                    if others:
                        untied[name] = ", ".join(others)
        return replaced[id(module)]

    def fuse(sequential: nn.Sequential, prefix: str) -> None:
        keys = list(sequential._modules)
        for key, next_key in zip(keys, keys[1:]):
            lin, act = sequential._modules[key], sequential._modules[next_key]
            if type(lin) is nn.Linear and type(act) is nn.GELU and wanted(lin, prefix + key):
                if _hooked(lin) or _hooked(act):
                    left[prefix + key] = "it or the GELU after it has hooks"
                    continue
                setattr(sequential, key, LinearGELU.from_linear(lin, approximate=act.approximate))
                setattr(sequential, next_key, nn.Identity())

    def visit(parent: nn.Module, prefix: str) -> None:
        visited.add(id(parent))
        # _modules, not named_children(): that lists a module held under two keys once. By key,
        # not over a list of the children: that would hold each replaced module until the end
        for key in list(parent._modules):
            child = parent._modules[key]
            if child is None:
                continue
            new = convert(child, prefix + key, parent)
            if new is not child:
                setattr(parent, key, new)
            elif id(child) not in visited:
                visit(child, prefix + key + ".")
        # only where nn.Sequential.forward runs: a subclass's own forward may read a Linear's
        # output (the stages' outputs, a residual around each module), which fusion would change
        if fuse_gelu and isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            fuse(parent, prefix)

    result = convert(model, "", None)
    if result is model:
        visit(model, "")
    if left:
        warnings.warn("effkern.swap: left these nn.Linear as they were: "
                      + "; ".join(f"{name or '(the model)'}: {why}" for name, why in left.items()), stacklevel=2)
    if untied:
        warnings.warn("effkern.swap: these nn.Linear shared their weight with other modules, which keep it; "
                      "each replacement holds its own converted copy, so the tie is gone (leave them out with "
                      "filter_fn to keep it): " + "; ".join(f"{name or '(the model)'}: tied to {others}"
                                                            for name, others in untied.items()), stacklevel=2)
    return result
