"""Numba kernels for the fast forward pass: the matrix product, attention, elementwise work.

model.py runs the same steps as reference.py, but over a *packed* batch: the tokens of all B
sequences lie back to back in one [N, C] matrix, sequence b in rows offsets[b]:offsets[b+1], so
no pad token is ever multiplied. The matrix products (about 95% of the work) are made by one
kernel, `_tile`, on weights layout.py has packed into panels: it keeps a tile of results in vector
registers while it runs through K, which on AVX-512 reaches the core's peak (~100 GFLOP/s per
core here, more than OpenBLAS on the same shapes). The rest is done around it, each step in one
pass over memory, with the biases added as the products are made. Each parallel kernel is a
per-thread function that takes work items from a shared counter; encoder_layers runs those of
whole layers in one parallel region, the threads meeting at barriers instead of being woken. Every kernel names the
reference.py function it must equal; tests/test_kernels.py checks each one against that twin.

Legend:  N tokens in the packed batch, B sequences, offsets [B+1] row ranges of the sequences,
         C hidden size (768), H heads (12), D head size (C / H = 64), F feed-forward width (3072),
         M rows, K the summed dimension of a product, P panels of PANEL output columns.

Signatures: output first, then inputs, then sizes. Arrays are float32 with contiguous columns
(model.py checks the weights once at its boundary, never inside these loops). An output may be
the same array as an input where the docstring says so (every element is read before it is
written).

Read next: model.py, which calls these in reference.py's order.
"""

import math
import os

import numba
import numpy as np
from numba import njit, prange

# --- Numba options, decided once for every kernel -----------------------------------------------
# cache=True: machine code is saved beside this file (or in Numba's user cache when the package
#   folder is read-only), so a second process start loads it instead of compiling for seconds.
# fastmath: only "reassoc" (lets LLVM split a sum such as LayerNorm's mean into SIMD lanes; without
#   it a float reduction runs one add at a time) and "contract" (fused multiply-add). Not "nnan",
#   "ninf" or "afn": max/compare keep their meaning and no library function is approximated
#   behind our back. tests/test_kernels.py measures the effect against reference.py.
# error_model="numpy": a division by zero gives inf instead of a Python exception check per divide.
# Threading layer "workqueue": Numba's own pool, whose workers sleep between parallel regions
#   (starting a region costs about 100 us here, as the OS wakes them). The OpenMP layer starts
#   one in 2 us, but it shares the process's libgomp with torch: with both in one process torch
#   ran 5x slower (docs/performance.md). An explicit NUMBA_THREADING_LAYER in the environment
#   still wins.
FASTMATH = {"reassoc", "contract"}
OPTIONS = dict(cache=True, fastmath=FASTMATH, error_model="numpy")
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

kernel = njit(**OPTIONS)
parallel_kernel = njit(parallel=True, **OPTIONS)

f32 = np.float32
LOG2E = f32(1.4426950408889634)  # 1 / ln 2
LN2_HI = f32(0.693145751953125)  # ln 2 split in two (Cody & Waite) so k * LN2_HI is exact
LN2_LO = f32(1.428606765330187e-06)
EXP_MIN = f32(-87.0)  # exp below this is under fp32's smallest normal number
EXP_MAX = f32(88.0)  # and above this overflows
SQRT_HALF = f32(1.0 / math.sqrt(2.0))
HALF, ONE = f32(0.5), f32(1.0)
# Abramowitz & Stegun 7.1.26, the same erf reference.erf uses: |error| < 1.5e-7
ERF_P = f32(0.3275911)
ERF_A1, ERF_A2, ERF_A3 = f32(0.254829592), f32(-0.284496736), f32(1.421413741)
ERF_A4, ERF_A5 = f32(-1.453152027), f32(1.061405429)
# 1/k! for exp's Taylor polynomial on |r| <= ln2/2; the first term left out is r^8/8! < 6e-9
EXP_C2, EXP_C3, EXP_C4 = f32(1 / 2), f32(1 / 6), f32(1 / 24)
EXP_C5, EXP_C6, EXP_C7 = f32(1 / 120), f32(1 / 720), f32(1 / 5040)


# --- exp and erf that vectorise ----------------------------------------------------------------
# math.exp becomes a call into libm, one value at a time: LLVM cannot turn a loop around it into
# SIMD code (Numba's SVML is not a dependency). The softmax and the GELU both spend their time in
# exp, so we build exp from a polynomial and the float's exponent bits, which LLVM does vectorise.

