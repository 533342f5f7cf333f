"""The int8 product: row quantization, and the product on int8 weight panels per instruction set.

Each kernel equals a function of nprerank/int8.py, the format and its plain-NumPy oracle (named in
its docstring; tests/test_quantized.py checks them): the format (per-column weight scales, per-row
activation scales, int32 sums, scales and bias applied at the store) is defined and explained
there. This module makes it fast; layers.py runs a layer's three other products with it.

The product's inner loop, `_int8_tile`, is LLVM IR like fp32._tile, in one version per
instruction set (isa.INT8). All versions are compiled into the same machine code, each LLVM
function carrying the target features it needs, and `isa` (an integer argument, isa.INT8.code(name))
picks one at run time: a forced path never needs a recompile, and Numba's cache holds one copy for all.

| path     | tile (rows x columns) | per k-group of 4 and row                                        |
|----------|-----------------------|-----------------------------------------------------------------|
| vnni512  | 14 x 32               | vpdpbusd: 4 u8 x s8 products summed into each of 16 int32 lanes |
| avxvnni  | 6 x 16                | the same on 8 lanes                                            |
| avx2     | 6 x 8                 | bytes widened to int16; vpmaddwd sums pairs into int32 (1)     |
| generic  | 4 x 8                 | bytes widened to int32, multiplied and added by LLVM's vectors  |

(1) 16129 * 2 fits an int32 lane, so nothing saturates (vpmaddubsw would: 255 * 127 * 2 > 32767).

vpdpbusd multiplies unsigned bytes by signed ones: its paths keep each quantized activation as
value + 128 in a uint8 (made so by quantize_rows, activation_offset), so that the tile broadcasts a
row's 4 bytes of a k-group straight from memory into every lane, and subtracts the +128's share,
128 * sum_k W[k, j] = correction[j], where its sums start. (Shifted in the loop instead, with a xor,
the bytes went through a general register to be broadcast, and the whole product ran 20-30%
slower on Zen 4: 14 register-to-vector broadcasts per k-group beside the 28 vpdpbusd.)

The sums start at 0 (or, on the vpdpbusd paths, at -correction[j]) and live in
vector registers (loop-carried values) for the whole K loop; the store converts them to fp32,
multiplies by row scale x column scale and adds the bias.

Legend:  M rows, K summed dimension (K4 = K / 4 groups), P panels.

Read next: bf16.py, the same design on bf16 weights; then int8_model.py, which calls these.
"""

import numba
import numpy as np
from numba import prange
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from ..int8 import GROUP, PANEL
from .fp32 import PANEL_ROWS, tile_row_counts, tile_rows
from .isa import INT8
from .rowwise import bits_of_float, contiguous_row, f32, float_from_bits, rint32
from .threads import FASTMATH, kernel, parallel_kernel, take

# tile shape per path, indexed by isa.INT8.code(name): the sums must fit the vector registers
TILE_ROWS = (14, 6, 6, 4)  # vnni512: 14 x 2 zmm sums + 2 weights + 1 broadcast = 31 of 32
TILE_COLUMNS = (32, 16, 8, 8)  # avxvnni and avx2: 6 x 2 ymm sums + 2 + 1 = 15 of 16
# How the paths take the quantized activations (the same values, in [-127, 127]): vpdpbusd's as
# unsigned bytes, value + 128 (ACTIVATION_OFFSET; the module's docstring); the widening paths as
# int16, so that a row's 4 values of a k-group are one 8-byte broadcast from memory instead of a
# load, a widening and a broadcast (16 -> 10 vector instructions per k-group and 6 rows).
ACTIVATION = (np.uint8, np.uint8, np.int16, np.int16)
ACTIVATION_OFFSET = (128, 128, 0, 0)
ACTIVATION_BYTES = tuple(np.dtype(dtype).itemsize for dtype in ACTIVATION)  # what Numba code can index
QMAX = f32(127.0)
ZERO = f32(0.0)
MAGNITUDE = np.uint32(0x7FFFFFFF)  # a float32's bits without the sign


# --- activations: one scale per row, as they are made -----------------------------------------


def activation_offset(q):
    """What quantize_rows adds to each value it stores in q: 128 in uint8 (vpdpbusd's unsigned
    operand), 0 in a signed dtype. (Plain Python when JIT is disabled; compiled, the overload below
    gives the constant of q's type.)"""
    return 128 if q.dtype == np.uint8 else 0


