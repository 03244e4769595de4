"""The cp.async rings of the CUDA GEMM kernels (csrc/cuda/int4.cu, csrc/cuda/sparse24.cu), on CPU.

The kernels' CPU models (test_int4_cuda.py, test_sparse24_cuda.py) run the pipeline's stages one
after the other; this checks what they cannot see: the order of the copies, commit groups, waits
and barriers around the ring of shared-memory slots, for every thread of a block and every slice
length (cuda_kernel_checks.pipeline_hazards: reads of a stage before its copy is complete and
visible, copies into a slot that a thread may still be reading, the epilogue's reuse of the ring's
memory while copies or reads may still touch it). The pipeline of each kernel is read from its
source (cuda_kernel_checks.pipeline_of_kernel) and must also be the one described here; the
negative controls show the check failing for deliberately wrong orders.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from cuda_kernel_checks import (CUDA_SOURCES, Pipeline, int4_stages, pipeline_hazards, pipeline_of_kernel,
                                pipeline_program, sparse24_tile_configs)

SLICE_LENGTHS = range(1, 20)  # stages per split-K slice: every tail of a ring of 3 or 4 slots, 4+ rotations


def kernel_pipelines() -> dict:
    """name -> (the kernel's Pipeline as read from its source, its number of stages)."""
    int4 = (CUDA_SOURCES / "int4.cu").read_text()
    sparse = (CUDA_SOURCES / "sparse24.cu").read_text()
    out = {"int4": (pipeline_of_kernel(int4, "w4a16_kernel", int4_stages()), int4_stages())}
    for name, cfg in sparse24_tile_configs().items():
        out[f"sparse24 {name}"] = (pipeline_of_kernel(sparse, "sparse24_kernel", cfg[5], "kStages"), cfg[5])
    return out


def ring(stages: int, **changes) -> Pipeline:
    """The kernels' ring: stages - 1 stages ahead (the prologue copies stages 0 .. stages - 2, one
    commit group each), each iteration `it` waits until at most stages - 2 groups are pending
    (stage it has landed), syncs the block (every thread's copies of stage it visible; every warp
    done with stage it - 1), refills the slot of stage it - 1 with stage it + stages - 1 (a commit
    even when no stage is left), then reads stage it; the epilogue waits for every group and syncs
    before it reuses the memory. ``changes``: fields to change (the negative controls)."""
    p = Pipeline(stages=stages, prologue=stages - 1, wait=stages - 2, distance=stages - 1,
                 loop=("wait", "barrier", "refill", "read"), epilogue=("wait", "barrier"), epilogue_wait=0)
    return dataclasses.replace(p, **changes)


def hazards(p: Pipeline) -> dict:
    """slice length -> the races found (only lengths with some)."""
    return {n: h for n in SLICE_LENGTHS if (h := pipeline_hazards(pipeline_program(p, n)))}


def test_the_kernels_pipelines_are_the_ring_described_here():
    """A change to either kernel's prologue, wait count, barrier, refill or epilogue shows here."""
    found = kernel_pipelines()
    assert set(found) == {"int4", "sparse24 Decode8", "sparse24 Decode16", "sparse24 Medium", "sparse24 Large"}
    assert {name: stages for name, (_, stages) in found.items()} == {
        "int4": 4, "sparse24 Decode8": 4, "sparse24 Decode16": 4, "sparse24 Medium": 4, "sparse24 Large": 3}
    for name, (pipeline, stages) in found.items():
        assert pipeline == ring(stages), name


@pytest.mark.parametrize("name", ["int4", "sparse24 Decode8", "sparse24 Decode16", "sparse24 Medium",
                                  "sparse24 Large"])
def test_kernel_ring_has_no_race(name):
    pipeline, _ = kernel_pipelines()[name]
    assert hazards(pipeline) == {}


def test_program_of_the_ring():
    """The sequence the check walks, for 3 slots and a slice of 4 stages."""
    assert pipeline_program(ring(3), 4) == [
        ("copy", 0, 0), ("commit",), ("copy", 1, 1), ("commit",),
        ("wait", 1), ("barrier",), ("copy", 2, 2), ("commit",), ("read", 0, 0),
        ("wait", 1), ("barrier",), ("copy", 3, 0), ("commit",), ("read", 1, 1),
        ("wait", 1), ("barrier",), ("commit",), ("read", 2, 2),
        ("wait", 1), ("barrier",), ("commit",), ("read", 3, 0),
        ("wait", 0), ("barrier",), ("reuse",)]


# Negative controls: (what is wrong, the Pipeline changes, a phrase of the race it must report).
WRONG_RINGS = {
    "wait_group one too large": (lambda s: dict(wait=s - 1), "before its copy"),
    "wait after the barrier": (lambda s: dict(loop=("barrier", "wait", "refill", "read")), "before its copy"),
    "refill before the barrier": (lambda s: dict(loop=("wait", "refill", "barrier", "read")), "still reading it"),
    # a ring of `stages` stages ahead, refilling the slot just read, with no barrier after the read
    "refill of the slot just read, no barrier": (
        lambda s: dict(prologue=s, distance=s, wait=s - 1, loop=("wait", "barrier", "read", "refill")),
        "still reading it"),
    "refill into the slot about to be read": (lambda s: dict(distance=s), "whose last copy is stage"),
    "no empty commit groups": (lambda s: dict(empty_commits=False), "before its copy"),
    "no epilogue barrier": (lambda s: dict(epilogue=("wait",)), "epilogue reuses slot"),
    # the loop's last wait_group already completes the last copy (see below): the epilogue's wait is
    # needed where copies past the slice are issued
    "no epilogue wait, copies past the slice": (lambda s: dict(epilogue=("barrier",), guarded=False),
                                                "may still be in flight"),
    "epilogue wait_group 1, copies past the slice": (lambda s: dict(epilogue_wait=1, guarded=False),
                                                     "may still be in flight"),
}


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("case", list(WRONG_RINGS))
def test_check_finds_the_race_of_a_wrong_ring(case, stages):
    changes, phrase = WRONG_RINGS[case]
    found = hazards(ring(stages, **changes(stages)))
    assert found, f"{case}: no race found"
    assert any(phrase in h for races in found.values() for h in races), (case, found)


# Positive controls: orders that are race-free (the check does not reject every change).
RIGHT_RINGS = {
    "smaller wait_group counts": lambda s: [dict(wait=w) for w in range(s - 2)],
    "refill of the slot just read after a second barrier": lambda s: [
        dict(prologue=s, distance=s, wait=s - 1, loop=("wait", "barrier", "read", "barrier", "refill"))],
    "copies past the slice, with the epilogue wait": lambda s: [dict(guarded=False)],
    # stage n - 1 is group n - 1 (one group per stage, empty ones too), and the last iteration's
    # wait_group<stages - 2> leaves only the stages - 2 newer, empty, groups pending: every copy has
    # landed before the epilogue, whose cp_async_wait<0> is a guard for changes to the loop
    "no epilogue wait (copies only within the slice)": lambda s: [dict(epilogue=("barrier",))],
}


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("case", list(RIGHT_RINGS))
def test_check_accepts_a_race_free_ring(case, stages):
    for changes in RIGHT_RINGS[case](stages):
        assert hazards(ring(stages, **changes)) == {}, (case, changes)


# The same controls on the kernels' sources: each edit must apply once, and the pipeline read from
# the edited source must have a race (or the reader must refuse the form).
def _once(pattern, repl):
    def edit(src):
        out, n = re.subn(pattern, repl, src, flags=re.S)
        assert n == 1, f"{pattern!r} matched {n} times"
        return out
    return edit


SOURCE_EDITS = {
    "wait_group one too large": (_once(r"cp_async_wait<((?:Cfg::)?kStages) - 2>", r"cp_async_wait<\1 - 1>"),
                                 "before its copy"),
    "refill before the barrier": (
        _once(r"(cp_async_wait<[^>]+>\(\);)\s*__syncthreads\(\);[^\n]*\n(\s*\{\s*const int next = .*?"
              r"cp_async_commit\(\);\s*\})", r"\1\n\2\n    __syncthreads();"),
        "still reading it"),
    "no epilogue barrier": (_once(r"(cp_async_wait<0>\(\);)\s*__syncthreads\(\);", r"\1"), "epilogue reuses slot"),
    "a commit only with a copy": (
        _once(r"if \(next < n_stages\) (load_stage\([^;]*\);)\s*cp_async_commit\(\);",
              r"if (next < n_stages) { \1 cp_async_commit(); }"),
        None),  # a form pipeline_of_kernel does not know: it refuses it
}


@pytest.mark.parametrize("kernel, source, stages", [("w4a16_kernel", "int4.cu", 4),
                                                    ("sparse24_kernel", "sparse24.cu", 3),
                                                    ("sparse24_kernel", "sparse24.cu", 4)])
@pytest.mark.parametrize("case", list(SOURCE_EDITS))
def test_check_finds_the_race_of_an_edited_kernel(case, kernel, source, stages):
    edit, phrase = SOURCE_EDITS[case]
    src = edit((CUDA_SOURCES / source).read_text())
    if phrase is None:
        with pytest.raises(AssertionError, match="no refill"):
            pipeline_of_kernel(src, kernel, stages)
        return
    found = hazards(pipeline_of_kernel(src, kernel, stages))
    assert any(phrase in h for races in found.values() for h in races), (case, found)
