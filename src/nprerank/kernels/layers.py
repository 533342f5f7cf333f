"""A layer's steps after attention, and whole layers in one region, at every precision.

The rest of reference.encoder_layer after attention, in place on the hidden states:

    h = layer_norm(hidden + linear(context, attention_output))                 (post-LN)
    hidden = layer_norm(h + linear(gelu(linear(h, intermediate)), output))

is one kernel, output_feed_forward, for all three precisions: only the products differ, and
`product` picks the precision's own when Numba compiles it (fp32.panels_product; int8's, each
input quantized per row as int8.forward does; bf16's). At fp32 it equals reference.py
(tests/test_kernels.py); at int8, int8.forward's steps (tests/test_quantized.py, through
int8_model.py); at bf16, reference.py with bf16.BF16Linears' products (tests/test_bf16.py,
through bf16_model.py). encoder_layers runs whole layers (the query, key and value product,
attention and the rest) in one parallel region, at every precision: prepare_rows and linear_items
are its qkv product at the weights' precision, chosen as `product` is.

A product's weights travel as one tuple, bias last: (panels, bias) at fp32 and bf16,
(panels, column scales, corrections, bias) at int8 (int8.Int8Product's fields).

Legend:  N tokens in the packed batch, M rows, C hidden size, H heads, F feed-forward width,
         P panels.

Read next: model.py, which calls these in reference.py's order (int8_model.py and bf16_model.py
at the other precisions).
"""

from typing import NamedTuple

import numpy as np
from numba import prange
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from . import bf16, fp32, int8
from .attention import attention_floats, attention_items
from .fp32 import TILE_ROWS
from .rowwise import add_layer_norm, gelu32
from .threads import (
    FASTMATH,
    aligned,
    check_workspace,
    kernel,
    parallel_kernel,
    same_array_at,
    take,
    wait_for_all,
)

BLOCK_TILES = 8  # tiles of rows a thread carries through the feed-forward at once (112 rows with AVX-512)
STRIDE_PAD = 16  # floats added to each row of the [rows, F] activation (see _feed_forward_scratch)


# --- what differs between the precisions: a block's product, and the codes it needs ---------------
# The three precisions' steps differ only in how a block's product is made (and so in the scratch
# `codes` it needs), so the steps are one function, and `product` and `check_codes` are one name
# each for the three precisions' own. Compiled code calls the one its weights' dtype names:
# numba.extending.overload decides while Numba types the caller, so each compiled version holds
# one product and no branch, and Numba caches it like any kernel. (Passing the product as a jitted
# function argument would do the same, but such an argument's type is that one dispatcher object,
# so the cache, keyed by the argument types, misses in every new process: tried, each start would
# compile the layers again.)


def _fp32_product(out, x, weights, scales, codes, isa):
    panels, bias = weights
    fp32.panels_product(out, x, panels, bias, 0, panels.shape[0])


def _int8_product(out, x, weights, scales, codes, isa):
    K4 = summed_width(weights)  # K rounded up to whole groups of 4
    q = codes[: x.shape[0] * K4].reshape((x.shape[0], K4))
    int8.quantize_rows(q, scales, x)  # as int8.forward quantizes each product's input
    int8.panels_product(out, q, scales, *weights, 0, weights[0].shape[0], isa)


def _bf16_product(out, x, weights, scales, codes, isa):
    panels, bias = weights
    bf16.block_product(out, x, codes, panels, bias, isa)


def _fp32_rows(codes, scales, x, first, last, isa):
    pass  # fp32's products take x as it is


def _int8_rows(codes, scales, x, first, last, isa):
    int8.quantize_rows(codes[first:last], scales[first:last], x[first:last])  # as int8.forward does


def _bf16_rows(codes, scales, x, first, last, isa):
    if isa == bf16.AVX512BF16:  # vdpbf16ps multiplies bf16 by bf16; the other paths take fp32
        bf16.round_rows(codes[first:last], x[first:last])


def _fp32_items(out, x, codes, scales, weights, isa, taken):
    panels, bias = weights
    fp32.linear_items(out, 0, x, panels, bias, taken)


def _int8_items(out, x, codes, scales, weights, isa, taken):
    int8.linear_items(out, 0, codes[: x.shape[0]], scales, *weights, isa, taken)