if numba.config.DISABLE_JIT:

    def float_from_bits(bits):
        """The float32 whose IEEE bits are the int32 `bits` (plain Python when JIT is disabled)."""
        return np.array(bits, dtype=np.int32).view(np.float32)[()]

else:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def float_from_bits(typingctx, bits):
        """The float32 whose IEEE bits are the int32 `bits`: one register move, no memory."""
        signature = types.float32(types.int32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return signature, codegen


# --- handing out work: a shared counter ----------------------------------------------------------
# The parallel kernels below split their work into more items than threads, and each thread takes
# the next item from a shared counter until none are left (dynamic scheduling). On a shared VM one
# core is sometimes slowed or taken away for a while; a fixed half for each thread would then make
# the other wait at the end of every region, while this way it takes over the remaining items.

if numba.config.DISABLE_JIT:

    def take(counter):
        """counter[0] += 1, returning the value before (plain Python when JIT is disabled)."""
        counter[0] += 1
        return counter[0] - 1

    def peek(counter):
        """counter[0] (plain Python when JIT is disabled)."""
        return counter[0]

else:

    @intrinsic
    def take(typingctx, counter):
        """counter[0] += 1 as one atomic step, returning the value before: the number of the item
        this thread takes. counter: an int64 array made before the prange, so all threads share it."""
        signature = types.int64(counter)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", array.data, ir.IntType(64)(1), "acq_rel")

        return signature, codegen

    @intrinsic
    def peek(typingctx, counter):
        """counter[0], read as one atomic step that sees every write made before the last take."""
        signature = types.int64(counter)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.load_atomic(array.data, "acquire", 8)

        return signature, codegen


@kernel
def wait_for_all(arrivals, target):
    """A barrier: count this thread in (take), then wait until `target` arrivals in all. The threads
    spin rather than sleep, so they start the next step at once (a sleeping one takes ~100 us to
    wake here). Every write made before a thread arrives is visible to all after the barrier."""
    take(arrivals)
    while peek(arrivals) < target:
        pass


@kernel
def exp32(x):
    """exp(x) in float32 to ~1 ulp: 2^k * exp(r) with k = round(x / ln2), |r| <= ln2 / 2."""
    x = min(max(x, EXP_MIN), EXP_MAX)
    k = np.floor(x * LOG2E + HALF)  # np.floor stays float32; math.floor returns int64
    r = (x - k * LN2_HI) - k * LN2_LO
    p = ONE + r * (ONE + r * (EXP_C2 + r * (EXP_C3 + r * (EXP_C4 + r * (EXP_C5 + r * (EXP_C6 + r * EXP_C7))))))
    return p * float_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))  # 2^k built from its bits


@kernel
def gelu32(x):
    """reference.gelu for one float32: x * Phi(x) with the same erf formula (A&S 7.1.26)."""
    z = x * SQRT_HALF
    a = abs(z)
    t = ONE / (ONE + ERF_P * a)
    poly = t * (ERF_A1 + t * (ERF_A2 + t * (ERF_A3 + t * (ERF_A4 + t * ERF_A5))))
    erf_abs = ONE - poly * exp32(-a * a)
    erf = erf_abs if z >= 0 else -erf_abs
    return HALF * x * (ONE + erf)


# --- the kernels, in the order the forward pass uses them --------------------------------------


@parallel_kernel
def embeddings_forward(out, word, position, token_type, norm_weight, norm_bias, position_ids, token_type_ids, eps):
    """reference.embeddings over a packed batch: LN(word + position[position_ids] + token_type[token_type_ids]).

    out [N, C]; word [N, C] the gathered word rows (may be `out`); position [P, C]; token_type
    [types, C]; position_ids and token_type_ids [N], numbered per sequence as the architecture
    says (model.embedding_ids: RoBERTa's positions from pad_token_id + 1, BERT's from 0 and its
    two segments). Row by row: the rows are independent.
    """
    N, C = out.shape
    for n in prange(N):
        row, kind = position_ids[n], token_type_ids[n]
        for c in range(C):
            out[n, c] = word[n, c] + position[row, c] + token_type[kind, c]
        _layer_norm_row(out, n, norm_weight, norm_bias, eps)


