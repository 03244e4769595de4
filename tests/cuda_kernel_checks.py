"""What the tests of effkern's CUDA GEMM kernels share (test_int4_cuda.py, test_sparse24_cuda.py).

Bit-exact comparisons of 16-bit tensors; the C++ op's argument checks, run on CPU tensors through
its CPU registration (it validates, then raises "no CPU kernel"); the GPU result against a
float64 reference of the same rounded operands; the check of the kernels' cp.async rings
(test_cuda_pipelines.py) and the readers of their sources it needs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from effkern import _ext

from op_checks import assert_linear_matches_float64, needs_backend

DTYPES = (torch.float16, torch.bfloat16)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in DTYPES else t


def assert_bit_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{what} differs"


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    out = buf[1:1 + t.numel()].view_as(t)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------- the C++ op (CPU side)

def op_schema(op: str) -> str:
    if not _ext.available():
        pytest.skip(f"effkern._C is not built: {_ext.load_error()}")
    return str(getattr(torch.ops.effkern_C, op).default._schema)


def needs_cuda_extension(op: str):
    if not _ext.available():
        pytest.skip(f"effkern._C is not built: {_ext.load_error()}")
    if not _ext.built_with_cuda():
        pytest.skip(f"effkern._C was built without CUDA: effkern_C::{op} has no kernels (CPU-only build)")


def assert_op_raises(op: str, kwargs: dict, match: str):
    """effkern_C::<op>(**kwargs) raises a RuntimeError matching ``match``: on CPU tensors either an
    argument check's error or, past the checks, "no CPU kernel"."""
    needs_cuda_extension(op)
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.effkern_C, op)(**kwargs)


def cpp_checks_accept(op: str, *args) -> bool:
    """Whether the op's C++ checks take these CPU arguments (True: it got as far as "no CPU
    kernel"; False: the shape rule "the CUDA kernel needs ..." rejected them)."""
    needs_cuda_extension(op)
    try:
        getattr(torch.ops.effkern_C, op)(*args)
    except RuntimeError as exc:
        accepted = "no CPU kernel" in str(exc)
        assert accepted or "the CUDA kernel needs" in str(exc), str(exc)
        return accepted
    raise AssertionError(f"effkern_C::{op} returned on CPU tensors")


# ---------------------------------------------------------------------------- the kernel (GPU)

def needs_cuda_kernels():
    """Skip a GPU test that calls an effkern_C op directly unless effkern._C is built with CUDA
    kernels for this GPU: the build is optional (bench/gpu_check.sh installs effkern without _C
    when it fails, so that the Triton tests still run), and the ops do not exist without it."""
    needs_backend("cuda", "cuda")


def random_input_and_bias(M, N, K, dtype, with_bias, seed):
    """x [M, K] and bias [N] (or None) on the GPU, standard normal rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda() if with_bias else None
    return x, bias


def assert_kernel_matches_float64(out, x, w, bias, what):
    """out, a kernel's x @ w^T (+ bias) for a 2-D x, is [M, N] in x's dtype and matches the float64
    product of the same operands (op_checks.assert_linear_matches_float64)."""
    assert out.dtype == x.dtype and tuple(out.shape) == (x.shape[0], w.shape[0])
    assert_linear_matches_float64(out, x, w.double(), w, bias, what)


def assert_rejects_tensors_on_another_device(op: str, kwargs: dict, weight: str):
    """kwargs on CPU with input moved to the GPU: the CUDA kernel's checks name ``weight``."""
    needs_cuda_kernels()
    kwargs = dict(kwargs, input=kwargs["input"].cuda())
    with pytest.raises(RuntimeError, match=re.escape(f"{weight} is on cpu but input is on cuda")):
        getattr(torch.ops.effkern_C, op)(**kwargs)


