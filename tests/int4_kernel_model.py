"""A thread-level model of the CUDA W4A16 kernel (csrc/cuda/int4.cu: make_plan, linear, w4a16_kernel
and splitk_reduce_kernel of csrc/cuda/device_common.cuh), for the CPU tests of test_int4_cuda.py.

The kernel has not run on a GPU yet. This model replays it on CPU tensors: every block of the grid
with its 256 threads (tensors over tid, warp, lane), the kernel's index arithmetic for every
cp.async, 16-byte shared load, ldmatrix and epilogue access, one shared-memory byte array per block,
the cp.async commit groups and wait_group counts, the ring of stage slots, the barriers, and the
ldmatrix / mma.m16n8k16 fragments by the PTX ISA rules below (written from the ISA, not taken from
effkern/int4_cuda_layout.py, whose shuffle they check). Where PTX leaves a choice, the model takes
the strict reading:

* shared memory starts as 0xFF bytes (NaN in float16 and bfloat16), the split-K workspace and the
  output as NaN, so a value nobody wrote shows in the result;
* a cp.async lands when the issuing thread's wait_group requires it, and other threads may read it
  after the next barrier. Reading bytes that no copy or store has made visible, or writing bytes
  that some thread reads between the same two barriers, raises (SharedMemory): on the GPU the
  copy could land at any time between its issue and that wait, so such a read is a race whose
  outcome depends on timing, which one replay's data need not show. Every read the check lets
  pass sees the same bytes however early or late the copies land;
* the mma multiplies exactly and rounds the sum once to fp32 (PTX leaves order and precision
  open): the tests use small integers and power-of-two scales, where every sum is exact, so the
  result must equal the float64 product bit for bit.
"""

from __future__ import annotations

import torch

# csrc/cuda/int4.h
TILE_N, TILE_K, WARPS, STAGES, TILE_M, MAX_M_TILES = 64, 16, 8, 4, 16, 4
THREADS = WARPS * 32
STAGE_K = TILE_K * WARPS                              # 128 k per pipeline stage
# csrc/cuda/int4.cu
N_SUB = TILE_N // 8                                   # n8-subtiles per block tile
TILE_BYTES = 32 * 16                                  # one shuffled k16 x n64 tile: 32 lanes x 16 B
STAGE_WEIGHT_BYTES = TILE_BYTES * WARPS
X_ROW_BYTES = STAGE_K * 2
MIN_GROUP = 32
GROUP_ROW_BYTES = TILE_N * 2
SCALE_BYTES = STAGE_K // MIN_GROUP * GROUP_ROW_BYTES  # up to 4 group rows per stage
RED_STRIDE = TILE_N + 8                               # floats per row of the reduction buffer
MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}  # Traits<T>::kMagic: BIAS = 1024.0 / 128.0
MAX_GRID_Y = 65535                                    # csrc/cuda/launch_common.h kMaxGridY


def stage_bytes(m_tiles: int) -> int:
    return STAGE_WEIGHT_BYTES + m_tiles * TILE_M * X_ROW_BYTES + 2 * SCALE_BYTES


def smem_bytes(m_tiles: int) -> int:
    return max(STAGES * stage_bytes(m_tiles), WARPS * TILE_M * RED_STRIDE * 4)


# ---------------------------------------------------------------------------- PTX ISA rules
#
# "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16 / .bf16 A and B, .f32 C and
# D): lane = 4 groupID + threadID_in_group (g, t below); element 2r of a 16-bit operand is the low
# half of its register r, element 2r + 1 the high half.

def mma_a_coords(lane, i):
    """(row, k) in the 16 x 16 A tile of a_i, i = 0..7: a0, a1 at row g, k 2t and 2t + 1; a2, a3 at
    row g + 8; a4..a7 as a0..a3 with k + 8."""
    g, t = lane >> 2, lane % 4
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def mma_b_coords(lane, i):
    """(k, column) in the 16 x 8 B tile of b_i, i = 0..3: b0, b1 at k 2t and 2t + 1; b2, b3 at
    k 2t + 8 and 2t + 9; column g."""
    g, t = lane >> 2, lane % 4
    return 2 * t + (i & 1) + 8 * (i >> 1), g


