"""Flash attention in Triton: forward, and the backward as a dK/dV kernel and a dQ kernel.

Layout: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] with any strides (the kernels take all four
strides of every tensor, so transposed views of [B, S, H, D] are read in place); query head h
reads kv head h // (Hq // Hkv). Head dims that are not powers of two are padded to BLOCK_D
inside the kernels by masked loads, never by copying.

Masking (effkern/attention.py defines it): with off = Skv - Sq, query i sees key j when
    i + off - LEFT <= j <= i + off + RIGHT,
where the caller has turned "unbounded" (-1) into a bound past every key and causal into
RIGHT = min(RIGHT, 0). Key blocks wholly outside a query block's band (and query blocks
wholly outside a key block's band, in the dK/dV kernel) are skipped by the loop bounds. Of
the blocks visited, those every row of the tile sees in full (inside the band, and below Skv,
and below Sq for the dK/dV kernel's query blocks) run without the element mask and with
unmasked loads (``_full_blocks``); only the others, on the band's edges, apply it.

Forward (``flash_attn_fwd_kernel``): one program per (query block, batch x query head); the Q
tile stays in registers while K/V tiles stream; online softmax in fp32 in base 2, the scale
times log2(e) folded into the scores (after the softcap, when there is one). A row with every
key masked gives output 0 and lse -inf. lse (natural log) is stored, float32 [B, Hq, Sq].

Decoding forward, for at most DECODE_MAX_SQ query rows: the same kernel at a tile of 16, 32 or
64 rows sized to a program's rows (the autotuned tiles would be mostly idle rows, and each tile
of rows streams all of its kv head's keys). With GQA (PACK_GQA) a program takes a
kv head and the rows of all its query heads, position-major (``query_block``), so each K/V tile
is read once per kv head instead of once per query head. Split-KV (flash-decoding), where
those programs would leave most SMs idle (``decode_splits`` decides): a third grid axis of
SPLITS programs, split s taking whole key blocks [lo + s * chunk, ...) of the query block's
visible range [lo, hi) and writing its own normalized output and lse, fp32, to a workspace
[SPLITS, B, Hq, Sq, D] / [SPLITS, B, Hq, Sq]; ``flash_attn_decode_merge_kernel`` then
combines the splits in order (deterministic), out = sum_s exp(lse_s - lse) out_s with
lse = logsumexp_s lse_s, where a split that saw no key has lse_s = -inf and adds nothing. The
backward does not depend on which forward ran.

Backward: ``flash_attn_bwd_preprocess_kernel``, delta = rowsum(dO * O) - dlse in fp32; then
``flash_attn_bwd_dkdv_kernel``, one program per (key block, batch x kv head), looping over
the query heads of its group and their query blocks, so the GQA sum happens in registers and
nothing is added atomically; ``flash_attn_bwd_dq_kernel``, one program per (query block,
batch x query head). Both deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import cdiv, fixed_config, interpreted, launch, next_power_of_2, on_device, sm_count, switch_on
from ._tma import block_shapes_hook, descriptors, tma_ready

LOG2E = 1.4426950408889634
# the decoding forward: up to this many query rows; each of its key splits at least this many key blocks
DECODE_MAX_SQ = 16
DECODE_MIN_BLOCKS = 4
MERGE_BLOCK_M = 16  # the merge's rows per program


@triton.jit
def _tanh(x):
    # tanh from exp (works in the interpreter and on every GPU): 1 - 2 / (e^{2x} + 1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _raw_scores(q, kt, qk_scale, softcap, SOFTCAP: tl.constexpr):
    """Scores in base 2 (scale and log2(e) folded in, after the softcap when there is one) and the
    softcap's tanh (for the backward's chain rule; the raw scores when there is no softcap)."""
    s = tl.dot(q, kt).to(tl.float32)
    if SOFTCAP:
        t = _tanh(s * (qk_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = s
        s = s * (qk_scale * 1.4426950408889634)
    return s, t


@triton.jit
def _scores(q, kt, offs_m, offs_n, Sq, Skv, off, LEFT, RIGHT, qk_scale, softcap,
            SOFTCAP: tl.constexpr):
    """_raw_scores with the element mask applied: -inf where query i may not see key j."""
    s, t = _raw_scores(q, kt, qk_scale, softcap, SOFTCAP)
    diag = offs_m[:, None] + off
    keep = ((offs_m[:, None] < Sq) & (offs_n[None, :] < Skv)
            & (offs_n[None, :] >= diag - LEFT) & (offs_n[None, :] <= diag + RIGHT))
    return tl.where(keep, s, float("-inf")), t


@triton.jit
def _load_tile(ptrs, idx, offs_d, limit, D, PAST_LIMIT: tl.constexpr, EVEN_D: tl.constexpr,
               IDX_ALONG_ROWS: tl.constexpr):
    # a [keys or queries, D] tile (or its transpose), masked only where it can run past ``limit``
    # along idx (PAST_LIMIT) or past D (not EVEN_D)
    if IDX_ALONG_ROWS:
        idx_ok = idx[:, None] < limit
        d_ok = offs_d[None, :] < D
    else:
        idx_ok = idx[None, :] < limit
        d_ok = offs_d[:, None] < D
    if not PAST_LIMIT:
        if EVEN_D:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=d_ok, other=0.0)
    if EVEN_D:
        return tl.load(ptrs, mask=idx_ok, other=0.0)
    return tl.load(ptrs, mask=idx_ok & d_ok, other=0.0)


@triton.jit
def _full_blocks(n, lo, full_from, full_to, BLOCK: tl.constexpr):
    # of the blocks lo + i * BLOCK, i in [0, n), those lying inside [full_from, full_to): i in [i_lo, i_hi)
    i_lo = tl.minimum(tl.cdiv(tl.maximum(full_from - lo, 0), BLOCK), n)
    i_hi = tl.maximum(tl.minimum(tl.maximum(full_to - lo, 0) // BLOCK, n), i_lo)
    return i_lo, i_hi


@triton.jit
def _visited_block(lo, i, skip_from, skip, BLOCK: tl.constexpr, offs):
    # the indices (keys or query rows) of the block that loop iteration i visits: block i, or
    # i + skip from i = skip_from on (one masked loop covers the blocks on both sides of the
    # unmasked ones); block b starts at lo + b * BLOCK
    return lo + (i + tl.where(i >= skip_from, skip, 0)) * BLOCK + offs


@triton.jit
def _head_tile(desc, head_row, base, start, offs, offs_d, stride_s, stride_d, limit, D, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr, TMA: tl.constexpr, TRANSPOSED: tl.constexpr):
    # rows start + offs of one head's [S, D] keys or queries, as a [rows, BLOCK_D] tile (or its
    # transpose). TMA, in unmasked blocks (rows below ``limit``): from the descriptor of every
    # head's rows, this head's starting at head_row (columns past D zero-filled by the copy).
    # Else pointer loads from base, masked past limit (MASKED) and past D (not EVEN_D).
    if TMA and not MASKED:
        tile = desc.load([head_row + start, 0])
        if TRANSPOSED:
            tile = tile.T
    else:
        idx = start + offs
        if TRANSPOSED:
            tile = _load_tile(base + idx[None, :] * stride_s + offs_d[:, None] * stride_d, idx, offs_d, limit, D,
                              MASKED, EVEN_D, False)
        else:
            tile = _load_tile(base + idx[:, None] * stride_s + offs_d[None, :] * stride_d, idx, offs_d, limit, D,
                              MASKED, EVEN_D, True)
    return tile


@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_row, lo, first_block, end_block, skip_from,
                    skip, offs_m, offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, Sq, Skv, D, off, LEFT,
                    RIGHT, qk_scale, softcap,
                    SOFTCAP: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    # online softmax over the key blocks of iterations first_block .. end_block - 1 (_visited_block).
    # MASKED: apply the element mask (blocks on the band's edges or past Skv); else every query
    # row of the tile sees every key of the block (rows past Sq too: q is 0 there, their scores
    # finite). TMA (unmasked blocks only, which lie below Skv): K and V tiles by tensor
    # descriptors over the keys of all heads as rows, this head's from row kv_row on.
    for i in range(first_block, end_block):
        start = _visited_block(lo, i, skip_from, skip, BLOCK_N, 0)
        cols = start + offs_n
        kt = _head_tile(k_desc, kv_row, k_base, start, offs_n, offs_d, stride_ks, stride_kd, Skv, D, MASKED, EVEN_D,
                        TMA, True)
        if MASKED:
            s, _t = _scores(q, kt, offs_m, cols, Sq, Skv, off, LEFT, RIGHT, qk_scale, softcap, SOFTCAP)
        else:
            s, _t = _raw_scores(q, kt, qk_scale, softcap, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no NaN from -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _head_tile(v_desc, kv_row, v_base, start, offs_n, offs_d, stride_vs, stride_vd, Skv, D, MASKED, EVEN_D,
                       TMA, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _finish_rows(acc, l_i, m_i, BASE2: tl.constexpr):
    # out = acc / l and lse = m + log(l) (natural log; m and l in base 2 where BASE2:
    # lse = (m + log2 l) ln 2). A row with no visible key has l_i == 0 exactly (exp2(-inf) = +0 on
    # every GPU too): out 0, lse -inf. A NaN score makes l_i NaN, which the out and lse of its row
    # then carry (a test of l_i > 0 would give it lse -inf, the mark of a row with no key).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if BASE2:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    else:
        lse = m_i + tl.log(l_safe)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), lse)


@triton.jit
def query_block(Hq, GROUP, BLOCK_M: tl.constexpr, PACK_GQA: tl.constexpr):
    # program (query block, batch x head): its batch, its kv head, the query head and the query
    # position of each row, and the first and the last position of the tile. By default the head
    # is query head h (kv head h // GROUP) and row r is position m * BLOCK_M + r. PACK_GQA: the
    # head is kv head hk, and the rows are its GROUP query heads', position-major: packed row
    # p = m * BLOCK_M + r is position p // GROUP of query head hk * GROUP + p % GROUP.
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    if PACK_GQA:
        b = (pid_bh // (Hq // GROUP)).to(tl.int64)
        hk = (pid_bh % (Hq // GROUP)).to(tl.int64)
        h = hk * GROUP + rows % GROUP
        offs_m = rows // GROUP
        first, last = first_row // GROUP, (first_row + BLOCK_M - 1) // GROUP
    else:
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        hk = h // GROUP
        offs_m = rows
        first, last = first_row, first_row + BLOCK_M - 1
    return b, hk, h, offs_m, first, last


@triton.jit
def flash_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    Hq, GROUP, Sq, Skv, D, LEFT, RIGHT, qk_scale, softcap,
    SPLITS, stride_o_split, stride_lse_split,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, TMA: tl.constexpr, PACK_GQA: tl.constexpr,
):
    # program (query block, batch x head, split s): split s of SPLITS takes its share of the
    # visible keys and writes its normalized output and lse at split offset s (SPLITS = 1: out, lse).
    # The head and the rows as query_block has them (PACK_GQA: a kv head, the rows of its group).
    # TMA: k_desc and v_desc are descriptors of k and v as [B * Hkv * Skv, D] matrices in
    # [BLOCK_N, BLOCK_D] tiles, read in the unmasked blocks (else they are unused)
    b, hk, h, offs_m, first, last = query_block(Hq, GROUP, BLOCK_M, PACK_GQA)
    split = tl.program_id(2)
    off = Skv - Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Sq  # (packed rows past the group's last position are past Sq too)

    q_rows = b * stride_qb + h * stride_qh + offs_m * stride_qs
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    # keys this block of queries can see: [lo, hi), lo rounded down to a key block
    lo = tl.maximum(first + off - LEFT, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(last + off + RIGHT + 1, Skv)
    # this split's share: whole key blocks, the last splits possibly empty
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), SPLITS), BLOCK_N) * BLOCK_N
    lo = lo + split * chunk
    hi = tl.minimum(hi, lo + chunk)

    # its key blocks 0 .. n - 1, and among them i_lo .. i_hi - 1, those every query row of the tile
    # sees in full: keys from last + off - LEFT (the last row's left bound) up to
    # min(Skv, first + off + RIGHT + 1) (the first row's right bound). Only the others need the
    # element mask.
    n = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    i_lo, i_hi = _full_blocks(n, lo, last + off - LEFT, tl.minimum(Skv, first + off + RIGHT + 1), BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # the unmasked blocks, then the masked ones on either side of them (0 .. i_lo - 1, i_hi .. n - 1)
    # in one loop: two copies of the loop body, not three
    kv_row = ((b * (Hq // GROUP) + hk) * Skv).to(tl.int32)  # this head's first key row (TMA)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_row, lo, i_lo, i_hi, n, 0,
                                    offs_m, offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, Sq, Skv, D,
                                    off, LEFT, RIGHT, qk_scale, softcap, SOFTCAP, False, EVEN_D, TMA, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_row, lo, 0,
                                    n - (i_hi - i_lo), i_lo, i_hi - i_lo, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                                    stride_vs, stride_vd, Sq, Skv, D, off, LEFT, RIGHT, qk_scale, softcap, SOFTCAP,
                                    True, EVEN_D, TMA, BLOCK_N)

    out, lse = _finish_rows(acc, l_i, m_i, True)
    o_rows = split.to(tl.int64) * stride_o_split + b * stride_ob + h * stride_oh + offs_m * stride_os
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split.to(tl.int64) * stride_lse_split + (b * Hq + h) * Sq + offs_m, lse, mask=m_ok)


@triton.jit
def flash_attn_decode_merge_kernel(
    part_ptr, part_lse_ptr, o_ptr, lse_ptr,
    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
    stride_ob, stride_oh, stride_os, stride_od,
    Hq, Sq, D, SPLITS, stride_lse_split,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s lse_s, over splits 0, 1, ... in
    # order (deterministic); a split that saw no key (lse_s = -inf) adds nothing, a row no split
    # saw a key of gives out 0 and lse -inf
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    mask = m_ok[:, None] & (offs_d[None, :] < D)
    p_ptrs = part_ptr + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm + offs_d[None, :] * stride_pd
    l_ptrs = part_lse_ptr + pid_bh.to(tl.int64) * Sq + offs_m
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in range(0, SPLITS):
        lse_s = tl.load(l_ptrs + s * stride_lse_split, mask=m_ok, other=float("-inf"))
        out_s = tl.load(p_ptrs + s * stride_ps, mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        w = tl.exp(lse_s - m_use)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * out_s
        m_i = m_new
    out, lse = _finish_rows(acc, l_i, m_i, False)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=m_ok)


@triton.jit
def flash_attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_db, stride_dh, stride_ds, stride_dd,
    Hq, Sq, D,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta[b, h, i] = sum_d dO * O (fp32) - dlse[b, h, i]: the softmax backward's row term
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    rows = pid_bh.to(tl.int64) * Sq + offs_m
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + rows, mask=offs_m < Sq, other=0.0)
    tl.store(delta_ptr + rows, delta, mask=offs_m < Sq)


@triton.jit
def _probs_and_dscores(q, kt, v_t, do, lse2, delta, offs_m, offs_n, Sq, Skv, off, LEFT, RIGHT, qk_scale, softcap,
                       SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """p = softmax probabilities [BLOCK_M, BLOCK_N] and dS, the gradient of the raw scores q.k
    (without the scale), both fp32. MASKED: apply the element mask (else every pair is visible,
    or a query row past Sq, whose zero q and dO make its p and dS add nothing)."""
    if MASKED:
        s, t = _scores(q, kt, offs_m, offs_n, Sq, Skv, off, LEFT, RIGHT, qk_scale, softcap, SOFTCAP)
    else:
        s, t = _raw_scores(q, kt, qk_scale, softcap, SOFTCAP)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, v_t).to(tl.float32)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p, ds


@triton.jit
def _dkdv_query_blocks(dk, dv, kt, v_t, q_base, do_base, lse_base, delta_base, lo, first_block, end_block,
                       skip_from, skip, offs_m, offs_n, offs_d, stride_qs, stride_qd, stride_ds, stride_dd, Sq, Skv,
                       D, off, LEFT, RIGHT, qk_scale, softcap,
                       SOFTCAP: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # dK and dV of this key block from the query blocks of iterations first_block .. end_block - 1
    # (_visited_block); not MASKED: every row is below Sq and sees every key of the block. Pointer
    # loads only: with q and dO by TMA this kernel spilled 190-280 bytes at three of its configs
    # (sm_90a), where it spills at most 8 without
    for i in range(first_block, end_block):
        start = _visited_block(lo, i, skip_from, skip, BLOCK_M, 0)
        rows = start + offs_m
        q = _head_tile(None, 0, q_base, start, offs_m, offs_d, stride_qs, stride_qd, Sq, D, MASKED, EVEN_D, False,
                       False)
        do = _head_tile(None, 0, do_base, start, offs_m, offs_d, stride_ds, stride_dd, Sq, D, MASKED, EVEN_D, False,
                        False)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < Sq, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < Sq, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        p, ds = _probs_and_dscores(q, kt, v_t, do, lse2, delta, rows, offs_n, Sq, Skv, off, LEFT, RIGHT,
                                   qk_scale, softcap, SOFTCAP, MASKED)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit
def _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kv_row, lo, first_block, end_block,
                   skip_from, skip, offs_m, offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, Sq, Skv, D,
                   off, LEFT, RIGHT, qk_scale, softcap,
                   SOFTCAP: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    # dQ of this query block from the key blocks of iterations first_block .. end_block - 1
    # (_visited_block), masked and loaded as in _fwd_key_blocks
    for i in range(first_block, end_block):
        start = _visited_block(lo, i, skip_from, skip, BLOCK_N, 0)
        cols = start + offs_n
        kt = _head_tile(k_desc, kv_row, k_base, start, offs_n, offs_d, stride_ks, stride_kd, Skv, D, MASKED, EVEN_D,
                        TMA, True)
        v_t = _head_tile(v_desc, kv_row, v_base, start, offs_n, offs_d, stride_vs, stride_vd, Skv, D, MASKED, EVEN_D,
                         TMA, True)
        p, ds = _probs_and_dscores(q, kt, v_t, do, lse2, delta, offs_m, cols, Sq, Skv, off, LEFT, RIGHT,
                                   qk_scale, softcap, SOFTCAP, MASKED)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


@triton.jit
def flash_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    Hq, Hkv, GROUP, Sq, Skv, D, LEFT, RIGHT, qk_scale, softcap,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    off = Skv - Sq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Skv

    kt = tl.load(k_ptr + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                 mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    v_t = tl.load(v_ptr + b * stride_vb + hk * stride_vh + offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd,
                  mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    # queries that can see this block of keys: i + off - LEFT <= j <= i + off + RIGHT
    first = pid_n * BLOCK_N
    lo = tl.maximum(first - off - RIGHT, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(first + BLOCK_N - 1 - off + LEFT + 1, Sq)
    # of its query blocks 0 .. n - 1, i_lo .. i_hi - 1 see every key of this block and lie below Sq:
    # rows from first + BLOCK_N - 1 - off - RIGHT (the last key's lower bound) up to
    # min(Sq, first + 1 - off + LEFT) (the first key's upper bound); none when the keys pass Skv
    n = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    i_lo, i_hi = _full_blocks(n, lo, first + BLOCK_N - 1 - off - RIGHT, tl.minimum(Sq, first + 1 - off + LEFT),
                              BLOCK_M)
    i_hi = tl.where(first + BLOCK_N <= Skv, i_hi, i_lo)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_db + h * stride_dh
        row_base = (b * Hq + h) * Sq
        dk, dv = _dkdv_query_blocks(dk, dv, kt, v_t, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base, lo,
                                    i_lo, i_hi, n, 0, offs_m, offs_n, offs_d, stride_qs, stride_qd, stride_ds,
                                    stride_dd, Sq, Skv, D, off, LEFT, RIGHT, qk_scale, softcap, SOFTCAP, False, EVEN_D,
                                    BLOCK_M)
        dk, dv = _dkdv_query_blocks(dk, dv, kt, v_t, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base, lo,
                                    0, n - (i_hi - i_lo), i_lo, i_hi - i_lo, offs_m, offs_n, offs_d, stride_qs,
                                    stride_qd, stride_ds, stride_dd, Sq, Skv, D, off, LEFT, RIGHT, qk_scale, softcap,
                                    SOFTCAP, True, EVEN_D, BLOCK_M)

    dk = dk * qk_scale
    dk_ptrs = dk_ptr + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_ptr + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def flash_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, k_desc, v_desc, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    Hq, GROUP, Sq, Skv, D, LEFT, RIGHT, qk_scale, softcap,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, TMA: tl.constexpr,
):
    # TMA: k_desc and v_desc as in the forward
    b, hk, h, offs_m, first, last = query_block(Hq, GROUP, BLOCK_M, False)
    off = Skv - Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Sq

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd,
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + tl.program_id(1).to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + tl.program_id(1).to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    lo = tl.maximum(first + off - LEFT, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(last + off + RIGHT + 1, Skv)
    n = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    i_lo, i_hi = _full_blocks(n, lo, last + off - LEFT, tl.minimum(Skv, first + off + RIGHT + 1),
                              BLOCK_N)  # as in the forward
    kv_row = ((b * (Hq // GROUP) + hk) * Skv).to(tl.int32)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kv_row, lo, i_lo, i_hi, n, 0, offs_m,
                        offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, Sq, Skv, D, off, LEFT, RIGHT,
                        qk_scale, softcap, SOFTCAP, False, EVEN_D, TMA, BLOCK_N)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kv_row, lo, 0, n - (i_hi - i_lo),
                        i_lo, i_hi - i_lo, offs_m, offs_n, offs_d, stride_ks, stride_kd, stride_vs, stride_vd, Sq, Skv,
                        D, off, LEFT, RIGHT, qk_scale, softcap, SOFTCAP, True, EVEN_D, TMA, BLOCK_N)

    dq = dq * qk_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Launch configurations. Under the interpreter: small tiles, so the odd test sizes cross tile
# edges and the suite stays quick. On a GPU: autotuned per (Sq, Skv, D, window bounds) over a
# few tile shapes for the head-dim class (D <= 128, or up to 256), whose first entry is the one
# used when autotuning is off (EFFKERN_TRITON_AUTOTUNE=0, as in the GPU tests). The decoding
# (split-KV) forward is not tuned: its tiles follow from the few query rows.

def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _configs(*tiles, pre_hook=None) -> list[triton.Config]:
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st, pre_hook=pre_hook)
            for m, n, w, st in tiles]


# The forward's and dQ's K/V descriptors in the config's [BLOCK_N, BLOCK_D] tiles (the
# autotuning pre-hook; without TMA those arguments are the tensors themselves, left as they are)
_set_kv_tiles = block_shapes_hook({"k_desc": ("BLOCK_N", "BLOCK_D"), "v_desc": ("BLOCK_N", "BLOCK_D")})


# (BLOCK_M, BLOCK_N, num_warps, num_stages): the query tile x key tile of the forward and the dQ
# kernel; for the dK/dV kernel, BLOCK_N keys stay while BLOCK_M query rows stream. The first of
# each list is version 1's fixed tile. All fit the shared memory of sm_80 and sm_90 and spill
# (almost) no registers, compiled as a contiguous, aligned launch would be
# (tests/test_attention.py checks both); candidates that spilled were left out.
FWD_CONFIGS = {"d128": _configs((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                pre_hook=_set_kv_tiles),
               "d256": _configs((64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2),
                                pre_hook=_set_kv_tiles)}
DKDV_CONFIGS = {"d128": _configs((32, 64, 4, 2), (32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2)),
                "d256": _configs((16, 32, 4, 1), (32, 32, 8, 1), (32, 32, 4, 1), (16, 64, 8, 1))}
DQ_CONFIGS = {"d128": _configs((64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), pre_hook=_set_kv_tiles),
              "d256": _configs((32, 16, 4, 1), (32, 16, 8, 1), (32, 32, 4, 2), (32, 32, 8, 2), pre_hook=_set_kv_tiles)}
_TUNE_KEY = ["Sq", "Skv", "D", "LEFT", "RIGHT"]
# TMA in the forward's and dQ's keys: their launches with and without TMA are different kernels, tuned apart
_fwd_tuned = {c: triton.autotune(cfgs, key=_TUNE_KEY + ["TMA"])(flash_attn_fwd_kernel)
              for c, cfgs in FWD_CONFIGS.items()}
_dkdv_tuned = {c: triton.autotune(cfgs, key=_TUNE_KEY + ["GROUP"])(flash_attn_bwd_dkdv_kernel)
               for c, cfgs in DKDV_CONFIGS.items()}
_dq_tuned = {c: triton.autotune(cfgs, key=_TUNE_KEY + ["TMA"])(flash_attn_bwd_dq_kernel)
             for c, cfgs in DQ_CONFIGS.items()}


def _d_class(D: int) -> str:
    return "d128" if D <= 128 else "d256"


def _fixed(config: triton.Config, interpreter: dict) -> dict:
    """launch()'s fixed settings: the interpreter's tiles, and on a GPU ``config`` (the first tuned one)."""
    return {"interpreter": interpreter,
            "gpu": dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)}


def _decode_config(D: int, rows: int) -> dict:
    return dict(BLOCK_M=16, BLOCK_N=16) if interpreted() else _decode_config_gpu(D, rows)


def _decode_config_gpu(D: int, rows: int) -> dict:
    # a program's rows (Sq, or Sq x the GQA group packed) in one tile of 16 (the smallest tl.dot
    # tile), 32 or 64 rows: each tile of rows streams all of its kv head's keys, so the fewer
    # the better, up to the tile the autotuned forward also runs (64 x 64 / 64 x 32: no spills);
    # keys in wide blocks
    block_m = min(64, max(16, next_power_of_2(rows)))
    if D <= 128:
        return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=2)


def _bounds(Sq: int, Skv: int, causal: bool, left: int, right: int) -> tuple[int, int]:
    """Window bounds as the kernels take them: unbounded (-1) becomes a bound past every key."""
    far = Sq + Skv + 1
    left = far if left < 0 else left
    right = far if right < 0 else right
    if causal:
        right = min(right, 0)
    return left, right


def decoding_rows(B: int, Hq: int, Hkv: int, Sq: int) -> tuple[int, int, bool]:
    """The decoding forward's rows per head (in tiles of _decode_config's BLOCK_M), its programs
    along batch x heads, and whether it packs GQA groups: with Hq > Hkv a program takes a kv head
    and the rows of its Hq / Hkv query heads (PACK_GQA), so that K and V are read once per kv
    head rather than once per query head; EFFKERN_TRITON_PACK_GQA=0 keeps one per query head."""
    pack = Hq > Hkv and switch_on("EFFKERN_TRITON_PACK_GQA")
    rows, heads = (Sq * (Hq // Hkv), Hkv) if pack else (Sq, Hq)
    return rows, B * heads, pack


def decode_splits(B: int, Hq: int, Hkv: int, Sq: int, Skv: int, D: int, causal: bool, left: int, right: int,
                  device: torch.device) -> int:
    """Splits of the keys for the decoding forward (at most DECODE_MAX_SQ query rows): 1 for none.

    Split when its programs (decoding_rows) are fewer than two per SM: enough splits for two
    programs per SM, each split at least DECODE_MIN_BLOCKS key blocks of the keys the rows can
    see (so the merge and the workspace stay small next to reading K and V)."""
    if Sq == 0 or Sq > DECODE_MAX_SQ or Skv == 0 or B * Hq == 0 or D == 0:
        return 1
    rows, heads, _ = decoding_rows(B, Hq, Hkv, Sq)
    return _decode_splits(rows, heads, Sq, Skv, D, causal, left, right, device)


def _decode_splits(rows: int, heads: int, Sq: int, Skv: int, D: int, causal: bool, left: int, right: int,
                   device: torch.device) -> int:
    """decode_splits for a call that decodes (every size nonzero, Sq <= DECODE_MAX_SQ), given its
    decoding_rows."""
    left, right = _bounds(Sq, Skv, causal, left, right)
    cfg = _decode_config(D, rows)
    keys = min(Sq - 1 + Skv - Sq + right + 1, Skv) - max(Skv - Sq - left, 0)  # seen by some row
    programs = cdiv(rows, cfg["BLOCK_M"]) * heads
    return max(1, min(cdiv(2 * sm_count(device), programs), keys // (DECODE_MIN_BLOCKS * cfg["BLOCK_N"])))


# CUDA allows at most 65535 programs along a grid's second axis, where the kernels put batch x
# heads: a call with more runs in slices of the batch.
MAX_GRID_Y = 65535


def batch_slices(B: int, heads: int) -> list[slice]:
    """Slices of the batch with at most MAX_GRID_Y batch x heads programs each (one sequence at
    least)."""
    step = max(1, MAX_GRID_Y // heads)
    return [slice(i, min(i + step, B)) for i in range(0, B, step)]


def with_32bit_offsets(t: torch.Tensor) -> torch.Tensor:
    """t [B, H, S, D], or a contiguous copy where the kernels' 32-bit offsets along S and D (index
    * stride, up to a tile past the end; the batch and head offsets are 64-bit) could reach
    _launch.MAX_32BIT_OFFSET: a [B, S, H, D] tensor seen as [B, H, S, D] (stride H D along S) with
    S H D of 2^31 or more, say."""
    _, _, S, D = t.shape
    if (S + 256) * t.stride(2) + (D + 256) * t.stride(3) < _launch.MAX_32BIT_OFFSET:
        return t
    return t.contiguous()


def _head_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t [B, H, S, D] as the matrix [B * H * S, D] of its rows, if its strides allow it (the
    heads' rows evenly spaced: contiguous, or sliced along D), else None."""
    B, H, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    if sd != 1 or (H > 1 and sh != S * ss) or (B > 1 and sb != H * S * ss):
        return None
    return t.as_strided((B * H * S, D), (ss, 1))


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, setting: dict):
    """TMA descriptors of k and v as row matrices, in the tiles of ``setting`` (BLOCK_N x
    BLOCK_D), for the unmasked key blocks of the forward or dQ; None where TMA does not apply
    (pre-Hopper, non-16-bit, strides that do not flatten or align: the pointer loads then)."""
    rows = [_head_rows(t) for t in (k, v)]
    if k.element_size() != 2 or any(r is None for r in rows) or not tma_ready(*rows):
        return None
    return list(descriptors(dict(k_desc=rows[0], v_desc=rows[1]), _set_kv_tiles, setting).values())


