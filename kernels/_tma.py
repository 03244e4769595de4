"""What effkern's persistent TMA GEMMs share (Hopper): when a call may use one, the K loop, and
the launch.

A persistent TMA GEMM computes C[m, n] = epilogue(sum_k A[m, k] * B[n, k]) for A [M, K] and
B [N, K] (a weight in nn.Linear layout), both K-contiguous:
- tiles move by TMA tensor descriptors (bulk copies into shared memory, completed on barriers;
  no per-element address arithmetic and no masks: the copy engine zero-fills reads past the
  edges and clips writes), output tiles are written by descriptor stores too;
- one program per SM walks the output tiles in grouped order, its (tile, k) iterations one
  flattened software pipeline, so the next tile's first loads are in flight during this
  tile's epilogue.
Each kernel writes that loop itself, around its own epilogue:

    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS,
                         flatten=True):
        acc = tma_tile_dot(a_desc, b_desc, tile, M, N, K, acc0, ...)
        tile_out += NUM_PROGRAMS
        row, col = tile_origin(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        ... epilogue on the tile at (row, col), descriptor stores

The epilogue finds its tile from a counter of its own rather than from the loads' tile index,
as Triton's own persistent-matmul tutorial does: the flattened pipeline issues the loads a tile
ahead, and a value shared by both ends is what that tutorial keeps apart.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import fixed_config, grouped_tile, interpreted, launch, sm_count, switch_on, tiles


def tma_on() -> bool:
    """EFFKERN_TRITON_TMA (default on): kernels that have a TMA variant may use it. Off runs the
    plain-load kernels everywhere."""
    return switch_on("EFFKERN_TRITON_TMA")


@functools.lru_cache(maxsize=16)
def _device_has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether a kernel may move these 2-D tensors through TMA tensor descriptors: non-empty,
    unit last stride, 16-byte aligned base and row stride (what cuTensorMapEncodeTiled requires),
    rows that do not overlap; on a GPU with TMA (sm_90+) or under the interpreter."""
    if not tma_on():
        return False
    for t in tensors:
        (rows, cols), (row_stride, col_stride) = t.shape, t.stride()
        if (rows * cols == 0 or col_stride != 1 or row_stride < cols
                or (row_stride * t.element_size()) % 16 or t.data_ptr() % 16):
            return False
    device = tensors[0].device
    return interpreted() or (device.type == "cuda" and _device_has_tma(device))


@triton.jit
def tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # the first row and column of output tile number ``tile`` in grouped order
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def tma_tile_dot(a_desc, b_desc, tile, M, N, K, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # acc + the output tile number ``tile`` of A @ B^T (A [M, K], B [N, K]), in acc's dtype (int32
    # for int8 operands; Triton 3.6 wants it named when it is not float32)
    off_m, off_n = tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    for k in range(tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        b = b_desc.load([off_n, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc


def block_shapes_hook(tiles: dict[str, tuple[str, str]]):
    """An autotuning pre-hook giving each descriptor argument (name -> the config's row and
    column block names) its config's tile shape: a copy's box size is part of the descriptor.
    An argument that is not a descriptor (a kernel launched without TMA) is left as it is."""
    def set_block_shapes(nargs: dict) -> None:
        for name, (rows, cols) in tiles.items():
            if isinstance(nargs[name], TensorDescriptor):
                nargs[name].block_shape = [nargs[rows], nargs[cols]]

    return set_block_shapes


def descriptors(tensors: dict[str, torch.Tensor], set_block_shapes, setting: dict) -> dict[str, TensorDescriptor]:
    """TMA descriptors of ``tensors`` (argument name -> 2-D tensor), with the tile shapes
    ``set_block_shapes`` (a block_shapes_hook) gives them for the config ``setting``; an autotuned
    launch resets them per config (the same hook as pre-hook). One descriptor per argument even
    where two arguments are one tensor (linear_gelu(w, w), a gradient that is the input): a
    descriptor's tile shape is per argument."""
    descs = {name: TensorDescriptor.from_tensor(t, [1, 1]) for name, t in tensors.items()}
    set_block_shapes({**descs, **setting})
    return descs


def launch_persistent(tuned, plain, tensors: dict[str, torch.Tensor], args: tuple, M: int, N: int, kwargs: dict,
                      fixed: dict, set_block_shapes, tile_blocks: tuple[str, str] = ("BLOCK_M", "BLOCK_N")) -> None:
    """Launch a persistent TMA GEMM: ``tensors`` (descriptor argument name -> 2-D tensor) become
    descriptors (at the fixed config's tiles; ``set_block_shapes`` is the autotuner's pre-hook),
    passed first in that order, then ``args``, then NUM_PROGRAMS: one program per SM, or per
    output tile if fewer. The output is M x N in tiles of ``tile_blocks`` (the config's names)."""
    descs = descriptors(tensors, set_block_shapes, fixed_config(fixed))
    device = next(iter(tensors.values())).device
    programs = sm_count(device)
    grid = persistent_grid(programs, M, N, *tile_blocks)
    launch(tuned, plain, grid, (*descs.values(), *args, programs), kwargs, fixed, device=device)


def persistent_grid(programs: int, M: int, N: int, rows_block: str, cols_block: str):
    """grid(meta) of a persistent GEMM: ``programs`` programs (the SM count, the kernels' tile
    stride NUM_PROGRAMS), or one per output tile where there are fewer tiles, each block size
    taken from the config by its own name."""
    output_tiles = tiles(M, N, rows_block, cols_block)
    return lambda meta: (min(programs, output_tiles(meta)[0]),)
