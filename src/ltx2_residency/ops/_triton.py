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
    w_table,
    b_table,
    a_table,
    rows_table,
    cols_table,
    gridk_table,
    scale_table,
    rank_table,
    active_table,
    flags_ptr,
    counters_ptr,
    valid_ptr,
    rec_start_table,
    cap_table,
    idx_ptr,
    val_ptr,
    RANK: tl.constexpr,
    MODE: tl.constexpr,
    F32_DOT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    """One program per tile of any layer of a LoRA (all layers in one launch: per-layer launches
    cost more host time than the GPU spends on a layer)."""
    pid = tl.program_id(0)
    layer = tl.load(tile_layer + pid)
    local = tl.load(tile_local + pid)
    grid_k = tl.load(gridk_table + layer)
    n_rows = tl.load(rows_table + layer)
    n_cols = tl.load(cols_table + layer)
    w_ptr = tl.load(w_table + layer).to(tl.pointer_type(tl.bfloat16))
    b_ptr = tl.load(b_table + layer).to(tl.pointer_type(tl.bfloat16))
    a_ptr = tl.load(a_table + layer).to(tl.pointer_type(tl.bfloat16))
    scale = tl.load(scale_table + layer)
    rank = tl.load(rank_table + layer)
    rows = (local // grid_k) * BN + tl.arange(0, BN)
    cols = (local % grid_k) * BK + tl.arange(0, BK)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    flag = tl.load(flags_ptr + pid)
    active = tl.load(active_table + layer) != 0
    # merge: tiles not merged yet (a retry skips those done); restore: merged tiles of the layers undone now
    run = active & ((flag != 1) if MODE == 0 else (flag == 1))
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
    w_ptrs = w_ptr + rows[:, None] * n_cols + cols[None, :]
    w = tl.load(w_ptrs, mask=inside & run, other=0.0)
    if MODE == 0:
        merged = bf16_rne(w.to(tl.float32) + d)
        redo = bf16_rne(merged.to(tl.float32) - d)
        mf = merged.to(tl.float32)
        bad = ((mf != mf) | (tl.abs(mf) == float("inf"))) & inside
        n_bad = tl.sum(bad.to(tl.int32))
        miss = (redo.to(tl.int16, bitcast=True) != w.to(tl.int16, bitcast=True)) & inside
        n_miss = tl.sum(miss.to(tl.int32))
        want = run & (n_bad == 0)
        base = tl.atomic_add(counters_ptr + layer, tl.where(want, n_miss, 0).to(tl.int64))
        fits = (base + n_miss) <= tl.load(cap_table + layer)
        write = want & fits
        # reservations only grow, so every slot below the largest end that fit is written
        tl.atomic_max(valid_ptr + layer, tl.where(write, base + n_miss, 0).to(tl.int64))
        flat_miss = tl.reshape(miss, (BN * BK,))
        slot = tl.load(rec_start_table + layer) + base + (tl.cumsum(flat_miss.to(tl.int32), 0) - 1).to(tl.int64)
        flat_idx = tl.reshape(rows[:, None] * n_cols + cols[None, :], (BN * BK,))
        flat_w = tl.reshape(w.to(tl.int16, bitcast=True), (BN * BK,))
        keep = flat_miss & write
        tl.store(idx_ptr + slot, flat_idx, mask=keep)
        tl.store(val_ptr + slot, flat_w, mask=keep)
        tl.store(w_ptrs, merged, mask=inside & write)
        new_flag = tl.where(write, 1, tl.where(n_bad > 0, 2, 3))
        tl.store(flags_ptr + pid, tl.where(run, new_flag, flag).to(tl.int8))
    else:
        redo = bf16_rne(w.to(tl.float32) - d)
        tl.store(w_ptrs, redo, mask=inside & run)


@triton.jit
def scatter_records(w_table, active_table, rec_start_table, count_table, idx_ptr, val_ptr, BLOCK: tl.constexpr):
    """Put each undone layer's recorded original words back: grid (layer, chunk of its records)."""
    layer = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (offs < tl.load(count_table + layer)) & (tl.load(active_table + layer) != 0)
    start = tl.load(rec_start_table + layer)
    i = tl.load(idx_ptr + start + offs, mask=m, other=0)
    v = tl.load(val_ptr + start + offs, mask=m, other=0)
    dst = tl.load(w_table + layer).to(tl.pointer_type(tl.int16))
    tl.store(dst + i, v, mask=m)


@triton.jit
def digest_blocks(ptr_table, words_table, block_tensor, block_index, out, CHUNK_: tl.constexpr, STEP: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    blk = tl.load(block_index + pid)
    base = tl.load(ptr_table + t).to(tl.pointer_type(tl.int16))
    n = tl.load(words_table + t)
    start = blk * CHUNK_
    s0 = tl.zeros((), dtype=tl.int64)
    s1 = tl.zeros((), dtype=tl.int64)
    for off in range(0, CHUNK_, STEP):
        j = off + tl.arange(0, STEP)
        x = tl.load(base + start + j, mask=(start + j) < n, other=0).to(tl.int32)
        s0 += tl.sum(x.to(tl.int64))
        s1 += tl.sum((x * (j + 1)).to(tl.int64))  # |x·(j+1)| <= 2^30: exact in int32
    tl.store(out + pid * 3, s0)
    tl.store(out + pid * 3 + 1, s1)
    tl.store(out + pid * 3 + 2, s0 * (blk + 1))