def _bf16_items(out, x, codes, scales, weights, isa, taken):
    panels, bias = weights
    bf16.linear_items(out, 0, x, codes, panels, bias, isa, taken)


def _fp32_row_codes(codes, scales, x, weights, isa):
    pass


def _int8_row_codes(codes, scales, x, weights, isa):
    int8.check_activation(codes, isa)
    if codes.shape[0] < x.shape[0] or codes.shape[1] < summed_width(weights) or scales.shape[0] < x.shape[0]:
        raise ValueError("the row codes or scales are too small for the quantized rows")


def _bf16_row_codes(codes, scales, x, weights, isa):
    bf16.check_codes(codes, x.shape[0], x.shape[1], isa)


def _fp32_codes(codes, M, n_threads, output, up, isa):
    pass  # fp32 quantizes and rounds nothing


def _int8_codes(codes, M, n_threads, output, up, isa):
    check_workspace(codes, feed_forward_codes(M, n_threads, output, up))
    int8.check_activation(codes, isa)


def _bf16_codes(codes, M, n_threads, output, up, isa):
    check_workspace(codes, feed_forward_codes(M, n_threads, output, up) if isa == bf16.AVX512BF16 else 0)


class Steps(NamedTuple):
    """A precision's own functions behind this module's names (product, check_codes, ...)."""

    product: object
    check_codes: object
    prepare_rows: object
    linear_items: object
    check_row_codes: object


BY_PANELS = {  # the panels' dtype -> its precision's Steps
    np.dtype(np.float32): Steps(_fp32_product, _fp32_codes, _fp32_rows, _fp32_items, _fp32_row_codes),
    np.dtype(np.int8): Steps(_int8_product, _int8_codes, _int8_rows, _int8_items, _int8_row_codes),
    np.dtype(np.uint16): Steps(_bf16_product, _bf16_codes, _bf16_rows, _bf16_items, _bf16_row_codes),
}
BY_ACTIVATION = {  # prepare_rows' codes dtype -> its precision's: int8's paths take uint8 or int16
    np.dtype(np.float32): _fp32_rows,
    np.dtype(np.uint8): _int8_rows,
    np.dtype(np.int16): _int8_rows,
    np.dtype(np.uint16): _bf16_rows,
}
COMPILED = dict(fastmath=FASTMATH, error_model="numpy")  # threads.OPTIONS; the caller's cache holds them


def product(out, x, weights, scales, codes, isa):
    """out = x @ W + bias for one block of rows x [rows, K] float32, at the precision of `weights`
    (its panels' dtype: float32, int8 or uint16 bf16 bits). scales [rows] float32 and codes (flat)
    are the block's scratch for int8's quantized x and for bf16's rounded x on the avx512bf16 path;
    isa: the int8 or bf16 path. (This body runs only when JIT is disabled; compiled, the overload
    below picks the function instead.)"""
    BY_PANELS[weights[0].dtype].product(out, x, weights, scales, codes, isa)


def check_codes(codes, M, n_threads, output, up, isa):
    """ValueError unless codes [threads, S'] holds what the feed-forward's products need on M rows,
    at the precision of `output` (int8: feed_forward_codes values of its path's int8.ACTIVATION
    dtype; bf16's avx512bf16 path: as many uint16; fp32 and bf16's other paths: nothing)."""
    BY_PANELS[output[0].dtype].check_codes(codes, M, n_threads, output, up, isa)


def prepare_rows(codes, scales, x, first, last, isa):
    """What a product at the precision of `codes` needs of rows first..last-1 of x [M, K], made
    once for all its panels: int8 quantizes them into codes [M, K4 * 4] (its path's ACTIVATION
    dtype) and scales [M]; bf16's avx512bf16 path rounds them into codes [M, K] uint16; fp32 (and
    bf16's other paths) nothing. The precision is told by codes' dtype: float32 is fp32's."""
    BY_ACTIVATION[codes.dtype](codes, scales, x, first, last, isa)


def linear_items(out, x, codes, scales, weights, isa, taken):
    """One thread's share of out = x @ W + bias at the precision of `weights`, over all rows and
    panels (the (rows, panel) items of fp32.linear_items, int8's and bf16's), on the rows
    prepare_rows made: x [M, K] fp32, codes and scales as prepare_rows says."""
    BY_PANELS[weights[0].dtype].linear_items(out, x, codes, scales, weights, isa, taken)