@kernel
def _layer_norm_row(x, n, weight, bias, eps):
    """x[n] = reference.layer_norm(x[n]) in place: mean, biased variance, scale and shift."""
    C = x.shape[1]
    total = f32(0.0)
    for c in range(C):
        total += x[n, c]
    mean = total / f32(C)
    squares = f32(0.0)
    for c in range(C):
        squares += (x[n, c] - mean) * (x[n, c] - mean)
    rstd = f32(ONE / math.sqrt(squares / f32(C) + eps))  # variance of x - mean: two passes, no cancellation
    for c in range(C):
        x[n, c] = (x[n, c] - mean) * rstd * weight[c] + bias[c]


# --- matrix products on packed weight panels ----------------------------------------------------
# Nearly all the work is x @ W: four products per layer, and the two inside attention. layout.py
# stores each W [K, N] as panels [N / PANEL, K, PANEL]: PANEL output columns, all K rows of them
# back to back. `_tile` multiplies a tile of up to TILE_ROWS rows of x by one panel, keeping the
# TILE_ROWS x PANEL sums in vector registers for the whole K loop: each step loads PANEL weights
# once and uses them for every row. BLAS does the same internally, but packs W into such panels
# again on every call; ours are packed once, on disk. The shape fits the register file: with
# AVX-512's 32 registers of 16 floats, 14 rows x 2 registers of sums + 2 of weights + 1
# broadcast = 31 registers. Measured here (2 cores, AVX-512; docs/performance.md): ~105 GFLOP/s
# on one core and ~210 on two at 128 rows, where OpenBLAS gives 85-100 and 165-190. The shapes
# for AVX2 and 128-bit vectors follow the same register count but were not measured here.


def _tile_shape() -> tuple:
    """(rows, lanes per vector) of `_tile` for this CPU: its sums must fit the vector registers."""
    if numba.config.DISABLE_JIT:
        return 14, 16
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    if features.get("avx512f"):
        return 14, 16  # 32 registers of 16 floats
    if features.get("avx2"):
        return 6, 8  # 16 registers of 8 floats: 6 x 2 sums + 2 weights + 1 broadcast
    return 6, 4  # 128-bit vectors (SSE, NEON)


TILE_ROWS, LANES = _tile_shape()
PANEL = 2 * LANES  # output columns per panel: two vectors
TILE_COUNTS = sorted({TILE_ROWS, *(1 << b for b in range(TILE_ROWS.bit_length()) if 1 << b < TILE_ROWS)})  # _tile_rows
DEPTH = 256  # K is summed in slices of this many terms, added up in out: a long fp32 sum loses precision
PANEL_ROWS = 192  # rows of x per pass over a thread's panels: 576 KB at K = 768, kept in L2


@parallel_kernel
def linear_forward(out, column, x, panels, bias, n_threads):
    """out[:, column:] = x @ W + bias, reference.linear with W packed by layout.py.

    out [M, >= column + P * PANEL]; x [M, K]; panels [P, K, PANEL]; bias [P * PANEL]. The items
    are one panel's columns for up to PANEL_ROWS rows, so the weight is read once however few the
    rows are (one short pair: M = 128). Whole arrays come in and the views are taken here, so that
    Numba compiles one version whatever the shapes (a one-row view is C-contiguous to NumPy, and
    would otherwise be compiled anew, taking seconds, on the first one-pair batch).
    """
    taken = np.zeros(1, dtype=np.int64)
    for _ in prange(n_threads):
        _linear_items(out, column, x, panels, bias, taken)


