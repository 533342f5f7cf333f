"""The elementwise maths and the layers that work one row at a time, in float32.

exp32 and gelu32 (exp and erf built so that LLVM vectorises them), rint32, the bit moves and
contiguous_row, LayerNorm on a row, and the
three steps around the encoder that are row by row: embeddings_forward (the first), add_layer_norm
(after each sublayer, every precision's) and classification_head_forward (the last). Each equals
the reference.py function its docstring names; tests/test_kernels.py checks each against it.

Legend:  N tokens in the packed batch, B sequences, C hidden size.

Read next: isa.py, the choices of instruction set; then fp32.py, the matrix product.
"""

import math

import numba
import numpy as np
from numba import prange

from .threads import kernel, parallel_kernel

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


# --- a float's bits, and back: one register move --------------------------------------------------

if numba.config.DISABLE_JIT:

    def float_from_bits(bits):
        """The float32 whose IEEE bits are the int32 `bits` (plain Python when JIT is disabled)."""
        return np.array(bits, dtype=np.int32).view(np.float32)[()]

    def bits_of_float(x):
        """The IEEE bits of the float32 x as a uint32 (plain Python when JIT is disabled)."""
        return np.array(x, dtype=np.float32).view(np.uint32)[()]

    def contiguous_row(x, m):
        """Row m of the 2-D x (x[m] when JIT is disabled)."""
        return x[m]

    def rint32(x):
        """x rounded to the nearest integer, ties to even, as a float32 (np.rint when JIT is disabled)."""
        return np.rint(np.float32(x))

else:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
    from numba.np.arrayobj import populate_array

    @intrinsic
    def float_from_bits(typingctx, bits):
        """The float32 whose IEEE bits are the int32 `bits`: one register move, no memory."""
        signature = types.float32(types.int32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return signature, codegen

    @intrinsic
    def bits_of_float(typingctx, x):
        """The IEEE bits of the float32 x as a uint32: one register move (float_from_bits' inverse)."""
        signature = types.uint32(types.float32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return signature, codegen

    @intrinsic
    def contiguous_row(typingctx, x, m):
        """Row m of the 2-D x, whose columns must be adjacent (as every array here: a slice of
        columns of a C-contiguous array), typed as a C-contiguous vector. Numba types x[m] of
        such a slice with a stride it only knows at run time, and LLVM then leaves a loop over
        it one value at a time; typed contiguous, the loop is vectorised. A view: no ownership,
        valid while x is."""
        row_type = types.Array(x.dtype, 1, "C")
        signature = row_type(x, m)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            row_stride = cgutils.unpack_tuple(builder, array.strides)[0]
            m = context.cast(builder, args[1], sig.args[1], types.intp)
            start = builder.gep(builder.bitcast(array.data, cgutils.voidptr_t), [builder.mul(m, row_stride)])
            row = context.make_array(row_type)(context, builder)
            populate_array(
                row,
                data=builder.bitcast(start, array.data.type),
                shape=[cgutils.unpack_tuple(builder, array.shape)[1]],
                strides=[array.itemsize],
                itemsize=array.itemsize,
                meminfo=cgutils.get_null_value(array.meminfo.type),
            )
            return row._getvalue()

        return signature, codegen

    @intrinsic
    def rint32(typingctx, x):
        """x rounded to the nearest integer, ties to even, as a float32: np.rint, but as LLVM's
        llvm.rint, which the loop vectoriser turns into one rounding instruction per vector
        (Numba's np.rint is a call into libm per value: int8's row quantization spent 90% there)."""
        signature = types.float32(types.float32)

        def codegen(context, builder, sig, args):
            rint = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType()]), "llvm.rint.f32"
            )
            return builder.call(rint, args)

        return signature, codegen


# --- exp and erf that vectorise ----------------------------------------------------------------
# math.exp becomes a call into libm, one value at a time: LLVM cannot turn a loop around it into
# SIMD code (Numba's SVML is not a dependency). The softmax and the GELU both spend their time in
# exp, so we build exp from a polynomial and the float's exponent bits, which LLVM does vectorise.


@kernel
def exp32(x):
    """exp(x) in float32 to ~1 ulp: 2^k * exp(r) with k = round(x / ln2), |r| <= ln2 / 2."""
    x = min(max(x, EXP_MIN), EXP_MAX)
    k = np.floor(x * LOG2E + HALF)  # np.floor stays float32; math.floor returns int64
    r = (x - k * LN2_HI) - k * LN2_LO
    p = ONE + r * (ONE + r * (EXP_C2 + r * (EXP_C3 + r * (EXP_C4 + r * (EXP_C5 + r * (EXP_C6 + r * EXP_C7))))))
    return p * float_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))  # 2^k built from its bits


@kernel
def largest(x):
    """max(x) of a 1-D float32 array of at least one value, exactly. The comparisons are made on
    integers that order as the floats do (a negative float's bits, less its sign, reversed), as
    LLVM vectorises an integer maximum but not a float one (its NaN rules stop it): the softmax's
    max over a row of 512 scores took as long as the products that made them."""
    top = np.int32(-2147483648)
    for j in range(x.shape[0]):
        bits = np.int32(bits_of_float(x[j]))
        top = max(top, bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    return float_from_bits(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF)))


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


# --- the row-by-row layers, in the order the forward pass uses them -----------------------------


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


@kernel
def add_layer_norm(h, sublayer, weight, bias, eps):
    """h = reference.layer_norm(h + sublayer) row by row, in place; sublayer may have extra columns.
    The residual and post-LN after each sublayer, at every precision (layers.py)."""
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
