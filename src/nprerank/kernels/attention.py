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

from .fp32 import PANEL, TILE_ROWS, panels_product
from .rowwise import ONE, contiguous_row, exp32, f32, largest
from .threads import aligned, check_workspace, kernel, parallel_kernel, take

QUERY_BLOCK = 8 * TILE_ROWS  # queries attended together: their scores are [QUERY_BLOCK, KEY_BLOCK]
KEY_BLOCK = 512  # keys per block of the online softmax (a multiple of PANEL); most pairs fit in one


@kernel
def _attention_sizes(T, count, D):
    """Floats of (zeros, keys, values, scores, row state, out, block out) for an item of T keys
    and count queries. Only keys and values grow with T (2 T D floats); the scores of a block of
    queries against a block of keys are the largest square part: no [T, T] matrix is ever made."""
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
    """Views into one thread's workspace row: zeros [max(KEY_BLOCK, Dp)], keys [span / PANEL, D,
    PANEL], values [Dp * span] (one [Dp / PANEL, block, PANEL] array per block of keys, back to
    back), scores [rows, columns], highest and total [rows] (the online softmax's running max and
    sum), out and block_out [rows, Dp] (span, Dp: T, D rounded up to whole panels; rows, columns:
    a block of queries and of keys). Views only: nothing is allocated."""
    span, head_width = -(-T // PANEL) * PANEL, -(-D // PANEL) * PANEL
    rows, columns = min(count, QUERY_BLOCK), min(span, KEY_BLOCK)
    zeros_size, keys_size, values_size, scores_size, state_size, out_size, _ = _attention_sizes(T, count, D)
    at = aligned(zeros_size)  # where the next buffer starts
    zeros = scratch[:zeros_size]
    keys = scratch[at : at + keys_size].reshape((span // PANEL, D, PANEL))
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
    return zeros, keys, values, scores, highest, total, out, block_out


@parallel_kernel
def attention_forward(context, queries, qkv, width, offsets, query_offsets, H, workspace):
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
    """
    n_threads = workspace.shape[0]
    check_workspace(workspace, attention_floats(offsets, query_offsets, context.shape[1] // H))
    taken = np.zeros(1, dtype=np.int64)  # work items: (sequence, head) pairs
    for thread in prange(n_threads):
        attention_items(context, queries, qkv, width, offsets, query_offsets, H, workspace[thread], taken)


@kernel
def attention_items(context, queries, qkv, width, offsets, query_offsets, H, scratch, taken):
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
        zeros, keys, values, scores, highest, total, out, block_out = _attention_scratch(scratch, T, count, D)
        zeros[:] = 0  # no bias
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
                zeros,
                scores[:rows],
                highest[:rows],
                total[:rows],
                out[:rows],
                block_out[:rows],
            )
        item = take(taken)


@kernel
def _head_panels(keys, values, key, value, start, T, D, column):
    """Copy one head's keys and values (columns column : column + D of rows start : start + T)
    into panels for `_tile`, zero-padded to whole panels: keys as k^T [span / PANEL, D, PANEL];
    values block by block, each block of KEY_BLOCK keys a [Dp / PANEL, its keys, PANEL] array,
    so that the product with a block's probabilities reads one contiguous array.

    The innermost loops run over a whole row of a panel, PANEL values, a length LLVM knows: with
    a length known only at run time the copies took a quarter of attention's time at 512 tokens
    (and keys written a key at a time, a store every 128 bytes, as much again)."""
    head_width = -(-D // PANEL) * PANEL
    span = -(-T // PANEL) * PANEL
    # the head's own [T, D] views, indexed from 0 by loop counters: an index such as column + d
    # might be negative to Numba, and the wrap-around it then adds to every read kept these loops
    # scalar and branchy
    key, value = key[start : start + T, column : column + D], value[start : start + T, column : column + D]
    for p in range(span // PANEL):
        if (p + 1) * PANEL <= T:  # a whole panel: loops of a fixed length, which LLVM unrolls
            for d in range(D):
                for j in range(PANEL):
                    keys[p, d, j] = key[p * PANEL + j, d]
        else:  # the last keys, then zeros
            for d in range(D):
                for j in range(PANEL):
                    keys[p, d, j] = key[p * PANEL + j, d] if p * PANEL + j < T else f32(0.0)
    for k0 in range(0, span, KEY_BLOCK):
        block = _value_block(values, k0, span, head_width)  # [Dp / PANEL, columns, PANEL]
        for t in range(block.shape[1]):
            for q in range(head_width // PANEL):
                if k0 + t < T and (q + 1) * PANEL <= D:  # a whole row of a panel
                    for j in range(PANEL):
                        block[q, t, j] = value[k0 + t, q * PANEL + j]
                else:  # the columns past D, and the keys past T, are zeros
                    for j in range(PANEL):
                        d = q * PANEL + j
                        block[q, t, j] = value[k0 + t, d] if k0 + t < T and d < D else f32(0.0)


@kernel
def _value_block(values, k0, span, head_width):
    """The [Dp / PANEL, columns, PANEL] view of the values of the key block starting at k0."""
    columns = min(KEY_BLOCK, span - k0)
    return values[k0 * head_width : (k0 + columns) * head_width].reshape((head_width // PANEL, columns, PANEL))


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
def _attend_block(context, query, column, keys, values, T, zeros, scores, highest, total, out, block_out):
    """context[:, column : column + D] = softmax(q k^T / sqrt(D)) v for a block of queries, over
    the keys a block at a time with an online softmax (Milakov & Gimelshein 2018, as in
    FlashAttention): each row keeps its running max and sum of exponentials, and when a later
    block holds a larger score, what was summed so far is scaled by exp(old max - new max).
    Memory is a [rows, KEY_BLOCK] block of scores whatever T; with one block of keys (T <=
    KEY_BLOCK, most pairs) this is exactly reference.softmax's arithmetic. The division by the
    sum is done at the end, on D values per query instead of T."""
    rows, D = query.shape[0], keys.shape[1]
    head_width = out.shape[1]
    span = keys.shape[0] * PANEL
    scale = f32(1.0 / math.sqrt(D))
    q = query[:, column : column + D]
    for k0 in range(0, span, KEY_BLOCK):
        columns = min(KEY_BLOCK, span - k0)  # a whole number of panels
        real = min(columns, T - k0)  # the padded keys past T get no weight
        panels_product(scores, q, keys[k0 // PANEL : (k0 + columns) // PANEL], zeros, 0, columns // PANEL)
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
        panels_product(
            target, scores[:, :columns], _value_block(values, k0, span, head_width), zeros, 0, head_width // PANEL
        )
        if k0 > 0:
            for i in range(rows):
                for d in range(head_width):
                    out[i, d] += block_out[i, d]
    head = context[:, column : column + D]
    for i in range(rows):
        norm = ONE / total[i]
        # head[i] typed contiguous and indexed from 0: the loop vectorises. (Indexed as
        # context[i][column + d], an index that might be negative to Numba, LLVM stored the values
        # one lane at a time, a scatter: 3% of an int8 pass over 512-token pairs.)
        row = contiguous_row(head, i)
        for d in range(D):
            row[d] = out[i, d] * norm