@kernel
def _linear_items(out, column, x, panels, bias, taken):
    """One thread's part of linear_forward: the items it takes from the counter `taken`."""
    P, M = panels.shape[0], x.shape[0]
    items = P * ((M + PANEL_ROWS - 1) // PANEL_ROWS)  # (PANEL_ROWS rows, one panel) each
    item = take(taken)
    while item < items:
        rows, p = slice(item // P * PANEL_ROWS, (item // P + 1) * PANEL_ROWS), item % P
        _panels_product(out[rows, column:], x[rows], panels, bias, p, p + 1)
        item = take(taken)


@kernel
def _panels_product(out, x, panels, bias, first, last):
    """out[:, first * PANEL : last * PANEL] = x @ panels[first:last] + bias, one tile at a time.
    Panel by panel, so each panel ([K, PANEL], 96 KB at K = 768) is read from memory once and
    then from cache for every further tile of rows."""
    M, K = x.shape
    for p in range(first, last):
        columns = slice(p * PANEL, (p + 1) * PANEL)
        i = 0
        while i < M:
            n = _tile_rows(M - i)
            for k in range(0, K, DEPTH):
                depth = slice(k, k + DEPTH)
                _tile(out[i : i + n, columns], x[i : i + n, depth], panels[p, depth], bias[columns], k > 0)
            i += n


@kernel
def _tile_rows(remaining, most=TILE_ROWS):
    """Rows of the next tile: `most` (TILE_ROWS; int8_kernels passes its own), or for the last few
    rows the largest power of two that fits (13 rows go as 8 + 4 + 1). `_tile` has a loop for each
    of these counts only: one per count up to TILE_ROWS would do less work on ragged tiles but take
    seconds more to compile."""
    if remaining >= most:
        return most
    n = 1
    while 2 * n <= remaining:
        n *= 2
    return n


if numba.config.DISABLE_JIT:

    def _tile(out, x, panel, bias, accumulate):
        """out = out + x @ panel if accumulate else x @ panel + bias (plain NumPy when JIT is disabled)."""
        out[...] = out + x @ panel if accumulate else x @ panel + bias

else:
    from numba.core import cgutils

    @intrinsic
    def _tile(typingctx, out, x, panel, bias, accumulate):
        """out = x @ panel + bias, or out += x @ panel when accumulate, for one tile: out [rows,
        PANEL], x [rows, K], panel [K, PANEL], bias [PANEL]; rows in TILE_COUNTS; columns contiguous.
        A call to the LLVM function _tile_function defines, with each array's address and row stride."""
        signature = types.void(out, x, panel, bias, types.boolean)

        def codegen(context, builder, sig, args):
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:4], args)]
            rows, depth = (
                cgutils.unpack_tuple(builder, arrays[0].shape)[0],
                cgutils.unpack_tuple(builder, arrays[1].shape)[1],
            )
            out_, x_, panel_ = ((a.data, cgutils.unpack_tuple(builder, a.strides)[0]) for a in arrays[:3])
            builder.call(_tile_function(builder.module), [*out_, *x_, *panel_, arrays[3].data, rows, depth, args[4]])
            return context.get_dummy_value()

        return signature, codegen

    def _tile_function(module):
        """_tile's body, in LLVM IR because the point is where values live: the rows x 2 vectors of
        sums are loop-carried values (phi nodes), which LLVM keeps in registers. Numba has no vector
        type, and an accumulator array in Numba code would live in memory.

        One function per module, never inlined, so that its loops (one per row count in
        TILE_COUNTS) are compiled once per kernel rather than once per call site. Arguments: out,
        out's row stride in bytes, x, x's, panel, panel's, bias, rows, depth (K), accumulate.
        """
        name = f"nprerank_tile_{TILE_ROWS}x{PANEL}"
        if name in module.globals:
            return module.globals[name]
        i64, pointer, vector = ir.IntType(64), ir.FloatType().as_pointer(), ir.VectorType(ir.FloatType(), LANES)
        function = ir.Function(
            module, ir.FunctionType(ir.VoidType(), [pointer, i64] * 3 + [pointer, i64, i64, ir.IntType(1)]), name
        )
        function.linkage = "internal"
        function.attributes.add("noinline")
        out, out_stride, x, x_stride, panel, panel_stride, bias, rows, depth, accumulate = function.args
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        multiply_add = cgutils.get_or_insert_function(  # fused where the CPU has FMA
            module, ir.FunctionType(vector, [vector] * 3), f"llvm.fmuladd.v{LANES}f32"
        )

        def address(base, stride, row, column):  # float* to base[row, column]: rows `stride` bytes apart
            row_start = builder.gep(builder.bitcast(base, ir.IntType(8).as_pointer()), [builder.mul(row, stride)])
            return builder.gep(builder.bitcast(row_start, pointer), [column])

        def vector_at(pointer_, v):  # pointer to the v-th vector from pointer_ on
            return builder.bitcast(builder.gep(pointer_, [i64(v * LANES)]), vector.as_pointer())

        def tile_loop(count):  # the K loop and the stores for a tile of `count` rows
            first_block, loop, done = (
                builder.block,
                builder.append_basic_block("k"),
                builder.append_basic_block("store"),
            )
            builder.cbranch(builder.icmp_signed(">", depth, i64(0)), loop, done)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            sums = [builder.phi(vector) for _ in range(2 * count)]
            weights = address(panel, panel_stride, k, i64(0))
            w = [
                builder.load(vector_at(weights, v), align=4) for v in range(2)
            ]  # this k's PANEL weights, for every row
            updated = []
            for r in range(count):
                value = builder.load(address(x, x_stride, i64(r), k))
                spread = builder.shuffle_vector(builder.insert_element(undefined, value, i64(0)), undefined, broadcast)
                updated += [builder.call(multiply_add, [spread, w[v], sums[2 * r + v]]) for v in range(2)]
            following = builder.add(k, i64(1))
            k.add_incoming(i64(0), first_block)
            k.add_incoming(following, loop)
            for i, (phi, then) in enumerate(zip(sums, updated)):
                phi.add_incoming(start[i % 2], first_block)
                phi.add_incoming(then, loop)
            builder.cbranch(builder.icmp_signed("<", following, depth), loop, done)

            builder.position_at_end(done)
            final = [builder.phi(vector) for _ in updated]
            for i, (phi, then) in enumerate(zip(final, updated)):
                phi.add_incoming(start[i % 2], first_block)
                phi.add_incoming(then, loop)
            for r in range(count):
                row = address(out, out_stride, i64(r), i64(0))
                for v in range(2):
                    target = vector_at(row, v)
                    total = builder.select(
                        accumulate, builder.fadd(final[2 * r + v], builder.load(target, align=4)), final[2 * r + v]
                    )
                    builder.store(total, target, align=4)
            builder.branch(after)

        undefined = ir.Constant(vector, ir.Undefined)
        broadcast = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)  # lane 0 to every lane
        # the sums start at the bias, or at zero for a further slice of K, added to out at the end
        zero = ir.Constant(vector, [0.0] * LANES)
        start = [builder.select(accumulate, zero, builder.load(vector_at(bias, v), align=4)) for v in range(2)]
        after = builder.append_basic_block("after")
        choice = builder.switch(rows, after)  # one loop per row count that _tile_rows gives
        for count in TILE_COUNTS:
            block = builder.append_basic_block(f"rows{count}")
            choice.add_case(i64(count), block)
            builder.position_at_end(block)
            tile_loop(count)
        builder.position_at_end(after)
        builder.ret_void()
        return function


