"""Attention over a packed batch: softmax(q k^T / sqrt(D)) v per sequence and head.

attention_forward equals reference.attention's core (tests/test_kernels.py, also over several
blocks of keys against a plain-NumPy twin of the online softmax). Both of its products go through
fp32's `_tile`, like the linear layers: a head's keys and values are first copied into panels.
Long sequences are attended a block of keys at a time with an online softmax (`_attend_block`), so
a thread's scratch grows as O(T), never [T, T]. Attention stays fp32 at every precision.

Legend:  N tokens in the packed batch, B sequences, offsets [B+1] row ranges of the sequences,
         Q query rows, T a sequence's tokens (keys), C hidden size, H heads, D head size (C / H).

Read next: int8.py and bf16.py, the reduced-precision products; then layers.py, the rest of each
layer and whole layers in one region.
"""

import math

import numpy as np
from numba import prange

from ..bf16 import PAIR
from .bf16 import AVX512BF16, bf16_bits, round_rows
from .bf16 import panels_product as bf16_panels_product
from .fp32 import PANEL, TILE_ROWS, panels_product
from .rowwise import ONE, contiguous_row, exp32, f32, largest
from .threads import aligned, check_workspace, kernel, parallel_kernel, take

QUERY_BLOCK = 8 * TILE_ROWS  # queries attended together: their scores are [QUERY_BLOCK, KEY_BLOCK]
KEY_BLOCK = 512  # keys per block of the online softmax (a multiple of PANEL); most pairs fit in one