@overload(activation_offset, jit_options=dict(fastmath=FASTMATH, error_model="numpy"))
def _compiled_activation_offset(q):
    offset = 128 if as_dtype(q.dtype) == np.dtype(np.uint8) else 0
    return lambda q: offset


def as_activation(q: np.ndarray, isa: int) -> np.ndarray:
    """int8.quantize_rows' int8 codes as path `isa` takes them (ACTIVATION, ACTIVATION_OFFSET)."""
    return (q.astype(np.int16) + ACTIVATION_OFFSET[isa]).astype(ACTIVATION[isa])


@kernel
def _quantize_row(q, scales, x, m):
    """int8.quantize_rows for row m: q[m] [K4 * 4] (zero-padded), scales[m]; x [M, K]. q's
    dtype is the path's ACTIVATION dtype: the values are int8's plus activation_offset(q).

    Both loops vectorise: the largest |x| is found as the largest of the floats' bits with the
    sign bit cleared (for floats that are not NaN the two orders agree, and an integer maximum
    vectorises where a float one, with its NaN rules, does not), and rint32 rounds a vector at a
    time. Done one value at a time, this took a fifth of an int8 layer's time."""
    K = x.shape[1]
    row = contiguous_row(x, m)  # so that both loops vectorise when x is a slice of columns
    largest_bits = np.uint32(0)
    for k in range(K):
        largest_bits = max(largest_bits, bits_of_float(row[k]) & MAGNITUDE)
    largest = float_from_bits(np.int32(largest_bits))
    scales[m] = largest / QMAX
    inverse = QMAX / largest if largest > ZERO else ZERO
    offset = activation_offset(q)
    for k in range(K):
        q[m, k] = np.int32(rint32(row[k] * inverse)) + offset  # in [-127, 127], plus the offset
    for k in range(K, q.shape[1]):
        q[m, k] = offset  # the value 0


@kernel
def quantize_rows(q, scales, x):
    """int8.quantize_rows(x) into q [M, K4 * 4] (uint8 + 128, or int16: the path's ACTIVATION) and
    scales [M] float32, row by row."""
    for m in range(x.shape[0]):
        _quantize_row(q, scales, x, m)


@parallel_kernel
def quantize_rows_forward(q, scales, x):
    """quantize_rows with the rows shared among the threads."""
    for m in prange(x.shape[0]):
        _quantize_row(q, scales, x, m)


# --- the product ---------------------------------------------------------------------------------


@parallel_kernel
def linear_int8_forward(out, column, q, scales, panels, column_scales, corrections, bias, isa, n_threads):
    """out[:, column:] = int8.product_from_parts(q, scales, product), the panels shared by the threads.

    out [M, >= column + P * PANEL] float32; q [M, K4 * 4] (the path's ACTIVATION) and scales [M]:
    the quantized input (quantize_rows); panels [P, K4, PANEL * 4] int8; column_scales, bias [P * PANEL] float32;
    corrections [P * PANEL] int32; isa: isa.INT8.code(name). Work items as fp32.linear_forward's."""
    check_activation(q, isa)
    taken = np.zeros(1, dtype=np.int64)
    for _ in prange(n_threads):
        linear_items(out, column, q, scales, panels, column_scales, corrections, bias, isa, taken)