# ---------------------------------------------------------------------------- the cp.async ring (CPU)
#
# Both kernels (csrc/cuda/int4.cu, csrc/cuda/sparse24.cu) stream their K range through a ring of
# `stages` shared-memory slots: a prologue copies the first stages, one commit group each, and
# every iteration waits (cp.async.wait_group), syncs the block, refills a slot and reads a stage;
# the epilogue then reuses the ring's memory. The CPU models of the kernels run stages one by one
# and cannot see the ring's races; `pipeline_hazards` checks its order of operations instead, for
# every thread of the block at once (all run the same sequence: the loop bounds are block-uniform).
#
# PTX ISA, "Data Movement and Conversion Instructions": cp.async, cp.async.commit_group,
# cp.async.wait_group / cp.async.wait_all:
# each cp.async is asynchronous and may write its destination at any time between its issue and
# the completion of its group; cp.async.commit_group closes the executing thread's pending copies
# into a group; cp.async.wait_group N returns once at most the N most recent of the thread's
# groups are pending (all older ones complete), and the copies' writes are then visible to the
# executing thread only: other threads see them after a barrier (bar.sync / __syncthreads) that
# the thread reaches after its wait. So, with positions in the common sequence of operations:
#   a read of stage k from its slot needs the copy of stage k to be the last one into that slot
#     issued before the read, its group completed by a wait before a barrier before the read;
#   a copy into a slot needs a barrier between every earlier read of the slot and the copy (other
#     threads may still be reading the old stage) and, for every earlier copy into the slot, that
#     copy's group completed and a barrier since (else the older copy may land last);
#   the epilogue's reuse of the memory (taken to cover every slot) needs the same of every copy
#     and every read before it.
# Groups complete as late as these rules allow (a group is complete only where a wait forces it)
# and copies land as early as they allow (at their issue).

CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"