def check_row_codes(codes, scales, x, weights, isa):
    """ValueError unless codes and scales hold what prepare_rows makes of x for `weights`."""
    BY_PANELS[weights[0].dtype].check_row_codes(codes, scales, x, weights, isa)


@overload(prepare_rows, jit_options=COMPILED)
def _compiled_prepare_rows(codes, scales, x, first, last, isa):
    return BY_ACTIVATION[as_dtype(codes.dtype)]


@overload(linear_items, jit_options=COMPILED)
def _compiled_linear_items(out, x, codes, scales, weights, isa, taken):
    return BY_PANELS[as_dtype(weights[0].dtype)].linear_items


@overload(check_row_codes, jit_options=COMPILED)
def _compiled_check_row_codes(codes, scales, x, weights, isa):
    return BY_PANELS[as_dtype(weights[0].dtype)].check_row_codes


@overload(product, jit_options=COMPILED)
def _compiled_product(out, x, weights, scales, codes, isa):
    return BY_PANELS[as_dtype(weights[0].dtype)].product


@overload(check_codes, jit_options=COMPILED)
def _compiled_check_codes(codes, M, n_threads, output, up, isa):
    return BY_PANELS[as_dtype(output[0].dtype)].check_codes


@kernel
def summed_width(weights):
    """K of a product, rounded up to its format's k-grouping: a panel row holds 1 value per column
    at fp32, 2 (a pair) at bf16, 4 (a group) at int8; the bias [P * columns] says the columns."""
    panels, bias = weights[0], weights[-1]
    return panels.shape[1] * (panels.shape[0] * panels.shape[2] // bias.shape[0])


# --- scratch, carved from each thread's row of the workspace (threads.py, "scratch memory") ---------


@kernel
def _rows_per_block(M, n_threads):
    """Rows in each of the feed-forward's blocks: blocks of at most BLOCK_TILES tiles, at least
    one block per thread, and as many blocks as whole rounds of the threads take: with AVX2's
    6-row tiles one 128-token pair made 3 blocks, and one of 2 threads sat idle for a third of
    the time (4 blocks measured about 20% faster, on a noisy host). Not smaller: every block reads
    all the layer's weights (21 MB), and with AVX-512's 14-row tiles four blocks instead of two
    measured slower."""
    blocks = (M + BLOCK_TILES * TILE_ROWS - 1) // (BLOCK_TILES * TILE_ROWS)
    blocks = min(M, (blocks + n_threads - 1) // n_threads * n_threads)  # whole rounds: one block per thread at least
    return (M + blocks - 1) // blocks


@kernel
def feed_forward_floats(M, n_threads, output, up):
    """Floats of one thread's workspace row for the feed-forward on M rows (_feed_forward_scratch),
    at any precision. output, up: the attention output's and the intermediate's weights."""
    rows = _rows_per_block(M, n_threads)
    return aligned(rows * output[-1].shape[0]) + aligned(rows * (up[-1].shape[0] + STRIDE_PAD)) + aligned(rows)


@kernel
def feed_forward_codes(M, n_threads, output, up):
    """Values of one thread's row of codes, where int8 quantizes (and bf16's avx512bf16 path rounds)
    a block's input to each product: the widest of C (rounded up to the format's k-grouping) and F
    (rounded up to whole panels). fp32, and bf16's other paths, need none."""
    return _rows_per_block(M, n_threads) * max(summed_width(output), up[-1].shape[0])


@kernel
def _feed_forward_scratch(scratch, rows, output, up):
    """Views into one thread's workspace row: projected [rows, C rounded up to whole panels],
    activation [rows, F rounded up + STRIDE_PAD] and scales [rows] (int8's row scales). Rows of
    the activation are F + STRIDE_PAD floats apart: at F = 3072 a row is 12 KB, a multiple of
    4 KB, and the 14 rows a tile reads at once would all fall into the same set of the L1 cache
    and evict each other (the product on it ran 25% slower). Views only: nothing is allocated."""
    out_width, inner_width = output[-1].shape[0], up[-1].shape[0] + STRIDE_PAD
    at = aligned(rows * out_width)
    projected = scratch[: rows * out_width].reshape((rows, out_width))
    activation = scratch[at : at + rows * inner_width].reshape((rows, inner_width))
    at += aligned(rows * inner_width)
    return projected, activation, scratch[at : at + rows]


# --- the steps after attention: one thread's part, at any precision -----------------------------


@kernel
def _feed_forward_items(
    hidden,
    context,
    output,
    norm1_weight,
    norm1_bias,
    up,
    down,
    norm2_weight,
    norm2_bias,
    eps,
    isa,
    n_threads,
    scratch,
    codes,
    taken,
):
    """One thread's part of the feed-forward: the blocks of rows it takes from `taken`, each carried
    through all the steps in its own row of the workspace, `scratch` (and of the codes, `codes`).

    Every step works row by row, so the work items are blocks of rows: one parallel region, where
    splitting each product by columns would need a region (and a wake-up of the threads, ~100 us)
    per step. Every block reads every weight, from the shared L3 cache after the first. A block
    has at most BLOCK_TILES tiles of rows, so the [rows, F] activation stays small (1.4 MB)."""
    M = hidden.shape[0]
    F = summed_width(down)  # F, rounded up to whole groups at int8 (the padding columns: gelu(0) = 0)
    rows_per_block = _rows_per_block(M, n_threads)
    projected, activation, scales = _feed_forward_scratch(scratch, rows_per_block, output, up)
    block = take(taken)
    while block * rows_per_block < M:
        r = block * rows_per_block
        h = hidden[r : r + rows_per_block]
        n = h.shape[0]
        product(projected[:n], context[r : r + n], output, scales[:n], codes, isa)
        add_layer_norm(h, projected[:n], norm1_weight, norm1_bias, eps)
        product(activation[:n], h, up, scales[:n], codes, isa)
        for i in range(n):
            for f in range(F):
                activation[i, f] = gelu32(activation[i, f])
        product(projected[:n], activation[:n, :F], down, scales[:n], codes, isa)
        add_layer_norm(h, projected[:n], norm2_weight, norm2_bias, eps)
        block = take(taken)


@parallel_kernel
def output_feed_forward(
    hidden, context, output, norm1_weight, norm1_bias, up, down, norm2_weight, norm2_bias, eps, isa, workspace, codes
):
    """The rest of reference.encoder_layer after attention (this module's docstring), in place on
    hidden [M, C], with the three products at the weights' precision.

    context [M, C]; output, up, down: the attention output's, intermediate's and output's weights,
    each a tuple, bias last: (panels, bias) from layout.LayerMatrices at fp32 and bf16 (bf16
    panels [P, K/2, 2 PANEL]), (panels, scale, correction, bias) of int8.Int8Product at int8;
    isa: isa.INT8.code(name) or isa.BF16.code(name) (anything at fp32); workspace [threads, S]
    float32, S >= feed_forward_floats(M, threads, output, up); codes [threads, S'] as check_codes
    says (at fp32 it may have no columns)."""
    n_threads = workspace.shape[0]
    check_workspace(workspace, feed_forward_floats(hidden.shape[0], n_threads, output, up))
    check_codes(codes, hidden.shape[0], n_threads, output, up, isa)
    taken = np.zeros(1, dtype=np.int64)
    for thread in prange(n_threads):
        _feed_forward_items(
            hidden,
            context,
            output,
            norm1_weight,
            norm1_bias,
            up,
            down,
            norm2_weight,
            norm2_bias,
            eps,
            isa,
            n_threads,
            workspace[thread],
            codes[thread],
            taken,
        )


# --- whole layers, in one parallel region ----------------------------------------------------------

ROWS_PER_ITEM = 32  # rows a thread quantizes (or rounds) at a time before the qkv product


def _two_parts(panels, scales, corrections, bias):
    return panels, bias  # fp32's and bf16's product tuple


def _four_parts(panels, scales, corrections, bias):
    return panels, scales, corrections, bias  # int8's (int8.Int8Product's fields)


def product_tuple(panels, scales, corrections, bias):
    """A product's weight tuple, as `product` and linear_items take it, from its four arrays (fp32
    and bf16 have no scales or corrections, and pass empty ones): Numba's parallel regions take
    tuples of arrays, not tuples of tuples, so encoder_layers gets each part apart."""
    return (_four_parts if panels.dtype == np.int8 else _two_parts)(panels, scales, corrections, bias)


@overload(product_tuple, jit_options=COMPILED)
def _compiled_product_tuple(panels, scales, corrections, bias):
    return _four_parts if as_dtype(panels.dtype) == np.dtype(np.int8) else _two_parts


@kernel
def _product_at(first, addresses):
    """A layer's product tuple (product_tuple) from the first layer's four parts, `first`, and
    that layer's four addresses (threads.addresses_of)."""
    return product_tuple(
        same_array_at(first[0], addresses[0]),
        same_array_at(first[1], addresses[1]),
        same_array_at(first[2], addresses[2]),
        same_array_at(first[3], addresses[3]),
    )


@parallel_kernel
def encoder_layers(
    x,
    qkv,
    context,
    offsets,
    width,
    H,
    eps,
    qkv_parts,
    output_parts,
    up_parts,
    down_parts,
    norms,
    addresses,
    isa,
    row_codes,
    row_scales,
    workspace,
    codes,
):
    """Whole encoder layers on x [N, C] in place, in one parallel region, at any precision: for
    each layer, prepare_rows and linear_items (query, key and value in one product),
    attention.attention_items and the feed-forward's blocks (_feed_forward_items), the threads
    meeting at a barrier after each step instead of leaving the region.

    qkv_parts, output_parts, up_parts, down_parts: the first layer's products, each as its four
    parts (panels, scales, corrections, bias: product_tuple's; fp32 and bf16 pass empty scales and
    corrections); norms: its (attention norm weight, bias, output norm weight, bias). addresses
    [L, 5, 4] int64: layer l's arrays of the same kinds in the same order, by address
    (threads.addresses_of; [l, 4] the norms). isa: the products' path (anything at fp32).
    row_codes [>= N, K'] and row_scales [>= N]: prepare_rows' output for the qkv product (float32
    [N, 0] at fp32). workspace [threads, S]: a row of scratch per thread, large enough for
    attention and the feed-forward; codes [threads, S'] as check_codes says.

    A region per step costs a wake-up of the sleeping threads each time (~110 us here, and on a
    busy host more, as a halted virtual CPU must be scheduled again): 33 of them for one pair's
    first 11 layers at fp32, 44 at int8 and bf16, which prepare x first; here 44 barriers at every
    precision (fp32's first step does nothing). At the barriers the threads spin
    instead, for microseconds. The caller must run it only where every prange iteration has a
    thread of its own (Numba's workqueue and OpenMP layers do so); otherwise the first barrier
    waits for ever.
    """
    L, n_threads, N = addresses.shape[0], workspace.shape[0], x.shape[0]
    output, up = product_tuple(*output_parts), product_tuple(*up_parts)
    check_workspace(
        workspace,
        max(attention_floats(offsets, offsets, context.shape[1] // H), feed_forward_floats(N, n_threads, output, up)),
    )
    check_codes(codes, N, n_threads, output, up, isa)
    check_row_codes(row_codes, row_scales, x, product_tuple(*qkv_parts), isa)
    taken = np.zeros((L, 4), dtype=np.int64)  # a work counter per layer and step
    arrivals = np.zeros(1, dtype=np.int64)  # barrier arrivals, all layers and steps together
    for thread in prange(n_threads):
        for layer in range(L):
            at = addresses[layer]
            item = take(taken[layer, 0:1])
            while item * ROWS_PER_ITEM < N:
                first = item * ROWS_PER_ITEM
                prepare_rows(row_codes, row_scales, x, first, min(N, first + ROWS_PER_ITEM), isa)
                item = take(taken[layer, 0:1])
            wait_for_all(arrivals, n_threads * (4 * layer + 1))
            linear_items(qkv, x, row_codes, row_scales, _product_at(qkv_parts, at[0]), isa, taken[layer, 1:2])
            wait_for_all(arrivals, n_threads * (4 * layer + 2))
            attention_items(context, qkv, qkv, width, offsets, offsets, H, workspace[thread], taken[layer, 2:3])
            wait_for_all(arrivals, n_threads * (4 * layer + 3))
            _feed_forward_items(
                x,
                context,
                _product_at(output_parts, at[1]),
                same_array_at(norms[0], at[4, 0]),
                same_array_at(norms[1], at[4, 1]),
                _product_at(up_parts, at[2]),
                _product_at(down_parts, at[3]),
                same_array_at(norms[2], at[4, 2]),
                same_array_at(norms[3], at[4, 3]),
                eps,
                isa,
                n_threads,
                workspace[thread],
                codes[thread],
                taken[layer, 3:4],
            )
            wait_for_all(arrivals, n_threads * (4 * layer + 4))
