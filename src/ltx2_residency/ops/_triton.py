"""The Triton kernels themselves (imported only when Triton is there; see ``kernels``).

Module-level, as Triton resolves the helpers a kernel calls among the module's globals; the
interpreter (``TRITON_INTERPRET=1``) is chosen when this module is imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import digest_mix as _fp


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


# the digest's keys, as compile-time constants (``fingerprint`` owns them: the torch path and this
# kernel must agree bit for bit)
DIGEST_KEY = tl.constexpr(_fp.DIGEST_KEY)
DIGEST_M1, DIGEST_M2 = tl.constexpr(_fp.DIGEST_M1), tl.constexpr(_fp.DIGEST_M2)
DIGEST_M3, DIGEST_M4 = tl.constexpr(_fp.DIGEST_M3), tl.constexpr(_fp.DIGEST_M4)


@triton.jit
def digest_mix(w, k):
    """The two mixes of 32-bit words ``w`` at keyed positions ``k`` (both uint32): ``h1`` is a
    bijection of the word for a fixed position, ``h2`` re-keys ``h1`` with the position and mixes
    it again."""
    x = w ^ (w >> 16) ^ k
    x = x * DIGEST_M1
    x = x ^ (x >> 15)
    x = x * DIGEST_M2
    h1 = x ^ (x >> 16)
    y = (h1 ^ k) * DIGEST_M3
    y = y ^ (y >> 15)
    y = y * DIGEST_M4
    h2 = y ^ (y >> 15)
    return h1, h2


@triton.jit
def digest_pairs(h, TILE: tl.constexpr):
    """Neighbouring words' mixes added before they reach the 64-bit sums: one 64-bit addition per
    two words."""
    return tl.sum(tl.reshape(h.to(tl.uint64), (TILE // 2, 2)), 1)


@triton.jit
def digest_blocks(base, off_table, words_table, block_tensor, block_index, out, UNIT: tl.constexpr,
                  CHUNK_: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    """One block of ``CHUNK_`` 16-bit words of one tensor: per 32-bit word (two 16-bit words,
    little-endian; an odd last one is zero-extended) its two mixes, summed exactly in uint64,
    and the block's byte count. Tiles of ``ROWS * COLS`` 16-bit words.

    ``base + offset * UNIT`` addresses a tensor in 16-bit words; with an even ``UNIT`` every
    tensor is 4-byte aligned and whole tiles are read as 32-bit words (16-byte loads when ``UNIT``
    is 8), otherwise as pairs of 16-bit words. The sums are the same either way: the digest is a
    sum over words, so the tiling and the order do not change its bits."""
    TILE: tl.constexpr = ROWS * COLS // 2  # 32-bit words
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    blk = tl.load(block_index + pid).to(tl.int64)
    ptr16 = base + tl.load(off_table + t) * UNIT
    n16 = tl.load(words_table + t)
    start16 = blk * CHUNK_
    here16 = tl.minimum(n16 - start16, CHUNK_)
    word0 = blk * (CHUNK_ // 2)
    full = here16 // (2 * TILE)
    offs = tl.arange(0, TILE)
    lane_keys = offs.to(tl.uint32) * DIGEST_KEY  # (a + b) * KEY = a * KEY + b * KEY mod 2^32
    acc1 = tl.zeros((TILE // 2,), dtype=tl.uint64)
    acc2 = tl.zeros((TILE // 2,), dtype=tl.uint64)
    # a fixed trip count with the tile's case inside (the interpreter cannot loop to a loaded bound)
    for i in range(0, CHUNK_ // (2 * TILE)):
        first = word0 + i * TILE
        keys = lane_keys + first.to(tl.uint32) * DIGEST_KEY
        if i < full:
            if UNIT % 2 == 0:
                w = tl.load(ptr16.to(tl.pointer_type(tl.int32)) + first + offs).to(tl.uint32, bitcast=True)
            else:
                lo = tl.load(ptr16 + 2 * (first + offs)).to(tl.uint16, bitcast=True).to(tl.uint32)
                hi = tl.load(ptr16 + 2 * (first + offs) + 1).to(tl.uint16, bitcast=True).to(tl.uint32)
                w = lo | (hi << 16)
            h1, h2 = digest_mix(w, keys)
            acc1 += digest_pairs(h1, TILE)
            acc2 += digest_pairs(h2, TILE)
        elif (i == full) & (here16 > i * 2 * TILE):  # the tensor's last, partial tile: an odd word zero-extended
            j16 = 2 * (first + offs)
            lo = tl.load(ptr16 + j16, mask=j16 < n16, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            hi = tl.load(ptr16 + j16 + 1, mask=j16 + 1 < n16, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            h1, h2 = digest_mix(lo | (hi << 16), keys)
            inside = j16 < n16
            acc1 += digest_pairs(tl.where(inside, h1, 0), TILE)
            acc2 += digest_pairs(tl.where(inside, h2, 0), TILE)
    tl.store(out + pid * 3, tl.sum(acc1, 0).to(tl.int64, bitcast=True))
    tl.store(out + pid * 3 + 1, tl.sum(acc2, 0).to(tl.int64, bitcast=True))
    tl.store(out + pid * 3 + 2, 2 * tl.maximum(here16, 0))