LOOP_OPS = ("wait", "barrier", "refill", "read")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The ring's order of operations. Stage k lives in slot k % stages.

    prologue: stages copied before the loop (stage s, then a commit, for s < prologue);
    wait: the loop's cp.async.wait_group count; distance: iteration `it` refills with stage
    it + distance; loop: the order of the iteration's operations ("wait", "barrier", "refill" =
    the copy of the next stage, if any, then a commit, "read" = the mma's reads of stage it);
    epilogue: the operations between the loop and the reuse of the memory ("wait" =
    wait_group epilogue_wait, "barrier"); empty_commits: a commit also where no stage is left to
    copy; guarded: no copy of stages past the slice (False: copies of them too, as a kernel with
    predicated-off copies would issue)."""

    stages: int
    prologue: int
    wait: int
    distance: int
    loop: tuple = LOOP_OPS
    epilogue: tuple = ("wait", "barrier")
    epilogue_wait: int = 0
    empty_commits: bool = True
    guarded: bool = True


def pipeline_program(p: Pipeline, n_stages: int) -> list:
    """The sequence of operations every thread of a block runs for a slice of n_stages stages:
    ("copy", stage, slot), ("commit",), ("wait", N), ("barrier",), ("read", stage, slot), ("reuse",)."""
    ops = []

    def copy(stage):
        copied = stage < n_stages or not p.guarded
        if copied:
            ops.append(("copy", stage, stage % p.stages))
        if copied or p.empty_commits:
            ops.append(("commit",))

    for s in range(p.prologue):
        copy(s)
    for it in range(n_stages):
        for op in p.loop:
            if op == "wait":
                ops.append(("wait", p.wait))
            elif op == "barrier":
                ops.append(("barrier",))
            elif op == "refill":
                copy(it + p.distance)
            elif op == "read":
                ops.append(("read", it, it % p.stages))
            else:
                raise ValueError(op)
    for op in p.epilogue:
        ops.append(("wait", p.epilogue_wait) if op == "wait" else ("barrier",))
    ops.append(("reuse",))
    return ops


def pipeline_hazards(ops: list) -> list[str]:
    """The races of a program (pipeline_program) by the rules above: [] when there are none."""
    barriers = [i for i, op in enumerate(ops) if op[0] == "barrier"]
    groups = []          # group -> its copies' positions
    pending = []         # copies not yet committed
    done_at = {}         # group -> position of the first wait that completes it
    group_of = {}        # copy position -> group
    copies = {}          # slot -> positions of the copies into it
    reads = {}           # slot -> positions of the reads of it
    found = []

    def barrier_between(a, b):
        return any(a < x < b for x in barriers)

    def published(copy_pos, at):  # the copy's group completed by a wait, then a barrier, before `at`
        g = group_of.get(copy_pos)
        return g is not None and g in done_at and barrier_between(done_at[g], at)

    for i, op in enumerate(ops):
        kind = op[0]
        if kind == "copy":
            _, stage, slot = op
            for r in reads.get(slot, []):
                if not barrier_between(r, i):
                    found.append(f"op {i}: the copy of stage {stage} into slot {slot} may overwrite it while "
                                 f"the read at op {r} is still reading it (no barrier in between)")
            for c in copies.get(slot, []):
                if not published(c, i):
                    found.append(f"op {i}: the copy of stage {stage} into slot {slot} while the copy at op {c} "
                                 f"into it may still be in flight")
            copies.setdefault(slot, []).append(i)
            pending.append(i)
        elif kind == "commit":
            for c in pending:
                group_of[c] = len(groups)
            groups.append(pending)
            pending = []
        elif kind == "wait":
            for g in range(len(groups) - op[1]):
                done_at.setdefault(g, i)
        elif kind == "read":
            _, stage, slot = op
            before = [c for c in copies.get(slot, []) if c < i]
            if not before or ops[before[-1]][1] != stage:
                found.append(f"op {i}: reads stage {stage} from slot {slot}, whose last copy is "
                             f"{'stage %d' % ops[before[-1]][1] if before else 'none'}")
            elif not published(before[-1], i):
                found.append(f"op {i}: reads stage {stage} from slot {slot} before its copy (op {before[-1]}) "
                             f"is complete and visible to every thread (wait_group, then a barrier)")
            reads.setdefault(slot, []).append(i)
        elif kind == "reuse":
            for slot in sorted(copies):
                for c in copies[slot]:
                    if not published(c, i):
                        found.append(f"op {i}: the epilogue reuses the memory while the copy at op {c} "
                                     f"(stage {ops[c][1]}, slot {slot}) may still be in flight")
            for slot in sorted(reads):
                for r in reads[slot]:
                    if not barrier_between(r, i):
                        found.append(f"op {i}: the epilogue reuses slot {slot} while the read at op {r} "
                                     f"may still be reading it (no barrier in between)")
        elif kind != "barrier":
            raise ValueError(op)
    return found


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _block_end(src: str, open_brace: int) -> int:
    """The position just past the brace that closes the one at src[open_brace]."""
    depth = 0
    for i in range(open_brace, len(src)):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return i + 1
    raise AssertionError("unbalanced braces")


def _value(expr: str, names: dict) -> int:
    expr = re.sub(r"\b\w+::", "", expr).strip()
    for name, v in names.items():
        expr = re.sub(rf"\b{name}\b", str(v), expr)
    assert re.fullmatch(r"[\d\s+\-*()]+", expr), f"cannot evaluate {expr!r}"
    return int(eval(expr))  # digits and + - * only


def pipeline_of_kernel(source: str, kernel: str, stages: int, stages_name: str = "kStages") -> Pipeline:
    """The Pipeline of __global__ function ``kernel`` in ``source`` (a .cu file's text), with
    ``stages_name`` = ``stages``. It reads the kernel's prologue (for (int s = 0; s < X; ++s) {
    if (s < n_stages) load_stage(stage_begin + s, s); cp_async_commit(); }), the order of
    cp_async_wait<N>(), __syncthreads(), the refill (next = it + D; if (next < n_stages)
    load_stage(stage_begin + next, next % S); cp_async_commit()) and the read (smem + (it % S) *
    ...) in `for (int it = 0; it < n_stages; ++it)`, and the waits and barriers between that loop
    and the first use of the memory as anything else (reinterpret_cast<...>(smem)); any other
    form fails an assertion, so that a change to the kernel's pipeline is seen here."""
    src = _strip_comments(source)
    head = re.search(rf"__global__[^;{{]*?\b{kernel}\s*\(", src)
    assert head, f"no __global__ {kernel} in the source"
    body_start = src.index("{", head.end())
    body = src[body_start:_block_end(src, body_start)]
    # every thread runs the whole sequence (the loop bound n_stages is block-uniform)
    assert not re.search(r"\breturn\b", body), f"{kernel} returns early: its threads would not all meet the barriers"
    names = {stages_name: stages}
    ws = r"\s*"

    pro = re.search(r"for \(int s = 0; s < ([^;]+); \+\+s\) \{" + ws +
                    r"if \(s < n_stages\) load_stage\(stage_begin \+ s, s\);" + ws +
                    r"cp_async_commit\(\);" + ws + r"\}", body)
    assert pro, "the prologue is not `for (s < X) { if (s < n_stages) load_stage(stage_begin + s, s); commit }`"
    prologue = _value(pro.group(1), names)
    assert prologue <= stages, "the prologue's slot s is s % stages only for s < stages"

    loop = re.search(r"for \(int it = 0; it < n_stages; \+\+it\) \{", body)
    assert loop and loop.start() > pro.end(), "no main loop `for (int it = 0; it < n_stages; ++it)` after the prologue"
    loop_end = _block_end(body, loop.end() - 1)
    loop_body = body[loop.end():loop_end - 1]
    events = []
    waits = list(re.finditer(r"cp_async_wait<([^>]+)>\(\);", loop_body))
    events += [(m.start(), "wait") for m in waits]
    events += [(m.start(), "barrier") for m in re.finditer(r"__syncthreads\(\);", loop_body)]
    refill = re.search(r"const int next = it \+ ([^;]+);" + ws +
                       r"if \(next < n_stages\) load_stage\(stage_begin \+ next, next % ([^)]+)\);" + ws +
                       r"cp_async_commit\(\);", loop_body)
    assert refill, "no refill `next = it + D; if (next < n_stages) load_stage(..., next % S); commit`"
    events.append((refill.start(), "refill"))
    read = list(re.finditer(r"smem \+ \(it % ([^)]+)\) \*", loop_body))
    assert len(read) == 1, "the stage read is not `smem + (it % S) * ...` once"
    events.append((read[0].start(), "read"))
    others = loop_body.replace(read[0].group(0), "")
    assert loop_body.count("load_stage") == 1 and loop_body.count("cp_async_commit") == 1 and \
        not re.search(r"\bsmem\b", others), "other copies, commits or shared-memory uses in the loop"
    assert len(waits) == 1, "one cp_async_wait in the loop"
    order = tuple(op for _, op in sorted(events))
    # the reads run from `st`'s definition to the end of the iteration: only the refill may follow
    assert set(order[order.index("read") + 1:]) <= {"refill"}, f"a wait or barrier after the reads start: {order}"
    assert _value(refill.group(2), names) == stages and _value(read[0].group(1), names) == stages

    rest = body[loop_end:]
    reuse = re.search(r"reinterpret_cast<[^>]+>\(smem\)", rest)
    assert reuse, "no reuse of the pipeline memory after the loop"
    tail = []
    epilogue_wait = 0
    for m in re.finditer(r"cp_async_wait<([^>]+)>\(\);|__syncthreads\(\);|load_stage|cp_async_commit|\bsmem\b",
                         rest[:reuse.start()]):
        assert m.group(0).startswith(("cp_async_wait", "__syncthreads")), f"{m.group(0)} before the reuse"
        if m.group(1) is not None:
            tail.append("wait")
            epilogue_wait = _value(m.group(1), names)
        else:
            tail.append("barrier")
    return Pipeline(stages=stages, prologue=prologue, wait=_value(waits[0].group(1), names),
                    distance=_value(refill.group(1), names), loop=order,
                    epilogue=tuple(tail), epilogue_wait=epilogue_wait)


def int4_stages() -> int:
    """kStages of csrc/cuda/int4.h (the W4A16 kernel's ring)."""
    m = re.findall(r"constexpr int kStages = (\d+);", (CUDA_SOURCES / "int4.h").read_text())
    assert len(m) == 1, "no single `constexpr int kStages = N;` in int4.h"
    return int(m[0])


def sparse24_tile_configs() -> dict:
    """The TileConfig instantiations of csrc/cuda/sparse24.cu: name (Decode8, ...) -> (warps N,
    warps M, warps K, MI, NI, stages, min blocks per SM, stream weights)."""
    found = re.findall(r"using (\w+) = TileConfig<T, (\d+), (\d+), (\d+), (\d+), (\d+), (\d+), (\d+), (true|false)>;",
                       _strip_comments((CUDA_SOURCES / "sparse24.cu").read_text()))
    assert found, "no `using Name = TileConfig<T, ...>;` in sparse24.cu"
    return {name: tuple(int(v) for v in rest[:-1]) + (rest[-1] == "true",) for name, *rest in found}