@kernel
def _attention_sizes(T, count, D):
    """Floats of (zeros, keys, values, scores, row state, out, block out, codes) for an item of T
    keys and count queries. Only keys and values grow with T (2 T D floats); the scores of a block
    of queries against a block of keys are the largest square part: no [T, T] matrix is ever made.
    codes: the bf16 path's rounded queries or probabilities, two to a float."""
    span, head_width = -(-T // PANEL) * PANEL, -(-D // PANEL) * PANEL
    rows, columns = min(count, QUERY_BLOCK), min(span, KEY_BLOCK)
    return (
        max(columns, head_width),
        span * D,
        head_width * span,
        rows * columns,
        2 * rows,
        rows * head_width,
        rows * head_width,
        (rows * max(columns, head_width) + 1) // 2,
    )


@kernel
def attention_floats(offsets, query_offsets, D):
    """Floats of one thread's workspace row for attention_forward on these sequences."""
    T = count = 0
    for b in range(offsets.shape[0] - 1):
        T = max(T, offsets[b + 1] - offsets[b])
        count = max(count, query_offsets[b + 1] - query_offsets[b])
    total = 0
    for size in _attention_sizes(T, count, D):
        total += aligned(size)
    return total


@kernel
def _attention_scratch(scratch, T, count, D):
    """Views into one thread's workspace row: zeros [max(KEY_BLOCK, Dp)], keys [D * span] (k^T
    in panels, _panels_of), values [Dp * span] (one [Dp / PANEL, block, PANEL] array per block of
    keys, back to back), scores [rows, columns], highest and total [rows] (the online softmax's running max and
    sum), out and block_out [rows, Dp], codes [rows * max(columns, Dp)] uint16 (span, Dp: T, D
    rounded up to whole panels; rows, columns: a block of queries and of keys). On the bf16 path
    keys and values hold bf16 panels, two values to a float (_head_panels). Views only: nothing is
    allocated."""
    span, head_width = -(-T // PANEL) * PANEL, -(-D // PANEL) * PANEL
    rows, columns = min(count, QUERY_BLOCK), min(span, KEY_BLOCK)
    zeros_size, keys_size, values_size, scores_size, state_size, out_size, _, _ = _attention_sizes(T, count, D)
    at = aligned(zeros_size)  # where the next buffer starts
    zeros = scratch[:zeros_size]
    keys = scratch[at : at + keys_size]
    at += aligned(keys_size)
    values = scratch[at : at + values_size]
    at += aligned(values_size)
    scores = scratch[at : at + scores_size].reshape((rows, columns))
    at += aligned(scores_size)
    highest, total = scratch[at : at + rows], scratch[at + rows : at + 2 * rows]
    at += aligned(state_size)
    out = scratch[at : at + out_size].reshape((rows, head_width))
    at += aligned(out_size)
    block_out = scratch[at : at + out_size].reshape((rows, head_width))
    at += aligned(out_size)
    codes = scratch[at : at + (rows * max(columns, head_width) + 1) // 2].view(np.uint16)
    return zeros, keys, values, scores, highest, total, out, block_out, codes


@parallel_kernel
def attention_forward(context, queries, qkv, width, offsets, query_offsets, H, workspace, rounding=False):
    """softmax(q k^T / sqrt(D)) v of reference.attention, per packed sequence and head.

    context [Q, C]; the projections, biases included: queries[:, :C] [Q, C], and the keys and
    values qkv[:, width : width + C] and qkv[:, 2 * width : 2 * width + C] [N, C] (width: C rounded
    up to whole panels; queries may be qkv itself). Sequence b's keys are rows offsets[b]:
    offsets[b+1]; its queries are rows query_offsets[b]:query_offsets[b+1], the first tokens of
    the sequence in order (all of them, or only the first when the caller needs just the
    classification token). workspace [threads, S]: a row of scratch per thread, S >=
    attention_floats(offsets, query_offsets, D) (make it with threads.make_workspace).

    Both products go through `_tile`, like the linear layers: the head's keys and values are
    first copied into panels (zero-padded to whole panels), a few KB per head. The softmax's
    division is done after the product with v: on D values per query instead of T.

    rounding: both products on bf16 instead, by bf16.py's avx512bf16 tile (vdpbf16ps, fp32 sums):
    q, k, v and the softmax's numerators rounded to bf16 (bf16.BF16Linears.matmul is the oracle),
    twice the multiply-adds per instruction. Only where that path runs.
    """
    n_threads = workspace.shape[0]
    check_workspace(workspace, attention_floats(offsets, query_offsets, context.shape[1] // H))
    taken = np.zeros(1, dtype=np.int64)  # work items: (sequence, head) pairs
    for thread in prange(n_threads):
        attention_items(context, queries, qkv, width, offsets, query_offsets, H, workspace[thread], taken, rounding)


@kernel
def attention_items(context, queries, qkv, width, offsets, query_offsets, H, scratch, taken, rounding=False):
    """One thread's part of attention_forward: the (sequence, head) items it takes from `taken`,
    in its own row of the workspace, `scratch`."""
    C = context.shape[1]
    D = C // H
    query, key, value = queries[:, :C], qkv[:, width : width + C], qkv[:, 2 * width : 2 * width + C]
    B = offsets.shape[0] - 1
    item = take(taken)
    while item < B * H:
        b, h = item // H, item % H
        start, T = offsets[b], offsets[b + 1] - offsets[b]
        first, count = query_offsets[b], query_offsets[b + 1] - query_offsets[b]
        zeros, keys, values, scores, highest, total, out, block_out, codes = _attention_scratch(scratch, T, count, D)
        zeros[:] = 0  # no bias
        if rounding:
            _bf16_head_panels(keys.view(np.uint32), values.view(np.uint32), key, value, start, T, D, h * D)
        else:
            _head_panels(keys, values, key, value, start, T, D, h * D)
        for q0 in range(0, count, QUERY_BLOCK):
            rows = min(QUERY_BLOCK, count - q0)
            _attend_block(
                context[first + q0 : first + q0 + rows],
                query[first + q0 : first + q0 + rows],
                h * D,
                keys,
                values,
                T,
                D,
                zeros,
                scores[:rows],
                highest[:rows],
                total[:rows],
                out[:rows],
                block_out[:rows],
                codes,
                rounding,
            )
        item = take(taken)


@kernel
def _panels_of(flat, count, K, group):
    """flat's first values as `count` panels of K rows (rounded up to whole groups): [count,
    K / group, group * PANEL], a panel's group values of each of its PANEL columns side by side
    (group 1: fp32's layout; PAIR: bf16's, for vdpbf16ps, an odd K's last pair half zero)."""
    K = _whole_groups(K, group)
    return flat[: count * K * PANEL].reshape((count, K // group, group * PANEL))


@kernel
def _whole_groups(K, group):
    return -(-K // group) * group


@kernel
def _head_panels(keys, values, key, value, start, T, D, column):
    """Copy one head's keys and values (columns column : column + D of rows start : start + T)
    into panels (_panels_of) for the products, zero-padded to whole panels: keys as k^T, the k of
    the product being d, [span / PANEL] panels; values block by block, each block of KEY_BLOCK
    keys its own [Dp / PANEL] panels, the k being the key, so that the product with a block's
    probabilities reads one contiguous array. keys and values: the flat scratch.

    The innermost loops run over a whole row of a panel, PANEL values, a length LLVM knows: with
    a length known only at run time the copies took a quarter of attention's time at 512 tokens
    (and keys written a key at a time, a store every 128 bytes, as much again)."""
    head_width = -(-D // PANEL) * PANEL
    span = -(-T // PANEL) * PANEL
    panels = _panels_of(keys, span // PANEL, D, 1)  # [span / PANEL, D, PANEL]
    for p in range(span // PANEL):
        if (p + 1) * PANEL <= T:  # a whole panel: loops of a fixed length, which LLVM unrolls
            for d in range(D):
                for j in range(PANEL):
                    panels[p, d, j] = key[start + p * PANEL + j, column + d]
        else:  # the last keys, then zeros
            for d in range(D):
                for j in range(PANEL):
                    panels[p, d, j] = key[start + p * PANEL + j, column + d] if p * PANEL + j < T else 0
    for k0 in range(0, span, KEY_BLOCK):
        block = _value_block(values, k0, span, head_width)  # [Dp / PANEL, columns, PANEL]
        for t in range(block.shape[1]):
            for q in range(head_width // PANEL):
                if k0 + t < T and (q + 1) * PANEL <= D:  # a whole row of a panel
                    for j in range(PANEL):
                        block[q, t, j] = value[start + k0 + t, column + q * PANEL + j]
                else:  # the columns past D, and the keys past T, are zeros
                    for j in range(PANEL):
                        d = q * PANEL + j
                        block[q, t, j] = value[start + k0 + t, column + d] if k0 + t < T and d < D else 0


@kernel
def _bf16_pair(low, high):
    """Two floats rounded to bf16 in one 32-bit lane, as vdpbf16ps reads a pair: low in bits 0-15."""
    return np.uint32(bf16_bits(low)) | (np.uint32(bf16_bits(high)) << np.uint32(16))


@kernel
def _bf16_head_panels(keys, values, key, value, start, T, D, column):
    """_head_panels on the bf16 path: the same panels with k in pairs (bf16.py's layout, an odd D's
    last pair half zero), each pair rounded into one uint32 (_bf16_pair), so that a panel is
    [K / 2, PANEL] uint32, fp32's shape. keys, values: the flat scratch as uint32. The keys' pairs
    are neighbours in a row of k (d, d + 1); the values' are two keys (t, t + 1)."""
    head_width = -(-D // PANEL) * PANEL
    span = -(-T // PANEL) * PANEL
    pairs = (D + 1) // PAIR
    panels = _panels_of(keys, span // PANEL, pairs, 1)  # [span / PANEL, pairs, PANEL] uint32
    for p in range(span // PANEL):
        first = start + p * PANEL
        if (p + 1) * PANEL <= T:  # a whole panel, in fixed-length loops (_head_panels)
            for d2 in range(D // PAIR):
                for j in range(PANEL):
                    panels[p, d2, j] = _bf16_pair(key[first + j, column + 2 * d2], key[first + j, column + 2 * d2 + 1])
        else:
            for d2 in range(D // PAIR):
                for j in range(PANEL):
                    real = p * PANEL + j < T
                    low = key[first + j, column + 2 * d2] if real else f32(0.0)
                    panels[p, d2, j] = _bf16_pair(low, key[first + j, column + 2 * d2 + 1] if real else f32(0.0))
        if D % PAIR:  # an odd D's last k, alone in its pair
            for j in range(PANEL):
                last = key[first + j, column + D - 1] if p * PANEL + j < T else f32(0.0)
                panels[p, pairs - 1, j] = _bf16_pair(last, f32(0.0))
    for k0 in range(0, span, KEY_BLOCK):
        columns = min(KEY_BLOCK, span - k0)
        block = _panels_of(values[k0 * head_width // PAIR :], head_width // PANEL, columns // PAIR, 1)
        for t2 in range(columns // PAIR):
            t = k0 + PAIR * t2  # keys t and t + 1: a pair; those past T are zeros
            for q in range(head_width // PANEL):
                d = column + q * PANEL
                if t + 1 < T and (q + 1) * PANEL <= D:
                    for j in range(PANEL):
                        block[q, t2, j] = _bf16_pair(value[start + t, d + j], value[start + t + 1, d + j])
                else:
                    for j in range(PANEL):
                        real = q * PANEL + j < D
                        low = value[start + t, d + j] if real and t < T else f32(0.0)
                        block[q, t2, j] = _bf16_pair(
                            low, value[start + t + 1, d + j] if real and t + 1 < T else f32(0.0)
                        )


@kernel
def _value_block(values, k0, span, head_width):
    """The fp32 panels [Dp / PANEL, columns, PANEL] of the values of the key block starting at k0."""
    columns = min(KEY_BLOCK, span - k0)
    return _panels_of(values[k0 * head_width :], head_width // PANEL, columns, 1)


@kernel
def _exponentials(x, highest, scale):
    """x = exp((x - highest) * scale) in place, returning their sum. Each is <= 1: the max was
    subtracted (numerical stability). Locals only in the loop, so LLVM can vectorise it (the
    running max and sum live in the same workspace as x, which it cannot prove apart)."""
    total = f32(0.0)
    for j in range(x.shape[0]):
        e = exp32((x[j] - highest) * scale)
        x[j] = e
        total += e
    return total


@kernel
def _product(out, x, flat, offset, count, K, zeros, codes, rounding):
    """out = x [rows, K] @ the `count` panels of K rows at flat[offset:] (in values of the panels'
    dtype): fp32.panels_product, or with rounding, x rounded to bf16 into codes and bf16's
    avx512bf16 tile on the bf16 panels flat holds, two to a float."""
    if rounding:
        pairs = _whole_groups(K, PAIR)  # an odd K (head size) gets a zero k: vdpbf16ps sums pairs
        rounded = codes[: x.shape[0] * pairs].reshape((x.shape[0], pairs))
        round_rows(rounded, x)
        rounded[:, K:] = 0
        panels = _panels_of(flat.view(np.uint16)[offset:], count, K, PAIR)
        bf16_panels_product(out, rounded, panels, zeros, 0, count, AVX512BF16)
    else:
        panels_product(out, x, _panels_of(flat[offset:], count, K, 1), zeros, 0, count)


@kernel
def _attend_block(
    context, query, column, keys, values, T, D, zeros, scores, highest, total, out, block_out, codes, rounding
):
    """context[:, column : column + D] = softmax(q k^T / sqrt(D)) v for a block of queries, over
    the keys a block at a time with an online softmax (Milakov & Gimelshein 2018, as in
    FlashAttention): each row keeps its running max and sum of exponentials, and when a later
    block holds a larger score, what was summed so far is scaled by exp(old max - new max).
    Memory is a [rows, KEY_BLOCK] block of scores whatever T; with one block of keys (T <=
    KEY_BLOCK, most pairs) this is exactly reference.softmax's arithmetic. The division by the
    sum is done at the end, on D values per query instead of T."""
    rows = query.shape[0]
    head_width = out.shape[1]
    span = -(-T // PANEL) * PANEL
    scale = f32(1.0 / math.sqrt(D))
    depth = _whole_groups(D, PAIR) if rounding else D  # rows of a key panel
    q = query[:, column : column + D]
    for k0 in range(0, span, KEY_BLOCK):
        columns = min(KEY_BLOCK, span - k0)  # a whole number of panels
        real = min(columns, T - k0)  # the padded keys past T get no weight
        # the block's key panels follow k0 / PANEL panels of D rows; its value panels, k0 keys' worth
        _product(scores, q, keys, k0 * depth, columns // PANEL, D, zeros, codes, rounding)
        target = out if k0 == 0 else block_out
        for i in range(rows):
            block_highest = largest(scores[i, :real])
            if k0 == 0:
                highest[i] = block_highest
                total[i] = f32(0.0)
            elif block_highest > highest[i]:
                rescale = exp32((highest[i] - block_highest) * scale)  # the earlier blocks' exponentials shrink
                total[i] *= rescale
                for d in range(head_width):
                    out[i, d] *= rescale
                highest[i] = block_highest
            total[i] += _exponentials(scores[i, :real], highest[i], scale)
            for j in range(real, columns):
                scores[i, j] = f32(0.0)
        _product(
            target, scores[:, :columns], values, k0 * head_width, head_width // PANEL, columns, zeros, codes, rounding
        )
        if k0 > 0:
            for i in range(rows):
                for d in range(head_width):
                    out[i, d] += block_out[i, d]
    for i in range(rows):
        norm = ONE / total[i]
        row = contiguous_row(context, i)  # context[i] typed contiguous: the loop vectorises
        for d in range(D):
            row[column + d] = out[i, d] * norm