# --- scratch memory: made by the caller, before any parallel region ----------------------------
# Attention and the feed-forward need scratch arrays per thread (a head's keys and values in
# panels, its scores; a block's projections and activation). An allocation that fails inside a
# prange body cannot be reported: the thread that failed leaves the region, and the others wait
# for it at the next barrier for ever, or skip its work and return wrong numbers. So no kernel
# allocates inside a region: the caller makes a `workspace` [threads, S] before it (a failure is
# then a MemoryError there), each thread carves its buffers out of its own row, and the sizes
# below say how large S must be. tests/test_engine_faults.py checks the compiled regions for
# allocations, so none can come back unnoticed.

SCRATCH_ALIGN = 16  # floats: every buffer in a workspace starts on a 64-byte cache line
BLOCK_TILES = 8  # tiles of rows a thread carries through output_feed_forward at once (112 rows with AVX-512)
STRIDE_PAD = 16  # floats added to each row of the [rows, F] activation (see output_feed_forward)


def make_workspace(n_threads: int, floats: int) -> np.ndarray:
    """An uninitialised float32 workspace [n_threads, S], S >= floats, each row 64-byte aligned.
    Allocated here, outside any parallel region: MemoryError if it does not fit."""
    S = -(-max(int(floats), 1) // SCRATCH_ALIGN) * SCRATCH_ALIGN
    flat = np.empty(n_threads * S + SCRATCH_ALIGN, dtype=np.float32)
    start = (-flat.ctypes.data // 4) % SCRATCH_ALIGN  # the first float on a cache-line boundary
    return flat[start : start + n_threads * S].reshape(n_threads, S)


@kernel
def _aligned(floats):
    return -(-floats // SCRATCH_ALIGN) * SCRATCH_ALIGN


@kernel
def _check_workspace(workspace, floats):
    # raised before the region starts, where an exception reaches the caller
    if workspace.shape[1] < floats:
        raise ValueError("the workspace is too small for this batch")


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
        total += _aligned(size)
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
    at = _aligned(zeros_size)  # where the next buffer starts
    zeros = scratch[:zeros_size]
    keys = scratch[at : at + keys_size].reshape((span // PANEL, D, PANEL))
    at += _aligned(keys_size)
    values = scratch[at : at + values_size]
    at += _aligned(values_size)
    scores = scratch[at : at + scores_size].reshape((rows, columns))
    at += _aligned(scores_size)
    highest, total = scratch[at : at + rows], scratch[at + rows : at + 2 * rows]
    at += _aligned(state_size)
    out = scratch[at : at + out_size].reshape((rows, head_width))
    at += _aligned(out_size)
    block_out = scratch[at : at + out_size].reshape((rows, head_width))
    return zeros, keys, values, scores, highest, total, out, block_out


@kernel
def feed_forward_floats(M, n_threads, output_panels, up_panels):
    """Floats of one thread's workspace row for output_feed_forward on M rows."""
    rows = _rows_per_block(M, n_threads)
    return _aligned(rows * output_panels.shape[0] * PANEL) + _aligned(rows * (up_panels.shape[0] * PANEL + STRIDE_PAD))


@kernel
def _feed_forward_scratch(scratch, rows, output_panels, up_panels):
    """Views into one thread's workspace row: projected [rows, C rounded up to whole panels] and
    activation [rows, F rounded up + STRIDE_PAD]. Rows of the activation are F + STRIDE_PAD
    floats apart: at F = 3072 a row is 12 KB, a multiple of 4 KB, and the 14 rows a tile reads at
    once would all fall into the same set of the L1 cache and evict each other (the product on
    it ran 25% slower)."""
    out_width, inner_width = output_panels.shape[0] * PANEL, up_panels.shape[0] * PANEL + STRIDE_PAD
    start = _aligned(rows * out_width)
    projected = scratch[: rows * out_width].reshape((rows, out_width))
    activation = scratch[start : start + rows * inner_width].reshape((rows, inner_width))
    return projected, activation


@parallel_kernel
def attention_forward(context, queries, qkv, width, offsets, query_offsets, H, workspace):
    """softmax(q k^T / sqrt(D)) v of reference.attention, per packed sequence and head.

    context [Q, C]; the projections, biases included: queries[:, :C] [Q, C], and the keys and
    values qkv[:, width : width + C] and qkv[:, 2 * width : 2 * width + C] [N, C] (width: C rounded
    up to whole panels; queries may be qkv itself). Sequence b's keys are rows offsets[b]:
    offsets[b+1]; its queries are rows query_offsets[b]:query_offsets[b+1], the first tokens of
    the sequence in order (all of them, or only the first when the caller needs just the
    classification token). workspace [threads, S]: a row of scratch per thread, S >=
    attention_floats(offsets, query_offsets, D) (make it with `make_workspace`).

    Both products go through `_tile`, like the linear layers: the head's keys and values are
    first copied into panels (zero-padded to whole panels), a few KB per head. The softmax's
    division is done after the product with v: on D values per query instead of T.
    """
    n_threads = workspace.shape[0]
    _check_workspace(workspace, attention_floats(offsets, query_offsets, context.shape[1] // H))
    taken = np.zeros(1, dtype=np.int64)  # work items: (sequence, head) pairs
    for thread in prange(n_threads):
        _attention_items(context, queries, qkv, width, offsets, query_offsets, H, workspace[thread], taken)


@kernel
def _attention_items(context, queries, qkv, width, offsets, query_offsets, H, scratch, taken):
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
        _head_panels(zeros, keys, values, key, value, start, T, h * D)
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
def _head_panels(zeros, keys, values, key, value, start, T, column):
    """Copy one head's keys and values (columns column : column + D of rows start : start + T)
    into panels for `_tile`, zero-padded to whole panels: keys as k^T [span / PANEL, D, PANEL];
    values block by block, each block of KEY_BLOCK keys a [Dp / PANEL, its keys, PANEL] array,
    so that the product with a block's probabilities reads one contiguous array."""
    D = keys.shape[1]
    head_width = -(-D // PANEL) * PANEL
    zeros[:] = 0  # no bias
    keys[:] = 0
    values[:] = 0
    for t in range(T):
        for d in range(D):
            keys[t // PANEL, d, t % PANEL] = key[start + t, column + d]
    span = keys.shape[0] * PANEL
    for k0 in range(0, span, KEY_BLOCK):
        block = _value_block(values, k0, span, head_width)
        for q in range(head_width // PANEL):
            for t in range(k0, min(T, k0 + KEY_BLOCK)):
                for j in range(min(PANEL, D - q * PANEL)):
                    block[q, t - k0, j] = value[start + t, column + q * PANEL + j]


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
        _panels_product(scores, q, keys[k0 // PANEL : (k0 + columns) // PANEL], zeros, 0, columns // PANEL)
        target = out if k0 == 0 else block_out
        for i in range(rows):
            block_highest = scores[i, 0]
            for j in range(1, real):
                block_highest = max(block_highest, scores[i, j])
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
        _panels_product(
            target, scores[:, :columns], _value_block(values, k0, span, head_width), zeros, 0, head_width // PANEL
        )
        if k0 > 0:
            for i in range(rows):
                for d in range(head_width):
                    out[i, d] += block_out[i, d]
    for i in range(rows):
        norm = ONE / total[i]
        for d in range(D):
            context[i, column + d] = out[i, d] * norm


@parallel_kernel
def output_feed_forward(
    hidden,
    context,
    output_panels,
    output_bias,
    norm1_weight,
    norm1_bias,
    up_panels,
    up_bias,
    down_panels,
    down_bias,
    norm2_weight,
    norm2_bias,
    eps,
    workspace,
):
    """The rest of reference.encoder_layer after attention, in place on hidden [M, C]:

        h = layer_norm(hidden + linear(context, attention_output))                 (post-LN)
        hidden = layer_norm(h + linear(gelu(linear(h, intermediate)), output))

    context [M, C]; *_panels and *_bias: layout.py's packed weights; workspace [threads, S]: a row
    of scratch per thread, S >= feed_forward_floats(M, threads, output_panels, up_panels). Every
    step works row by row, so the work items are blocks of rows, and a thread carries its block
    through all the steps: one parallel region, where splitting each product by columns would
    need a region (and a wake-up of the threads, ~100 us) per step. Every block reads every
    weight, from the shared L3 cache after the first. A block has at most BLOCK_TILES tiles of
    rows, so the [rows, F] activation stays small (1.4 MB) whatever the batch.
    """
    n_threads = workspace.shape[0]
    _check_workspace(workspace, feed_forward_floats(hidden.shape[0], n_threads, output_panels, up_panels))
    taken = np.zeros(1, dtype=np.int64)
    for thread in prange(n_threads):
        _feed_forward_items(
            hidden,
            context,
            output_panels,
            output_bias,
            norm1_weight,
            norm1_bias,
            up_panels,
            up_bias,
            down_panels,
            down_bias,
            norm2_weight,
            norm2_bias,
            eps,
            n_threads,
            workspace[thread],
            taken,
        )


@kernel
def _feed_forward_items(
    hidden,
    context,
    output_panels,
    output_bias,
    norm1_weight,
    norm1_bias,
    up_panels,
    up_bias,
    down_panels,
    down_bias,
    norm2_weight,
    norm2_bias,
    eps,
    n_threads,
    scratch,
    taken,
):
    """One thread's part of output_feed_forward: the blocks of rows it takes from `taken`, in its
    own row of the workspace, `scratch`."""
    M = hidden.shape[0]
    F = down_panels.shape[1]
    rows_per_block = _rows_per_block(M, n_threads)
    projected, activation = _feed_forward_scratch(scratch, rows_per_block, output_panels, up_panels)
    block = take(taken)
    while block * rows_per_block < M:
        r = block * rows_per_block
        h = hidden[r : r + rows_per_block]
        n = h.shape[0]
        _panels_product(projected[:n], context[r : r + n], output_panels, output_bias, 0, output_panels.shape[0])
        _add_layer_norm(h, projected[:n], norm1_weight, norm1_bias, eps)
        _panels_product(activation[:n], h, up_panels, up_bias, 0, up_panels.shape[0])
        for i in range(n):
            for f in range(F):
                activation[i, f] = gelu32(activation[i, f])
        _panels_product(projected[:n], activation[:n, :F], down_panels, down_bias, 0, down_panels.shape[0])
        _add_layer_norm(h, projected[:n], norm2_weight, norm2_bias, eps)
        block = take(taken)


@kernel
def _rows_per_block(M, n_threads):
    """Rows in each of output_feed_forward's blocks: blocks of at most BLOCK_TILES tiles, and at
    least one block per thread. Not smaller: every block reads all the layer's weights (21 MB),
    and at one 128-token pair four blocks instead of two measured slower, however well they
    share the work."""
    blocks = max((M + BLOCK_TILES * TILE_ROWS - 1) // (BLOCK_TILES * TILE_ROWS), min(n_threads, M))
    return (M + blocks - 1) // blocks


@parallel_kernel
def encoder_layers(
    x,
    qkv,
    context,
    offsets,
    width,
    H,
    eps,
    qkv_panels,
    qkv_bias,
    output_panels,
    output_bias,
    norm1_weight,
    norm1_bias,
    up_panels,
    up_bias,
    down_panels,
    down_bias,
    norm2_weight,
    norm2_bias,
    workspace,
):
    """Whole encoder layers on x [N, C] in place, in one parallel region: for each layer,
    linear_forward (query, key, value), attention_forward and output_feed_forward, the threads
    meeting at a barrier after each step instead of leaving the region. The weight arguments are
    tuples with one array per layer (layout.LayerMatrices' fields, the Layer's LayerNorms).
    workspace [threads, S]: a row of scratch per thread, large enough for both steps that use it.

    A region per step costs a wake-up of the sleeping threads each time (~110 us here, and on a
    busy host more, as a halted virtual CPU must be scheduled again): 36 of them for one pair's
    first 11 layers. At the barriers the threads spin instead, for microseconds. The caller must
    run it only where every prange iteration has a thread of its own (Numba's workqueue and OpenMP
    layers do so); otherwise the first barrier waits for ever.
    """
    L, n_threads = len(qkv_panels), workspace.shape[0]
    _check_workspace(
        workspace,
        max(
            attention_floats(offsets, offsets, context.shape[1] // H),
            feed_forward_floats(x.shape[0], n_threads, output_panels[0], up_panels[0]),
        ),
    )
    taken = np.zeros((L, 3), dtype=np.int64)  # a work counter per layer and step
    arrivals = np.zeros(1, dtype=np.int64)  # barrier arrivals, all layers and steps together
    for thread in prange(n_threads):
        for layer in range(L):
            _linear_items(qkv, 0, x, qkv_panels[layer], qkv_bias[layer], taken[layer, 0:1])
            wait_for_all(arrivals, n_threads * (3 * layer + 1))
            _attention_items(context, qkv, qkv, width, offsets, offsets, H, workspace[thread], taken[layer, 1:2])
            wait_for_all(arrivals, n_threads * (3 * layer + 2))
            _feed_forward_items(
                x,
                context,
                output_panels[layer],
                output_bias[layer],
                norm1_weight[layer],
                norm1_bias[layer],
                up_panels[layer],
                up_bias[layer],
                down_panels[layer],
                down_bias[layer],
                norm2_weight[layer],
                norm2_bias[layer],
                eps,
                n_threads,
                workspace[thread],
                taken[layer, 2:3],
            )
            wait_for_all(arrivals, n_threads * (3 * layer + 3))


@kernel
def _add_layer_norm(h, sublayer, weight, bias, eps):
    """h = reference.layer_norm(h + sublayer) row by row, in place; sublayer may have extra columns."""
    for n in range(h.shape[0]):
        for c in range(h.shape[1]):
            h[n, c] += sublayer[n, c]
        _layer_norm_row(h, n, weight, bias, eps)


@kernel
def classification_head_forward(logits, first, dense_weight, dense_bias, out_weight, out_bias):
    """reference.classification_head on the first tokens: out_proj(tanh(dense(h0))).

    logits [B]; first [B, C] the hidden state of each sequence's <s> token; dense_weight [C, C]
    stored [out, in]; dense_bias [C]; out_weight [1, C]; out_bias [1]. A few hundred thousand
    multiply-adds per pair: too small for BLAS to pay off, so plain loops.
    """
    B, C = first.shape
    for b in range(B):
        logit = out_bias[0]
        for o in range(C):
            pre = dense_bias[o]
            for c in range(C):
                pre += first[b, c] * dense_weight[o, c]
            logit += math.tanh(pre) * out_weight[0, o]
        logits[b] = logit