def mma_c_coords(lane, i):
    """(row, column) in the 16 x 8 C / D tile of c_i, i = 0..3 (one fp32 register each): c0, c1 at
    row g, columns 2t and 2t + 1; c2, c3 at row g + 8."""
    g, t = lane >> 2, lane % 4
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def fragment_to_tile(elements: torch.Tensor, coords, rows: int, cols: int) -> torch.Tensor:
    """The tiles [..., rows, cols] whose element coords(lane, i) is elements[..., lane, i] (a warp's
    32 lanes on dim -2); asserts that the rule puts the lanes' elements on the tile once each."""
    lane, i = torch.arange(32).view(32, 1), torch.arange(elements.shape[-1]).view(1, -1)
    row, col = torch.broadcast_tensors(*coords(lane, i))
    flat = (row * cols + col).flatten()
    assert torch.equal(flat.sort().values, torch.arange(rows * cols)), "a fragment rule that misses or repeats"
    tile = torch.empty(*elements.shape[:-2], rows * cols, dtype=elements.dtype)
    return tile.index_copy_(-1, flat, elements.flatten(-2)).unflatten(-1, (rows, cols))


def halves(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """32-bit registers (int64 [..., R]) as their 16-bit elements [..., 2 R] in dtype, low half first."""
    h = torch.stack((words & 0xFFFF, (words >> 16) & 0xFFFF), -1).flatten(-2)
    return (h - ((h >> 15) << 16)).to(torch.int16).view(dtype)


def as_register(pair: torch.Tensor) -> torch.Tensor:
    """A pair [..., 2] of 16-bit values as one 32-bit register (int64), element 0 in the low half."""
    h = pair.view(torch.int16).to(torch.int64) & 0xFFFF
    return h[..., 0] | (h[..., 1] << 16)


def mma_m16n8k16(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 for a batch of warps: registers
    a int64 [..., 32, 4], b int64 [..., 32, 2], c float32 [..., 32, 4] -> d float32 [..., 32, 4]."""
    A = fragment_to_tile(halves(a, dtype).double(), mma_a_coords, 16, 16)
    B = fragment_to_tile(halves(b, dtype).double(), mma_b_coords, 16, 8)
    C = fragment_to_tile(c.double(), mma_c_coords, 16, 8)
    row, col = mma_c_coords(torch.arange(32).view(32, 1), torch.arange(4).view(1, 4))
    D = (A @ B + C).float().flatten(-2)
    return D.index_select(-1, (row * 8 + col).flatten()).unflatten(-1, (32, 4))


def ldmatrix_x4(smem: SharedMemory, addr: torch.Tensor) -> torch.Tensor:
    """ldmatrix.sync.aligned.m8n8.x4.shared.b16 (no .trans) for a batch of warps, addr [..., 32] the
    lanes' addresses: lanes 8m .. 8m + 7 give the 16-byte rows 0..7 of matrix m; lane l receives in
    register m the word l % 4 of row l // 4 of matrix m. Returns int64 registers [..., 32, 4]."""
    lane, m = torch.arange(32).view(32, 1), torch.arange(4).view(1, 4)
    row_addr = addr[..., 8 * m + lane // 4]
    assert bool((row_addr % 16 == 0).all()), "ldmatrix row addresses must be 16-byte aligned"
    return words(smem.read(row_addr + 4 * (lane % 4), 4))[..., 0]


def words(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 4 n] as n little-endian 32-bit words (int64 [..., n])."""
    return b.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


# ---------------------------------------------------------------------------- shared memory

UNWRITTEN, IN_FLIGHT = 2**62, 2**62 + 1  # "readable from" markers: never, for now


class SharedMemory:
    """One block's shared memory (bytes, 0xFF at first) with its cp.async groups, and per byte the
    barrier interval from which every thread may read it and the last interval some thread read it
    (``check_races``: reads and writes that break that order raise)."""

    def __init__(self, nbytes: int, check_races: bool):
        self.bytes = torch.full((nbytes,), 0xFF, dtype=torch.uint8)
        self.readable_from = torch.full((nbytes,), UNWRITTEN, dtype=torch.int64)
        self.last_read = torch.full((nbytes,), -1, dtype=torch.int64)
        self.interval = 0       # barriers passed
        self.groups = []        # committed cp.async groups, oldest first: [(byte indices, bytes)]
        self.uncommitted = []
        self.check_races = check_races

    def _span(self, addr: torch.Tensor, nbytes: int) -> torch.Tensor:
        """The indices of the nbytes bytes at each address, flat (1-D: the fast way to index)."""
        assert bool((addr % nbytes == 0).all()), f"misaligned {nbytes}-byte shared memory access"
        return (addr[..., None] + torch.arange(nbytes)).flatten()

    def _before_write(self, index: torch.Tensor):
        if self.check_races:
            assert bool((self.last_read.index_select(0, index) < self.interval).all()), \
                "shared memory written between the same two barriers as a read of it"
            assert bool((self.readable_from.index_select(0, index) != IN_FLIGHT).all()), \
                "shared memory written under a cp.async in flight"

    def read(self, addr: torch.Tensor, nbytes: int) -> torch.Tensor:
        """The nbytes bytes at each address: uint8 [..., nbytes]."""
        index = self._span(addr, nbytes)
        if self.check_races:
            assert bool((self.readable_from.index_select(0, index) <= self.interval).all()), \
                "a read of shared memory that no copy or store has made visible (unwritten, or in flight)"
        self.last_read.index_fill_(0, index, self.interval)
        return self.bytes.index_select(0, index).view(*addr.shape, nbytes)

    def store(self, addr: torch.Tensor, data: torch.Tensor):
        """A plain store of data (uint8 [..., nbytes]) at each address; visible to all after a barrier."""
        index = self._span(addr, data.shape[-1])
        self._before_write(index)
        self.bytes.index_copy_(0, index, data.flatten())
        self.readable_from.index_fill_(0, index, self.interval + 1)

    def cp_async16(self, dst: torch.Tensor, src: torch.Tensor, src_off: torch.Tensor, valid=None):
        """cp.async.cg.shared.global of 16 bytes from byte src_off of the global array src (uint8)
        to dst, per thread; ``valid`` False: src-size 0, 16 zero bytes and no global read."""
        valid = torch.ones_like(dst, dtype=torch.bool) if valid is None else valid
        index = self._span(dst, 16)
        assert bool((src_off % 16 == 0).all()), "misaligned cp.async source"
        read = src_off[valid]
        assert bool(((read >= 0) & (read + 16 <= src.numel())).all()), "cp.async reads past its global array"
        data = torch.zeros(*dst.shape, 16, dtype=torch.uint8)
        data[valid] = src.index_select(0, (read[:, None] + torch.arange(16)).flatten()).view(-1, 16)
        self._before_write(index)
        self.readable_from.index_fill_(0, index, IN_FLIGHT)
        self.uncommitted.append((index, data.flatten()))

    def commit(self):  # cp.async.commit_group
        self.groups.append(self.uncommitted)
        self.uncommitted = []

    def wait(self, pending: int):  # cp.async.wait_group pending: all but the newest `pending` groups land
        while len(self.groups) > pending:
            for index, data in self.groups.pop(0):
                self.bytes.index_copy_(0, index, data)
                self.readable_from.index_fill_(0, index, self.interval + 1)

    def sync(self):  # __syncthreads
        self.interval += 1

    def poison(self, begin: int, end: int):
        """Bytes [begin, end) count as unwritten again (0xFF)."""
        self.bytes[begin:end] = 0xFF
        self.readable_from[begin:end] = UNWRITTEN


# ---------------------------------------------------------------------------- the kernel

def make_plan(M: int, N: int, K: int, num_sms: int) -> dict:
    """make_plan, with plan_split_k of csrc/cuda/launch_common.h."""
    assert M >= 1 and N % TILE_N == 0 and K % STAGE_K == 0
    m_tiles = min(MAX_M_TILES, -(-M // TILE_M))
    grid_m = -(-M // (m_tiles * TILE_M))
    assert grid_m <= MAX_GRID_Y
    grid_n = N // TILE_N
    total_stages = K // STAGE_K
    splits = 1
    if grid_n * grid_m < 2 * num_sms:
        splits = min(-(-2 * num_sms // (grid_n * grid_m)), max(1, total_stages // STAGES), 32)
    stages_per_split = -(-total_stages // splits)
    splits = -(-total_stages // stages_per_split)
    return dict(m_tiles=m_tiles, grid_m=grid_m, grid_n=grid_n, splits=splits, stages_per_split=stages_per_split)


def dup_half(word: torch.Tensor, half_index: int) -> torch.Tensor:
    """__byte_perm(word, 0, half_index ? 0x3232 : 0x1010): the 16-bit half twice."""
    h = (word >> (16 * half_index)) & 0xFFFF
    return h | (h << 16)


def dequant_pair(word, p: int, zero2, scale2, dtype) -> torch.Tensor:
    """dequant_pair<T, p>: nibbles p and p + 4 of word as the register ((q_p - z) s, (q_{p+4} - z) s),
    zero2 / scale2 the registers (BIAS + z, BIAS + z) and (s, s). Each 16-bit operation rounds to
    nearest once, as __hsub2_rn / __hmul2_rn do (so do torch's CPU float16 / bfloat16 operations)."""
    biased = ((word >> (4 * p)) & 0x000F000F) | (MAGIC[dtype] * 0x10001)  # lop3: (a & b) | c
    q_minus_z = halves(biased[..., None], dtype) - halves(zero2[..., None], dtype)
    return as_register(q_minus_z * halves(scale2[..., None], dtype))


def red_fragment_offset(warp, lane, c):
    """The float offset in the reduction buffer [WARPS][16][RED_STRIDE] of a lane's (c0, c1) of
    n8-subtile c: row g of the warp's 16, columns 8c + 2t, 8c + 2t + 1; (c2, c3) are 8 rows on."""
    return (warp * TILE_M + (lane >> 2)) * RED_STRIDE + c * 8 + (lane & 3) * 2


def w4a16_block(gmem: dict, plan: dict, n_block: int, block_y: int, split: int, check_races: bool):
    """One thread block of w4a16_kernel<T, MT> (blockIdx = (n_block, block_y, split)) on the kernel's
    arguments in gmem (x, qweight, scales, zeros as byte tensors; the float32 workspace ws or None;
    bias; out; M, N, K, G, dtype)."""
    M, N, K, G, dtype = gmem["M"], gmem["N"], gmem["K"], gmem["G"], gmem["dtype"]
    MT = plan["m_tiles"]
    stage_size = stage_bytes(MT)
    x_offset = STAGE_WEIGHT_BYTES
    scale_offset = x_offset + MT * TILE_M * X_ROW_BYTES
    zero_offset = scale_offset + SCALE_BYTES
    smem = SharedMemory(smem_bytes(MT), check_races)

    tid = torch.arange(THREADS)
    warp, lane = tid >> 5, tid & 31
    m0 = block_y * (MT * TILE_M)
    stage_begin = split * plan["stages_per_split"]
    n_stages = min(plan["stages_per_split"], K // STAGE_K - stage_begin)
    w_src = n_block * (K // TILE_K) * TILE_BYTES  # this block's weight stream, in bytes
    groups_per_stage = 1 if G >= STAGE_K else STAGE_K // G
    warp_group = 0 if G >= STAGE_K else (warp * TILE_K) // G  # group row of the warp's k16 tile
    load = dict(k0=stage_begin * STAGE_K)  # load_k0, load_group, load_group_end
    load["group"] = load["k0"] // G
    load["group_end"] = (load["group"] + 1) * G

    def load_stage(stage: int, slot: int):
        dst = slot * stage_size
        k0 = stage * STAGE_K
        # weights: thread tid copies bytes [16 tid, 16 tid + 16) of the stage's 4096
        smem.cp_async16(dst + tid * 16, gmem["qweight"], w_src + stage * STAGE_WEIGHT_BYTES + tid * 16)
        # x: row r, chunk c of the stage at chunk c ^ (r & 7); rows >= M zero-filled
        for j in range(MT):
            r = j * TILE_M + (tid >> 4)
            c = tid & 15
            row = m0 + r
            valid = row < M
            src = torch.where(valid, row, 0) * K + k0 + c * 8  # elements
            smem.cp_async16(dst + x_offset + r * X_ROW_BYTES + ((c ^ (r & 7)) * 16), gmem["x"], 2 * src, valid)
        # scales and zeros: groups_per_stage rows x 8 chunks each, threads [0, 2 chunks)
        chunks = groups_per_stage * 8
        t = tid[tid < 2 * chunks]
        for is_zero, table, offset in ((False, gmem["scales"], scale_offset), (True, gmem["zeros"], zero_offset)):
            i = t[t >= chunks] - chunks if is_zero else t[t < chunks]
            r, c = i >> 3, i & 7
            src = (load["group"] + r) * N + n_block * TILE_N + c * 8
            smem.cp_async16(dst + offset + r * GROUP_ROW_BYTES + c * 16, table, 2 * src)
        load["k0"] += STAGE_K
        while load["k0"] >= load["group_end"]:
            load["group"] += 1
            load["group_end"] += G

    acc = torch.zeros(WARPS, MT, N_SUB, 32, 4)  # [warp, j, c, lane, e]: every thread's acc[j][c][e]

    # prologue: stages 0 .. STAGES - 2 in flight, one commit group each, empty ones included
    for s in range(STAGES - 1):
        if s < n_stages:
            load_stage(stage_begin + s, s)
        smem.commit()

    group_id = lane >> 2
    for it in range(n_stages):
        smem.wait(STAGES - 2)
        smem.sync()
        nxt = it + STAGES - 1  # refills the slot of stage it - 1
        if nxt < n_stages:
            load_stage(stage_begin + nxt, nxt % STAGES)
        smem.commit()
        st = (it % STAGES) * stage_size

        wq = words(smem.read(st + warp * TILE_BYTES + lane * 16, 16))  # [THREADS, 4]
        sv = words(smem.read(st + scale_offset + warp_group * GROUP_ROW_BYTES + group_id * 16, 16))
        zv = words(smem.read(st + zero_offset + warp_group * GROUP_ROW_BYTES + group_id * 16, 16))

        # A fragments: ldmatrix.x4 per m-tile j, lane -> row j * 16 + (lane & 15), chunk 2 warp + lane / 16
        j = torch.arange(MT).view(MT, 1)
        r = j * TILE_M + (lane & 15)
        c = warp * 2 + (lane >> 4)
        a_addr = st + x_offset + r * X_ROW_BYTES + ((c ^ (r & 7)) * 16)  # [MT, THREADS]
        a = ldmatrix_x4(smem, a_addr.view(MT, WARPS, 32).transpose(0, 1))  # [WARPS, MT, 32, 4]

        # B fragments: word i -> subtiles 2i (low halves of scale / zero) and 2i + 1 (high halves)
        b = [None] * N_SUB
        for i in range(4):
            s_lo, s_hi = dup_half(sv[:, i], 0), dup_half(sv[:, i], 1)
            z_lo, z_hi = dup_half(zv[:, i], 0), dup_half(zv[:, i], 1)
            b[2 * i] = (dequant_pair(wq[:, i], 0, z_lo, s_lo, dtype), dequant_pair(wq[:, i], 1, z_lo, s_lo, dtype))
            b[2 * i + 1] = (dequant_pair(wq[:, i], 2, z_hi, s_hi, dtype), dequant_pair(wq[:, i], 3, z_hi, s_hi, dtype))
        b = torch.stack([torch.stack(pair, -1) for pair in b]).view(N_SUB, WARPS, 32, 2).transpose(0, 1)

        acc = mma_m16n8k16(a[:, :, None], b[:, None], acc, dtype)

    # epilogue: the 8 warps' partial sums meet in shared memory, the reduction buffer over the stages
    smem.wait(0)
    smem.sync()
    red_bytes = WARPS * TILE_M * RED_STRIDE * 4
    r_out, c_out = tid >> 4, (tid & 15) * 4  # one output quad per thread
    col = n_block * TILE_N + c_out
    for j in range(MT):
        smem.poison(0, red_bytes)  # the pipeline's bytes and the previous m-tile's sums are no results
        for c in range(N_SUB):
            frag = acc[warp, j, c, lane]  # [THREADS, 4]
            p = red_fragment_offset(warp, lane, c)
            smem.store(4 * p, frag[:, 0:2].contiguous().view(torch.uint8))
            smem.store(4 * (p + 8 * RED_STRIDE), frag[:, 2:4].contiguous().view(torch.uint8))
        smem.sync()
        total = smem.read(4 * (r_out * RED_STRIDE + c_out), 16).view(torch.float32)
        for w in range(1, WARPS):
            total = total + smem.read(4 * ((w * TILE_M + r_out) * RED_STRIDE + c_out), 16).view(torch.float32)
        row = m0 + j * TILE_M + r_out
        write_output_quad(gmem, total[row < M], split, row[row < M], col[row < M])
        if j + 1 < MT:
            smem.sync()


def write_output_quad(gmem: dict, total, split: int, row, col):
    """Per thread, the fp32 quad into ws[split][M][N] (split K), else (+ bias) rounded into out."""
    quad = torch.arange(4)
    if gmem["ws"] is not None:
        gmem["ws"][((split * gmem["M"] + row) * gmem["N"] + col)[:, None] + quad] = total
        return
    if gmem["bias"] is not None:
        total = total + gmem["bias"].float()[col[:, None] + quad]
    gmem["out"][(row * gmem["N"] + col)[:, None] + quad] = total.to(gmem["dtype"])


def splitk_reduce(ws: torch.Tensor, bias, out: torch.Tensor, M: int, N: int, splits: int):
    """splitk_reduce_kernel: quad i of out = sum over splits, in order, of quad i of each slice
    (+ bias[(4 i) % N ..]), rounded once."""
    quads = M * N // 4
    i = torch.arange(quads)
    partial = ws.view(-1, 4)
    total = partial[i]
    for s in range(1, splits):
        total = total + partial[s * quads + i]
    if bias is not None:
        total = total + bias.float()[((i * 4) % N)[:, None] + torch.arange(4)]
    out.view(-1, 4)[i] = total.to(out.dtype)


def linear(x, qweight_s, scales_p, zeros_p, group_size: int, bias, num_sms: int, check_races: bool = True):
    """effkern_cuda::w4a16::linear on CPU tensors (x [M, K] float16 / bfloat16, the prepared
    tensors of shuffle_for_cuda, group_size resolved), with the plan make_plan gives for num_sms
    SMs: the output [M, N] in x's dtype."""
    if group_size < 1:
        raise ValueError("group_size must be resolved (K for -1)")
    M, K = x.shape
    N = scales_p.shape[1]
    dtype = x.dtype
    plan = make_plan(M, N, K, num_sms)
    out = torch.full((M * N,), float("nan"), dtype=dtype)
    ws = torch.full((plan["splits"] * M * N,), float("nan")) if plan["splits"] > 1 else None
    as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731
    # the launcher passes the bias to the kernel only without split K (the reduction adds it then)
    gmem = dict(M=M, N=N, K=K, G=group_size, dtype=dtype, x=as_bytes(x), qweight=as_bytes(qweight_s),
                scales=as_bytes(scales_p), zeros=as_bytes(zeros_p), bias=None if ws is not None else bias, ws=ws,
                out=out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small tensor operations: a thread pool costs more than it gives
    try:
        for split in range(plan["splits"]):
            for block_y in range(plan["grid_m"]):
                for n_block in range(plan["grid_n"]):
                    w4a16_block(gmem, plan, n_block, block_y, split, check_races)
        if ws is not None:
            splitk_reduce(ws, bias, out, M, N, plan["splits"])
    finally:
        torch.set_num_threads(threads)
    return out.view(M, N), plan
