"""The bf16 product: on bf16 weight panels, per instruction set, and its plain-loop twin.

Each kernel equals a function of nprerank/bf16.py, the format and its plain-NumPy oracle (named in
its docstring; tests/test_bf16.py checks them): the format (bf16 weights packed in k-pairs, fp32
sums) is defined there. layers.py runs a layer's three other products with block_product. The
product's inner loop, `_bf16_tile`, is LLVM IR like fp32._tile, in one version per instruction
set (isa.BF16). All versions are compiled into the same machine code, each LLVM function carrying
the target features it needs, and `isa` (an integer argument, isa.BF16.code(name)) picks one at
run time: a forced path needs no recompile, and a CPU that cannot run a path still compiles it.

| path       | tile (rows x columns) | per k-pair and row                                            |
|------------|-----------------------|---------------------------------------------------------------|
| avx512bf16 | 14 x 32               | vdpbf16ps: the pair's two bf16 products summed into 16 lanes   |
| avx2       | 6 x 16                | weights widened in the register, two fp32 FMAs on 8 lanes      |
| generic    | 6 x 8                 | the same in LLVM's portable 4-lane vectors (SSE, NEON)         |

avx512bf16 takes its activations rounded to bf16 (round_rows, once per product's input: vdpbf16ps
multiplies bf16 by bf16); the others take them in fp32 and widen the weights: with a column's
pair in one 32-bit lane, a shift left by 16 (vpslld) gives the even k's fp32 weight and a mask
of the upper half (vpand 0xffff0000) the odd k's. No vpmovzxwd is needed: the pair layout that
vdpbf16ps wants already puts each bf16 value in a 32-bit lane.

The sums start at the bias (or 0 for a further slice of K, added to out at the store, as
fp32._tile does) and live in vector registers (loop-carried values) for the whole K loop.
The widening costs two integer operations per 8 or 16 weights, which vpslld and vpand take
straight from memory, so the sums keep their registers: 6 x 2 + 2 widened weights + 1 broadcast
= 15 of AVX2's 16.

Legend:  M rows, K summed dimension (K2 = K / 2 pairs), P panels.

Read next: layers.py, which runs a layer's steps after attention at every precision; then
bf16_model.py, which calls these.
"""

import numba
import numpy as np
from numba import prange

from ..bf16 import PAIR
from .fp32 import DEPTH, PANEL, PANEL_ROWS, tile_row_counts, tile_rows  # DEPTH, K's slices: an even number, whole pairs
from .isa import BF16
from .rowwise import bits_of_float, contiguous_row, f32, float_from_bits
from .threads import kernel, parallel_kernel, take

AVX512BF16 = BF16.code("avx512bf16")  # the path that takes its activations as bf16
TILE_ROWS = (14, 6, 6)  # avx512bf16: 14 x 2 zmm sums + 2 weights + 1 broadcast = 31 of 32
LANES = (16, 8, 4)  # fp32 lanes per vector; a tile is two vectors wide
ACTIVATION = (np.uint16, np.float32, np.float32)  # what each path's x is: bf16 bits, or fp32
ACTIVATION_BYTES = tuple(np.dtype(dtype).itemsize for dtype in ACTIVATION)  # what Numba code can index


@kernel
def tile_columns(isa):
    """Output columns of path `isa`'s tile: two vectors, never wider than a panel (PANEL is 16 on
    an AVX2 host, where the 32-column path cannot run anyway)."""
    return min(2 * LANES[isa], PANEL)


def tile_counts(isa: int) -> list:
    """The row counts fp32.tile_rows can give for path `isa`: the tile has one loop for each."""
    return tile_row_counts(TILE_ROWS[isa])


# --- activations rounded to bf16 (the avx512bf16 path only) ------------------------------------


@kernel
def round_rows(codes, x):
    """codes [M, >= K] = bf16.to_bf16(x [M, K]): round to nearest, ties to even, row by row."""
    for m in range(x.shape[0]):
        row = contiguous_row(x, m)  # so that the loop vectorises when x is a slice of columns
        for k in range(x.shape[1]):
            codes[m, k] = bf16_bits(row[k])


@kernel
def bf16_bits(x):
    """bf16.to_bf16 of one float32: its upper 16 bits, rounded to nearest, ties to even."""
    bits = bits_of_float(x)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


# --- the product ---------------------------------------------------------------------------------


