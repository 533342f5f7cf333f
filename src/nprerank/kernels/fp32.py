"""The fp32 matrix product on packed weight panels: linear_forward and its tile, `_tile`.

The matrix products are about 95% of the forward pass's work: four per layer, and the two inside
attention (attention.py). At fp32 all of them are made by one kernel, `_tile`, on weights
layout.py has packed into panels: it keeps a tile of results in vector registers while it runs
through K, which on AVX-512 reaches the core's peak (~100 GFLOP/s per core here, more than OpenBLAS on the
same shapes). The biases are added as the products are made. linear_forward equals
reference.linear (tests/test_kernels.py); the plain-NumPy `_tile` used when JIT is disabled is
its twin line by line.

Legend:  M rows, K the summed dimension of a product, P panels of PANEL output columns.

Signatures: output first, then inputs, then sizes. Arrays are float32 with contiguous columns
(model.py checks the weights once at its boundary, never inside these loops).

Read next: attention.py, which multiplies a head's queries, keys and values with panels_product.
"""

import numba
import numpy as np
from numba import prange

from .isa import fp32_tile_shape
from .threads import kernel, parallel_kernel, take

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
# for AVX2 and 128-bit vectors (isa.fp32_tile_shape) follow the same register count but were not
# measured here.

TILE_ROWS, LANES = fp32_tile_shape()
PANEL = 2 * LANES  # output columns per panel: two vectors
DEPTH = 256  # K is summed in slices of this many terms, added up in out: a long fp32 sum loses precision
PANEL_ROWS = 192  # rows of x per pass over a thread's panels: 576 KB at K = 768, kept in L2


def tile_row_counts(most: int) -> list:
    """The row counts tile_rows(remaining, most) can give: `most`, and the powers of two below it.
    A tile has one loop for each (here, and on every int8 and bf16 path)."""
    return sorted({most, *(1 << b for b in range(most.bit_length()) if 1 << b < most)})


TILE_COUNTS = tile_row_counts(TILE_ROWS)


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
        linear_items(out, column, x, panels, bias, taken)


@kernel
def linear_items(out, column, x, panels, bias, taken):
    """One thread's part of linear_forward: the items it takes from the counter `taken`."""
    P, M = panels.shape[0], x.shape[0]
    items = P * ((M + PANEL_ROWS - 1) // PANEL_ROWS)  # (PANEL_ROWS rows, one panel) each
    item = take(taken)
    while item < items:
        rows, p = slice(item // P * PANEL_ROWS, (item // P + 1) * PANEL_ROWS), item % P
        panels_product(out[rows, column:], x[rows], panels, bias, p, p + 1)
        item = take(taken)


@kernel
def panels_product(out, x, panels, bias, first, last):
    """out[:, first * PANEL : last * PANEL] = x @ panels[first:last] + bias, one tile at a time.
    Panel by panel, so each panel ([K, PANEL], 96 KB at K = 768) is read from memory once and
    then from cache for every further tile of rows."""
    M, K = x.shape
    for p in range(first, last):
        columns = slice(p * PANEL, (p + 1) * PANEL)
        i = 0
        while i < M:
            n = tile_rows(M - i)
            for k in range(0, K, DEPTH):
                depth = slice(k, k + DEPTH)
                _tile(out[i : i + n, columns], x[i : i + n, depth], panels[p, depth], bias[columns], k > 0)
            i += n


@kernel
def tile_rows(remaining, most=TILE_ROWS):
    """Rows of the next tile: `most` (TILE_ROWS; int8.py and bf16.py pass their own), or for the last few
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
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

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

    def carried_loop(builder, trip_count, start, step):
        """`for g in range(trip_count): sums = step(g, sums)` in LLVM IR, the sums starting at the
        values `start`: they are loop-carried values (phi nodes), which LLVM keeps in registers, the
        point of every tile. step(g, sums) emits one iteration's code (no new blocks) and returns
        the new sums. Returns the sums after the loop (`start` when trip_count <= 0), the builder
        positioned after it. The K loop of this tile and of int8's and bf16's."""
        i64 = ir.IntType(64)
        first_block, loop, done = builder.block, builder.append_basic_block("k"), builder.append_basic_block("store")
        builder.cbranch(builder.icmp_signed(">", trip_count, i64(0)), loop, done)
        builder.position_at_end(loop)
        g = builder.phi(i64)
        sums = [builder.phi(value.type) for value in start]
        updated = step(g, sums)
        following = builder.add(g, i64(1))
        g.add_incoming(i64(0), first_block)
        g.add_incoming(following, loop)
        for phi, initial, then in zip(sums, start, updated):
            phi.add_incoming(initial, first_block)
            phi.add_incoming(then, loop)
        builder.cbranch(builder.icmp_signed("<", following, trip_count), loop, done)
        builder.position_at_end(done)
        final = [builder.phi(value.type) for value in start]
        for phi, initial, then in zip(final, start, updated):
            phi.add_incoming(initial, first_block)
            phi.add_incoming(then, loop)
        return final

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
            def step(k, sums):  # one k: this k's PANEL weights, for every row
                weights = address(panel, panel_stride, k, i64(0))
                w = [builder.load(vector_at(weights, v), align=4) for v in range(2)]
                updated = []
                for r in range(count):
                    value = builder.load(address(x, x_stride, i64(r), k))
                    spread = builder.shuffle_vector(
                        builder.insert_element(undefined, value, i64(0)), undefined, broadcast
                    )
                    updated += [builder.call(multiply_add, [spread, w[v], sums[2 * r + v]]) for v in range(2)]
                return updated

            final = carried_loop(builder, depth, start * count, step)
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
        choice = builder.switch(rows, after)  # one loop per row count that tile_rows gives
        for count in TILE_COUNTS:
            block = builder.append_basic_block(f"rows{count}")
            choice.add_case(i64(count), block)
            builder.position_at_end(block)
            tile_loop(count)
        builder.position_at_end(after)
        builder.ret_void()
        return function
