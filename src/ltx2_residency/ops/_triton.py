"""The Triton kernels themselves (imported only when Triton is there; see ``kernels``).

Module-level, as Triton resolves the helpers a kernel calls among the module's globals; the
interpreter (``TRITON_INTERPRET=1``) is chosen when this module is imported.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, spelled out in integer ops: the interpreter's
    cast truncates, and the two must agree with each other and with torch."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def lora_tiles(
    tile_layer,
    tile_local,
    w_base,
    b_base,
    a_base,
    w_off,
    b_off,
    a_off,
    rows_table,
    cols_table,
    gridk_table,
    scale_table,
    rank16_table,
    active_table,
    flags_ptr,
    counters_ptr,
    valid_ptr,
    rec_start_table,
    cap_table,
    idx_ptr,
    val_ptr,
    sign,
    UNIT: tl.constexpr,
    RANK: tl.constexpr,
    MODE: tl.constexpr,
    F32_DOT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
    EARLY_W: tl.constexpr = False,
):
    """One program per tile of any layer of a LoRA (all layers in one launch: per-layer launches
    cost more host time than the GPU spends on a layer).

    Addresses are a base tensor plus a per-layer offset, and the widths are tabled, in units of
    ``UNIT`` elements (8 when every address and row is 16-byte aligned, as at LTX-2's shapes; 1
    otherwise), ranks in units of 16: the compiler can then prove the alignment and issue wide,
    pipelined loads (a bare table-loaded pointer gives 2-byte loads, 5x slower).
    ``MODE``: 0 merge, 1 undo, 2 check (the merge's records and flags, the weight left as it is),
    3 write (the checked tiles' merged values; the same arithmetic, so the same bits).
    The undo is this same body with ``sign = -1``: ``bf16(W' + acc * (-s))`` is bit for bit the
    ``bf16(W' - d)`` the merge checked (negation is exact). A separate subtracting body compiled
    with software pipelining (Triton 3.6, ``num_stages=3``) left the weights unchanged on a
    Hopper GPU, so there is only one.
    """
    pid = tl.program_id(0)
    layer = tl.load(tile_layer + pid)
    local = tl.load(tile_local + pid)
    grid_k = tl.load(gridk_table + layer)
    n_rows = tl.load(rows_table + layer)
    n_cols = tl.load(cols_table + layer) * UNIT
    rank = tl.load(rank16_table + layer) * 16
    w_ptr = w_base + tl.load(w_off + layer) * UNIT
    b_ptr = b_base + tl.load(b_off + layer) * UNIT
    a_ptr = a_base + tl.load(a_off + layer) * UNIT
    scale = tl.load(scale_table + layer) * sign
    rows = (local // grid_k) * BN + tl.arange(0, BN)
    cols = (local % grid_k) * BK + tl.arange(0, BK)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    flag = tl.load(flags_ptr + pid)
    active = tl.load(active_table + layer) != 0
    # merge/check: tiles neither merged nor checked (a retry skips those done); write: checked
    # tiles; undo: merged tiles of the layers undone now
    if MODE == 1:
        run = active & (flag == 1)
    elif MODE == 3:
        run = active & (flag == 4)
    else:
        run = active & (flag != 1) & (flag != 4)
    w_ptrs = w_ptr + rows[:, None] * n_cols + cols[None, :]
    if EARLY_W:  # the weight's read in flight while the delta is computed (nothing in the loop needs it)
        w = tl.load(w_ptrs, mask=inside & run, other=0.0)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(0, RANK, BR):  # RANK: the largest rank of the launch (compile-time); smaller ones mask
        rr = r0 + tl.arange(0, BR)
        b = tl.load(
            b_ptr + rows[:, None] * rank + rr[None, :],
            mask=(rows[:, None] < n_rows) & (rr[None, :] < rank),
            other=0.0,
        )
        a = tl.load(
            a_ptr + rr[:, None] * n_cols + cols[None, :],
            mask=(rr[:, None] < rank) & (cols[None, :] < n_cols),
            other=0.0,
        )
        if F32_DOT:  # the interpreter's dot misreads half-precision operands; the products are exact in fp32
            acc += tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(b, a)
    d = acc * scale
    if not EARLY_W:
        w = tl.load(w_ptrs, mask=inside & run, other=0.0)
    out = bf16_rne(w.to(tl.float32) + d)
    if MODE == 0 or MODE == 2:
        redo = bf16_rne(out.to(tl.float32) - d)
        of = out.to(tl.float32)
        bad = ((of != of) | (tl.abs(of) == float("inf"))) & inside
        n_bad = tl.sum(tl.sum(bad.to(tl.int32), 1), 0)
        miss = (redo.to(tl.int16, bitcast=True) != w.to(tl.int16, bitcast=True)) & inside
        mi = miss.to(tl.int32)
        row_cnt = tl.sum(mi, 1)
        n_miss = tl.sum(row_cnt, 0)
        want = run & (n_bad == 0)
        base = tl.atomic_add(counters_ptr + layer, tl.where(want, n_miss, 0).to(tl.int64))
        fits = (base + n_miss) <= tl.load(cap_table + layer)
        write = want & fits
        # reservations only grow, so every slot below the largest end that fit is written
        tl.atomic_max(valid_ptr + layer, tl.where(write, base + n_miss, 0).to(tl.int64))
        # slots within the tile: row-wise scans in the tile's own layout (a flat scan reshapes 16K
        # elements through shared memory), kept in int32; the region's start is one int64 scalar
        slot = (tl.cumsum(row_cnt, 0) - row_cnt)[:, None] + tl.cumsum(mi, 1) - 1
        first = tl.load(rec_start_table + layer) + base
        keep = miss & write
        tl.store(idx_ptr + first + slot, rows[:, None] * n_cols + cols[None, :], mask=keep)
        tl.store(val_ptr + first + slot, w.to(tl.int16, bitcast=True), mask=keep)
        if MODE == 0:
            tl.store(w_ptrs, out, mask=inside & write)
        new_flag = tl.where(write, 1 if MODE == 0 else 4, tl.where(n_bad > 0, 2, 3))
        tl.store(flags_ptr + pid, tl.where(run, new_flag, flag).to(tl.int8))
    else:
        tl.store(w_ptrs, out, mask=inside & run)
        if MODE == 3:
            tl.store(flags_ptr + pid, tl.where(run, 1, flag).to(tl.int8))


@triton.jit
def scatter_records(w_base, w_off, active_table, rec_start_table, count_table, idx_ptr, val_ptr, UNIT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Put each undone layer's recorded original words back: grid (layer, chunk of its records)."""
    layer = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (offs < tl.load(count_table + layer)) & (tl.load(active_table + layer) != 0)
    start = tl.load(rec_start_table + layer)
    i = tl.load(idx_ptr + start + offs, mask=m, other=0)
    v = tl.load(val_ptr + start + offs, mask=m, other=0)
    dst = (w_base + tl.load(w_off + layer) * UNIT).to(tl.pointer_type(tl.int16))
    tl.store(dst + i, v, mask=m)


@triton.jit
def digest_blocks(base, off_table, words_table, block_tensor, block_index, out, UNIT: tl.constexpr,
                  CHUNK_: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    """One 2^15-word block as ``CHUNK_ // COLS`` rows of ``COLS`` words: the per-word work stays in
    int32 (row sums <= 2^25, column sums <= 2^20) and only the short row/column vectors are
    widened to int64 (64-bit integer arithmetic per word is what kept a first version from the
    bandwidth). With ``j = r*COLS + c``: ``sum x_j (j+1) = COLS * sum_r r*row_r + sum_c (c+1)*col_c``."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    blk = tl.load(block_index + pid)
    ptr = base + tl.load(off_table + t) * UNIT  # UNIT 8 (16 bytes) when all are aligned: wide loads
    n = tl.load(words_table + t)
    start = blk * CHUNK_
    c = tl.arange(0, COLS)
    cols = tl.zeros((COLS,), dtype=tl.int32)
    s0 = tl.zeros((), dtype=tl.int64)
    s1 = tl.zeros((), dtype=tl.int64)
    for r0 in range(0, CHUNK_ // COLS, ROWS):
        r = r0 + tl.arange(0, ROWS)
        j = start + r[:, None] * COLS + c[None, :]
        x = tl.load(ptr + j, mask=j < n, other=0).to(tl.int32)
        rows = tl.sum(x, 1).to(tl.int64)
        cols += tl.sum(x, 0)
        s0 += tl.sum(rows)
        s1 += COLS * tl.sum(r.to(tl.int64) * rows)
    s1 += tl.sum((c + 1).to(tl.int64) * cols.to(tl.int64))
    tl.store(out + pid * 3, s0)
    tl.store(out + pid * 3 + 1, s1)
    tl.store(out + pid * 3 + 2, s0 * (blk + 1))