@kernel
def linear_bf16_naive(out, x, panels, bias, round_activations):
    """The product's plain-loop twin (bf16.linear_bf16 in loops): out [M, P PANEL] = x [M, K] @
    widen(W) + bias, each column's sum in fp32 in k order; x rounded to bf16 first when
    round_activations (as the avx512bf16 path does)."""
    M, K = x.shape
    for m in range(M):
        for p in range(panels.shape[0]):
            for j in range(PANEL):
                total = f32(0.0)
                for k in range(K):
                    value = x[m, k]
                    if round_activations:
                        bits = bits_of_float(value)
                        bits = (
                            (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                        ) << np.uint32(16)
                        value = float_from_bits(np.int32(bits))
                    weight = float_from_bits(
                        np.int32(np.uint32(panels[p, k // PAIR, PAIR * j + k % PAIR]) << np.uint32(16))
                    )
                    total += value * weight
                out[m, p * PANEL + j] = total + bias[p * PANEL + j]


@parallel_kernel
def linear_bf16_forward(out, column, x, panels, bias, n_threads, isa, codes):
    """out[:, column:] = bf16.linear_bf16(x, panels, bias), fp32.linear_forward's work items
    (one panel's columns for up to PANEL_ROWS rows) on bf16 panels [P, K/2, 2 PANEL].

    x [M, K] float32; codes [>= M, >= K] uint16: where the avx512bf16 path rounds x to bf16
    first (unused by the others); isa: isa.BF16.code(name)."""
    check_codes(codes, x.shape[0], x.shape[1], isa)
    if isa == AVX512BF16:  # once for all panels
        for m in prange(x.shape[0]):
            round_rows(codes[m : m + 1], x[m : m + 1])
    taken = np.zeros(1, dtype=np.int64)
    for _ in prange(n_threads):
        linear_items(out, column, x, codes, panels, bias, isa, taken)


@kernel
def check_codes(codes, M, K, isa):
    """ValueError before a parallel region (where an exception is lost) when the avx512bf16 path's
    rounded activations would not fit in `codes`."""
    if isa == AVX512BF16 and (codes.shape[0] < M or codes.shape[1] < K):
        raise ValueError("codes is too small for the avx512bf16 path's rounded activations")


@kernel
def linear_items(out, column, x, codes, panels, bias, isa, taken):
    """One thread's part of linear_bf16_forward: the (rows, panel) items it takes from `taken`."""
    P, M = panels.shape[0], x.shape[0]
    rounded = codes[:M, : x.shape[1]]  # codes may have more rows than x
    items = P * ((M + PANEL_ROWS - 1) // PANEL_ROWS)
    item = take(taken)
    while item < items:
        first, p = item // P * PANEL_ROWS, item % P
        rows = slice(first, first + PANEL_ROWS)
        if isa == AVX512BF16:
            panels_product(out[rows, column:], rounded[rows], panels, bias, p, p + 1, isa)
        else:
            panels_product(out[rows, column:], x[rows], panels, bias, p, p + 1, isa)
        item = take(taken)


@kernel
def block_product(out, x, codes, panels, bias, isa):
    """out = x @ all panels + bias for one block of rows: x rounded into codes first on the
    avx512bf16 path, fp32 as it is on the others."""
    if isa == AVX512BF16:
        rounded = codes[: x.shape[0] * x.shape[1]].reshape((x.shape[0], x.shape[1]))
        round_rows(rounded, x)
        panels_product(out, rounded, panels, bias, 0, panels.shape[0], isa)
    else:
        panels_product(out, x, panels, bias, 0, panels.shape[0], isa)


@kernel
def panels_product(out, x, panels, bias, first, last, isa):
    """out[:, first * PANEL : last * PANEL] = x @ panels[first:last] + bias, one tile at a time,
    as fp32.panels_product: a panel's columns are read from memory once, then from cache."""
    M, K = x.shape
    rows_most, columns = TILE_ROWS[isa], tile_columns(isa)
    for p in range(first, last):
        for c in range(0, PANEL, columns):
            j = p * PANEL + c
            i = 0
            while i < M:
                n = tile_rows(M - i, rows_most)
                for k in range(0, K, DEPTH):
                    _bf16_tile(
                        out[i : i + n, j:],
                        x[i : i + n, k : k + DEPTH],
                        panels[p, k // PAIR : (k + DEPTH) // PAIR, PAIR * c :],
                        bias[j:],
                        k > 0,
                        isa,
                    )
                i += n


if numba.config.DISABLE_JIT:

    def _bf16_tile(out, x, panel, bias, accumulate, isa):
        """One tile (plain NumPy when JIT is disabled): out[:, :columns] = x @ widen(panel) + bias,
        or += x @ widen(panel) when accumulate."""
        from ..bf16 import widen

        columns = tile_columns(isa)
        x = widen(x) if x.dtype == np.uint16 else x
        weight = widen(panel[:, : PAIR * columns]).reshape(len(panel), columns, PAIR).transpose(0, 2, 1)
        product = x.astype(np.float32) @ weight.reshape(-1, columns)
        out[:, :columns] = out[:, :columns] + product if accumulate else product + bias[:columns]

else:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    from .fp32 import carried_loop

    @intrinsic
    def _bf16_tile(typingctx, out, x, panel, bias, accumulate, isa):
        """One tile: out [rows, >= columns] float32; x [rows, 2 K2], float32, or uint16 for
        avx512bf16; panel [K2, >= 2 columns] uint16, the tile's columns first; bias from the
        tile's first column; rows in tile_counts(isa), columns tile_columns(isa). out = x @ panel
        + bias, or out += x @ panel when accumulate. A call to path `isa`'s LLVM function
        (tile_function), chosen by a switch."""
        signature = types.void(out, x, panel, bias, types.boolean, isa)

        def codegen(context, builder, sig, args):
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:4], args[:4])]
            rows = cgutils.unpack_tuple(builder, arrays[0].shape)[0]
            pairs = cgutils.unpack_tuple(builder, arrays[2].shape)[0]
            strides = [cgutils.unpack_tuple(builder, arrays[i].strides)[0] for i in (0, 1, 2)]
            i8p = ir.IntType(8).as_pointer()
            operands = [
                arrays[0].data,
                strides[0],
                builder.bitcast(arrays[1].data, i8p),
                strides[1],
                builder.bitcast(arrays[2].data, i8p),
                strides[2],
                arrays[3].data,
                rows,
                pairs,
                args[4],
            ]
            after = builder.append_basic_block("bf16_tile_done")
            choice = builder.switch(args[5], after)
            size = sig.args[1].dtype.bitwidth // 8
            for number, name in enumerate(BF16.names):
                if ACTIVATION_BYTES[number] != size:  # this x's dtype is not the path's
                    continue
                block = builder.append_basic_block(f"bf16_tile_{name}")
                choice.add_case(ir.IntType(64)(number), block)
                with builder.goto_block(block):
                    builder.call(tile_function(builder.module, name), operands)
                    builder.branch(after)
            builder.position_at_end(after)
            return context.get_dummy_value()

        return signature, codegen

    def tile_function(module, name: str):
        """Path `name`'s LLVM function in `module` (made once per module): arguments out, out's row
        stride in bytes, x, x's, panel, panel's, bias, rows, pairs (K2), accumulate. It carries its
        path's target features, so a CPU without them compiles it too (never calling it: isa.BF16.choose
        refuses the path)."""
        symbol = f"nprerank_bf16_tile_{name}_{PANEL}"
        if symbol in module.globals:
            return module.globals[symbol]
        i8p, f32p, i64 = ir.IntType(8).as_pointer(), ir.FloatType().as_pointer(), ir.IntType(64)
        function = ir.Function(
            module,
            ir.FunctionType(ir.VoidType(), [f32p, i64, i8p, i64, i8p, i64, f32p, i64, i64, ir.IntType(1)]),
            symbol,
        )
        function.linkage = "internal"
        function.attributes.add("noinline")
        if BF16.target_features[name]:  # llvmlite knows no string attributes by name; the set prints them as given
            set.add(function.attributes, f'"target-features"="{BF16.target_features[name]}"')
        _TileBuilder(function, name).emit()
        return function

    class _TileBuilder:
        """Emits one path's tile function: a loop over the k-pairs per row count, then the stores."""

        def __init__(self, function, name: str):
            self.name, self.number = name, BF16.code(name)
            self.builder = ir.IRBuilder(function.append_basic_block("entry"))
            self.i32, self.i64 = ir.IntType(32), ir.IntType(64)
            (
                self.out,
                self.out_stride,
                self.x,
                self.x_stride,
                self.panel,
                self.panel_stride,
                self.bias,
                self.rows,
                self.pairs,
                self.accumulate,
            ) = function.args
            lanes = LANES[self.number]
            self.floats, self.words = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(self.i32, lanes)
            if name == "avx512bf16":  # declared with i32 lanes; LLVM upgrades the call to its bfloat form
                self.dot = cgutils.get_or_insert_function(
                    function.module,
                    ir.FunctionType(self.floats, [self.floats, self.words, self.words]),
                    f"llvm.x86.avx512bf16.dpbf16ps.{32 * lanes}",
                )
            else:
                self.fma = cgutils.get_or_insert_function(
                    function.module, ir.FunctionType(self.floats, [self.floats] * 3), f"llvm.fmuladd.v{lanes}f32"
                )

        def at(self, base, offset, pointee):  # pointer to `pointee` at byte offset `offset` from base
            b = self.builder
            return b.bitcast(b.gep(b.bitcast(base, ir.IntType(8).as_pointer()), [offset]), pointee.as_pointer())

        def splat(self, value, vector):  # value in every lane of a `vector`
            b = self.builder
            single = b.insert_element(ir.Constant(vector, ir.Undefined), value, self.i32(0))
            return b.shuffle_vector(
                single,
                ir.Constant(vector, ir.Undefined),
                ir.Constant(ir.VectorType(self.i32, vector.count), [0] * vector.count),
            )

        def emit(self):
            b = self.builder
            # the sums start at the bias, or at zero for a further slice of K, added to out at the store
            zero = ir.Constant(self.floats, [0.0] * self.floats.count)
            self.start = [
                b.select(
                    self.accumulate,
                    zero,
                    b.load(self.at(self.bias, self.i64(4 * self.floats.count * v), self.floats), align=4),
                )
                for v in range(2)
            ]
            after = b.append_basic_block("after")
            choice = b.switch(self.rows, after)
            for count in tile_counts(self.number):
                block = b.append_basic_block(f"rows{count}")
                choice.add_case(self.i64(count), block)
                b.position_at_end(block)
                self.tile(count)
                b.branch(after)
            b.position_at_end(after)
            b.ret_void()

        def step(self, g, count, sums):
            """The sums after k-pair g: the pair's weights loaded once, used by every row."""
            b = self.builder
            row = b.mul(g, self.panel_stride)
            w = [
                b.load(self.at(self.panel, b.add(row, self.i64(4 * self.words.count * v)), self.words), align=4)
                for v in range(2)
            ]  # one column's (even k, odd k) bf16 pair per 32-bit lane
            if self.name == "avx512bf16":
                updated = []
                for r in range(count):  # this row's pair of bf16 activations, one 32-bit load
                    x2 = b.load(
                        self.at(self.x, b.add(b.mul(self.i64(r), self.x_stride), b.mul(g, self.i64(4))), self.i32),
                        align=2,
                    )
                    spread = self.splat(x2, self.words)
                    updated += [b.call(self.dot, [sums[2 * r + v], spread, w[v]]) for v in range(2)]
                return updated
            sixteen = ir.Constant(self.words, [16] * self.words.count)
            high = ir.Constant(self.words, [-65536] * self.words.count)  # 0xffff0000
            even = [b.bitcast(b.shl(v, sixteen), self.floats) for v in w]  # k = 2g: the low half, moved up
            odd = [b.bitcast(b.and_(v, high), self.floats) for v in w]  # k = 2g + 1: already in place
            updated = list(sums)
            for half, weights in enumerate((even, odd)):
                for r in range(count):
                    at = b.add(
                        b.mul(self.i64(r), self.x_stride),
                        b.mul(b.add(b.mul(g, self.i64(2)), self.i64(half)), self.i64(4)),
                    )
                    spread = self.splat(b.load(self.at(self.x, at, ir.FloatType()), align=4), self.floats)
                    for v in range(2):
                        updated[2 * r + v] = b.call(self.fma, [spread, weights[v], updated[2 * r + v]])
            return updated

        def tile(self, count):
            """The loop over the k-pairs for a tile of `count` rows, sums carried in phi nodes, then
            the stores."""
            b = self.builder
            start = self.start * count
            final = carried_loop(b, self.pairs, start, lambda g, sums: self.step(g, count, sums))
            for r in range(count):
                for v in range(2):
                    target = self.at(
                        self.out,
                        b.add(b.mul(self.i64(r), self.out_stride), self.i64(4 * self.floats.count * v)),
                        self.floats,
                    )
                    total = b.select(
                        self.accumulate, b.fadd(final[2 * r + v], b.load(target, align=4)), final[2 * r + v]
                    )
                    b.store(total, target, align=4)