def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, left: int,
                   right: int, softcap: float, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Sq, D] contiguous in q's dtype, lse float32 [B, Hq, Sq]); shapes checked by the caller.

    At most DECODE_MAX_SQ query rows: the decoding forward, split over the keys as decode_splits
    says. ``splits``: a number forces the decoding forward with that many splits (tests), 1
    included; None chooses."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if B > 1 and B * Hq > MAX_GRID_Y:
        parts = [flash_attn_fwd(q[b], k[b], v[b], causal, scale, left, right, softcap, splits)
                 for b in batch_slices(B, Hq)]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    q, k, v = (with_32bit_offsets(t) for t in (q, k, v))
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Skv == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    decoding = splits is not None or Sq <= DECODE_MAX_SQ
    if decoding:  # (one decoding_rows per call: it reads the environment)
        rows, heads, pack = decoding_rows(B, Hq, Hkv, Sq)
        if splits is None:
            splits = _decode_splits(rows, heads, Sq, Skv, D, causal, left, right, q.device)
    left, right = _bounds(Sq, Skv, causal, left, right)
    common = (Hq, Hq // Hkv, Sq, Skv, D, left, right, float(scale), float(softcap) if softcap > 0 else 1.0)
    flags = dict(SOFTCAP=softcap > 0, BLOCK_D=_block_d(D), EVEN_D=D == _block_d(D))
    if not decoding:
        d_class = _d_class(D)
        fixed = _fixed(FWD_CONFIGS[d_class][0], dict(BLOCK_M=32, BLOCK_N=16))
        kv = _kv_descriptors(k, v, {**fixed_config(fixed), **flags})
        launch(_fwd_tuned[d_class], flash_attn_fwd_kernel, lambda meta: (cdiv(Sq, meta["BLOCK_M"]), B * Hq, 1),
               (q, k, v, *(kv or (k, v)), out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *common,
                1, 0, 0), dict(flags, TMA=kv is not None, PACK_GQA=False), fixed, device=q.device)
        return out, lse
    # decoding: the few rows in one small tile, GQA groups packed; split over the keys, each split
    # writes normalized fp32 partials and their lse, merged by their lse
    cfg = _decode_config(D, rows)
    blocks = cdiv(rows, cfg["BLOCK_M"])
    kv = _kv_descriptors(k, v, {**cfg, **flags})
    kwargs = dict(flags, **cfg, TMA=kv is not None, PACK_GQA=pack)
    with on_device(q.device):
        if splits == 1:
            flash_attn_fwd_kernel[(blocks, heads, 1)](
                q, k, v, *(kv or (k, v)), out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *common,
                1, 0, 0, **kwargs)
            return out, lse
        part = torch.empty((splits, B, Hq, Sq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, B, Hq, Sq), dtype=torch.float32, device=q.device)
        flash_attn_fwd_kernel[(blocks, heads, splits)](
            q, k, v, *(kv or (k, v)), part, part_lse, *q.stride(), *k.stride(), *v.stride(), *part.stride()[1:],
            *common, splits, part.stride(0), part_lse.stride(0), **kwargs)
        flash_attn_decode_merge_kernel[(cdiv(Sq, MERGE_BLOCK_M), B * Hq)](
            part, part_lse, out, lse, *part.stride(), *out.stride(), Hq, Sq, D, splits, part_lse.stride(0),
            BLOCK_M=MERGE_BLOCK_M, BLOCK_D=_block_d(D))
    return out, lse


def flash_attn_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, left: int,
                   right: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in q's dtype; dlse (the gradient reaching lse) may be None."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if B > 1 and B * Hq > MAX_GRID_Y:
        parts = [flash_attn_bwd(dout[b], None if dlse is None else dlse[b], q[b], k[b], v[b], out[b], lse[b], causal,
                                scale, left, right, softcap) for b in batch_slices(B, Hq)]
        return tuple(torch.cat(grads) for grads in zip(*parts))
    dout, q, k, v, out = (with_32bit_offsets(t) for t in (dout, q, k, v, out))
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Skv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Skv, D), dtype=v.dtype, device=v.device)
    if Sq == 0 or Skv == 0 or B * Hq == 0 or D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    dlse = dlse.float().contiguous() if dlse is not None else None
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    left, right = _bounds(Sq, Skv, causal, left, right)
    common = (Sq, Skv, D, left, right, float(scale), float(softcap) if softcap > 0 else 1.0)
    flags = dict(SOFTCAP=softcap > 0, BLOCK_D=_block_d(D), EVEN_D=D == _block_d(D))
    d_class = _d_class(D)
    with on_device(q.device):
        rows_block = 16 if interpreted() else 64
        flash_attn_bwd_preprocess_kernel[(cdiv(Sq, rows_block), B * Hq)](
            out, dout, dlse if dlse is not None else delta, delta, *out.stride(), *dout.stride(), Hq, Sq, D,
            HAS_DLSE=dlse is not None, BLOCK_M=rows_block, BLOCK_D=_block_d(D))
    launch(_dkdv_tuned[d_class], flash_attn_bwd_dkdv_kernel, lambda meta: (cdiv(Skv, meta["BLOCK_N"]), B * Hkv),
           (q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(),
            *dv.stride(), Hq, Hkv, Hq // Hkv, *common), flags,
           _fixed(DKDV_CONFIGS[d_class][0], dict(BLOCK_M=16, BLOCK_N=32)))
    fixed = _fixed(DQ_CONFIGS[d_class][0], dict(BLOCK_M=32, BLOCK_N=16))
    kv = _kv_descriptors(k, v, {**fixed_config(fixed), **flags})
    launch(_dq_tuned[d_class], flash_attn_bwd_dq_kernel, lambda meta: (cdiv(Sq, meta["BLOCK_M"]), B * Hq),
           (q, k, v, dout, *(kv or (k, v)), lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *dq.stride(), Hq, Hq // Hkv, *common), dict(flags, TMA=kv is not None), fixed, device=q.device)
    return dq, dk, dv