@kernel
def linear_items(out, column, q, scales, panels, column_scales, corrections, bias, isa, taken):
    """One thread's part of linear_int8_forward: the (rows, panel) items it takes from `taken`."""
    P, M = panels.shape[0], q.shape[0]
    items = P * ((M + PANEL_ROWS - 1) // PANEL_ROWS)
    item = take(taken)
    while item < items:
        first, p = item // P * PANEL_ROWS, item % P
        rows = slice(first, first + PANEL_ROWS)
        panels_product(
            out[rows, column:], q[rows], scales[rows], panels, column_scales, corrections, bias, p, p + 1, isa
        )
        item = take(taken)


@kernel
def panels_product(out, q, scales, panels, column_scales, corrections, bias, first, last, isa):
    """out[:, first * PANEL : last * PANEL] = int8.product_from_parts for panels first..last-1,
    one tile at a time: a panel's column slice is read once from memory, then from cache."""
    M = q.shape[0]
    rows_most, columns = TILE_ROWS[isa], TILE_COLUMNS[isa]
    for p in range(first, last):
        for c in range(0, PANEL, columns):
            j = p * PANEL + c
            i = 0
            while i < M:
                n = tile_rows(M - i, rows_most)
                _int8_tile(
                    out[i : i + n, j:],
                    q[i : i + n],
                    scales[i : i + n],
                    panels[p, :, c * GROUP :],
                    column_scales[j:],
                    corrections[j:],
                    bias[j:],
                    isa,
                )
                i += n


@kernel
def check_activation(q, isa):
    """ValueError unless q's dtype is ACTIVATION[isa]: the tile has no loop for another size and
    would leave out untouched, and int8 bytes on a vpdpbusd path would be read 128 off. Checked
    before the parallel region (an exception inside one is lost)."""
    if q.itemsize != ACTIVATION_BYTES[isa] or activation_offset(q) != ACTIVATION_OFFSET[isa]:
        raise ValueError("q's dtype is not the ACTIVATION dtype of this isa")


def tile_counts(isa: int) -> list:
    """The row counts fp32.tile_rows can give for path `isa`: the tile has one loop for each."""
    return tile_row_counts(TILE_ROWS[isa])


@kernel
def int8_tile_naive(out, q, scales, panel, column_scales, corrections, bias, columns):
    """_int8_tile's plain-loop twin: out[r, j] = float32(sum_g,i x[r, 4g+i] * panel[g, 4j+i]) *
    (scales[r] * column_scales[j]) + bias[j] for j < columns, where x = q - activation_offset(q),
    the quantized values. `corrections` is unused here: the tile's way to take the offset out."""
    offset = activation_offset(q)
    for r in range(q.shape[0]):
        for j in range(columns):
            total = 0
            for g in range(panel.shape[0]):
                for i in range(GROUP):
                    total += (np.int32(q[r, g * GROUP + i]) - offset) * np.int32(panel[g, j * GROUP + i])
            out[r, j] = f32(total) * (scales[r] * column_scales[j]) + bias[j]


if numba.config.DISABLE_JIT:

    def _int8_tile(out, q, scales, panel, column_scales, corrections, bias, isa):
        """One tile of the product (plain Python when JIT is disabled): the twin, TILE_COLUMNS wide."""
        int8_tile_naive(out, q, scales, panel, column_scales, corrections, bias, TILE_COLUMNS[isa])

else:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    from .fp32 import carried_loop

    @intrinsic
    def _int8_tile(typingctx, out, q, scales, panel, column_scales, corrections, bias, isa):
        """One tile: out [rows, >= columns] float32, q [rows, K4 * 4] uint8 or int16 (ACTIVATION[isa]),
        scales [rows], panel
        [K4, >= columns * 4] int8 with rows PANEL * 4 bytes apart, column_scales, corrections and
        bias from the tile's first column; rows in tile_counts(isa), columns TILE_COLUMNS[isa].
        A call to the LLVM function of path `isa` (tile_function), chosen by a switch."""
        signature = types.void(out, q, scales, panel, column_scales, corrections, bias, isa)

        def codegen(context, builder, sig, args):
            arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:7], args[:7])]
            rows = cgutils.unpack_tuple(builder, arrays[0].shape)[0]
            groups = cgutils.unpack_tuple(builder, arrays[3].shape)[0]
            strides = [cgutils.unpack_tuple(builder, arrays[i].strides)[0] for i in (0, 1)]
            q = builder.bitcast(arrays[1].data, ir.IntType(8).as_pointer())  # uint8 or int16: addressed in bytes
            operands = [
                arrays[0].data,
                strides[0],
                q,
                strides[1],
                arrays[2].data,
                arrays[3].data,
                arrays[4].data,
                arrays[5].data,
                arrays[6].data,
                rows,
                groups,
            ]
            after = builder.append_basic_block("int8_tile_done")
            choice = builder.switch(args[7], after)
            size = sig.args[1].dtype.bitwidth // 8
            for code, name in enumerate(INT8.names):
                if ACTIVATION_BYTES[code] != size:  # check_activation refuses that pair
                    continue
                block = builder.append_basic_block(f"int8_tile_{name}")
                choice.add_case(ir.IntType(64)(code), block)
                with builder.goto_block(block):
                    builder.call(tile_function(builder.module, name), operands)
                    builder.branch(after)
            builder.position_at_end(after)
            return context.get_dummy_value()

        return signature, codegen

    def tile_function(module, name: str):
        """The LLVM function of path `name` in `module` (made once per module): arguments out,
        out's row stride in bytes, q, q's, scales, panel, column_scales, corrections, bias, rows,
        groups (K4). It carries its path's target features, so that a CPU without them compiles it
        too (it is then never called: isa.INT8.choose refuses the path)."""
        symbol = f"nprerank_int8_tile_{name}"
        if symbol in module.globals:
            return module.globals[symbol]
        i8p, i32p, f32p, i64 = (
            ir.IntType(8).as_pointer(),
            ir.IntType(32).as_pointer(),
            ir.FloatType().as_pointer(),
            ir.IntType(64),
        )
        function = ir.Function(
            module, ir.FunctionType(ir.VoidType(), [f32p, i64, i8p, i64, f32p, i8p, f32p, i32p, f32p, i64, i64]), symbol
        )
        function.linkage = "internal"
        function.attributes.add("noinline")
        if INT8.target_features[name]:  # llvmlite knows no string attributes by name; the set prints them as given
            set.add(function.attributes, f'"target-features"="{INT8.target_features[name]}"')
        _TileBuilder(function, name).emit()
        return function

    class _TileBuilder:
        """Emits one path's tile function: a loop over K4 per row count, then the stores."""

        def __init__(self, function, name: str):
            self.function, self.name = function, name
            self.code = INT8.code(name)
            self.builder = ir.IRBuilder(function.append_basic_block("entry"))
            self.i8, self.i16, self.i32, self.i64 = (ir.IntType(n) for n in (8, 16, 32, 64))
            (
                self.out,
                self.out_stride,
                self.q,
                self.q_stride,
                self.scales,
                self.panel,
                self.column_scales,
                self.corrections,
                self.bias,
                self.rows,
                self.groups,
            ) = function.args
            self.columns = TILE_COLUMNS[self.code]
            if name in ("vnni512", "avxvnni"):
                lanes = self.columns // 2  # two vectors of int32 lanes, one column per lane
                self.accumulator = ir.VectorType(self.i32, lanes)
                self.vectors = 2
                self.dot = cgutils.get_or_insert_function(
                    function.module,
                    ir.FunctionType(self.accumulator, [self.accumulator] * 3),
                    f"llvm.x86.avx512.vpdpbusd.{32 * lanes}",
                )
            else:  # avx2 and generic: one vector per 4 columns, lanes holding partial sums of a column
                self.vectors = self.columns // 4
                self.accumulator = ir.VectorType(self.i32, 8 if name == "avx2" else 16)
                if name == "avx2":
                    words = ir.VectorType(self.i16, 16)
                    self.dot = cgutils.get_or_insert_function(
                        function.module, ir.FunctionType(self.accumulator, [words, words]), "llvm.x86.avx2.pmadd.wd"
                    )

        # -- addresses
        def at(self, base, offset, pointee):  # pointer to `pointee` at byte offset `offset` from base
            b = self.builder
            return b.bitcast(b.gep(b.bitcast(base, self.i8.as_pointer()), [offset]), pointee.as_pointer())

        def emit(self):
            b = self.builder
            after = b.append_basic_block("after")
            choice = b.switch(self.rows, after)
            for count in tile_counts(self.code):
                block = b.append_basic_block(f"rows{count}")
                choice.add_case(self.i64(count), block)
                b.position_at_end(block)
                self.tile(count)
                b.branch(after)
            b.position_at_end(after)
            b.ret_void()

        def start(self):
            """The sums' start: -corrections (vpdpbusd adds 128 * sum_k W to every column), else 0."""
            if self.name in ("vnni512", "avxvnni"):
                lanes = self.accumulator.count
                return [
                    self.builder.sub(
                        ir.Constant(self.accumulator, [0] * lanes),
                        self.builder.load(
                            self.at(self.corrections, self.i64(4 * lanes * v), self.accumulator), align=4
                        ),
                    )
                    for v in range(self.vectors)
                ]
            return [ir.Constant(self.accumulator, [0] * self.accumulator.count)] * self.vectors

        def step(self, g, count, sums):
            """The sums after k-group g: weights loaded once, used by every row."""
            b = self.builder
            row_bytes = self.i64(PANEL * GROUP)
            weights_at = b.mul(g, row_bytes)
            updated = []
            if self.name in ("vnni512", "avxvnni"):
                width = 4 * self.accumulator.count
                w = [
                    b.load(self.at(self.panel, b.add(weights_at, self.i64(width * v)), self.accumulator), align=1)
                    for v in range(self.vectors)
                ]
            else:
                wide = ir.VectorType(self.i16 if self.name == "avx2" else self.i32, 16)
                w = [
                    b.sext(
                        b.load(
                            self.at(self.panel, b.add(weights_at, self.i64(16 * v)), ir.VectorType(self.i8, 16)),
                            align=1,
                        ),
                        wide,
                    )
                    for v in range(self.vectors)
                ]
            vnni = self.name in ("vnni512", "avxvnni")
            size = 1 if vnni else 2  # bytes per activation value (ACTIVATION)
            for r in range(count):
                x4 = b.load(
                    self.at(
                        self.q,
                        b.add(b.mul(self.i64(r), self.q_stride), b.mul(g, self.i64(GROUP * size))),
                        self.i32 if vnni else self.i64,
                    ),
                    align=size,
                )  # this row's 4 values of the group
                if vnni:  # already + 128 (activation_offset): a broadcast from memory
                    spread = self.splat(x4, self.accumulator)
                    updated += [
                        b.call(self.dot, [sums[r * self.vectors + v], spread, w[v]]) for v in range(self.vectors)
                    ]
                else:
                    wide = w[0].type
                    x = b.bitcast(x4, ir.VectorType(self.i16, 4))
                    if wide.element != self.i16:
                        x = b.sext(x, ir.VectorType(wide.element, 4))
                    spread = b.shuffle_vector(
                        x, ir.Constant(x.type, ir.Undefined), ir.Constant(ir.VectorType(self.i32, 16), [0, 1, 2, 3] * 4)
                    )
                    for v in range(self.vectors):
                        products = b.call(self.dot, [w[v], spread]) if self.name == "avx2" else b.mul(w[v], spread)
                        updated.append(b.add(sums[r * self.vectors + v], products))
            return updated

        def tile(self, count):
            """The K loop for a tile of `count` rows, sums carried in phi nodes, then the stores."""
            b = self.builder
            start = self.start() * count
            final = carried_loop(b, self.groups, start, lambda g, sums: self.step(g, count, sums))
            for r in range(count):
                self.store(r, final[r * self.vectors : (r + 1) * self.vectors])

        def column_sums(self, vectors):
            """The row's sums as vectors of one int32 per column (8 or 16 columns each)."""
            b = self.builder
            if self.name in ("vnni512", "avxvnni"):
                return vectors
            per_lane = self.accumulator.count // 4  # partial sums per column: 2 (vpmaddwd) or 4

            def lanes(i):  # lane i of every column's partial sums
                return b.shuffle_vector(
                    vector, vector, ir.Constant(ir.VectorType(self.i32, 4), [c * per_lane + i for c in range(4)])
                )

            quads = []
            for vector in vectors:
                total = lanes(0)
                for i in range(1, per_lane):
                    total = b.add(total, lanes(i))
                quads.append(total)  # [4] columns
            eight = ir.Constant(ir.VectorType(self.i32, 8), list(range(8)))  # two [4] vectors side by side
            return [b.shuffle_vector(quads[2 * i], quads[2 * i + 1], eight) for i in range(len(quads) // 2)]

        def splat(self, value, vector_type):
            b = self.builder
            single = b.insert_element(ir.Constant(vector_type, ir.Undefined), value, self.i32(0))
            return b.shuffle_vector(
                single,
                ir.Constant(vector_type, ir.Undefined),
                ir.Constant(ir.VectorType(self.i32, vector_type.count), [0] * vector_type.count),
            )

        def store(self, r, vectors):
            """out[r, j] = float32(sum) * (scales[r] * column_scales[j]) + bias[j]: no fused
            multiply-add, so the twin's NumPy arithmetic gives the same bits."""
            b = self.builder
            out_row = b.mul(self.i64(r), self.out_stride)
            row_scale = b.load(self.at(self.scales, self.i64(4 * r), ir.FloatType()), align=4)
            done = 0
            for sums in self.column_sums(vectors):
                lanes = sums.type.count
                floats = ir.VectorType(ir.FloatType(), lanes)
                column_scale = b.load(self.at(self.column_scales, self.i64(4 * done), floats), align=4)
                bias = b.load(self.at(self.bias, self.i64(4 * done), floats), align=4)
                scale = b.fmul(self.splat(row_scale, floats), column_scale)
                value = b.fadd(b.fmul(b.sitofp(sums, floats), scale), bias)
                b.store(value, self.at(self.out, b.add(out_row, self.i64(4 * done)), floats), align=4)
                done += lanes
