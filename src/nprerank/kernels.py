"""Numba kernels for the fast forward pass: the threads, the GEMMs' split, attention, elementwise work.

model.py runs the same steps as reference.py, but over a *packed* batch: the tokens of all B
sequences lie back to back in one [N, C] matrix, sequence b in rows offsets[b]:offsets[b+1], so
no pad token is ever multiplied. The matrix products (about 85% of the work) are OpenBLAS's
sgemm, called from these kernels on Numba's threads (linear_forward, attention_forward); the
rest is done here, each step in one pass over memory and with the bias of the GEMM before it
folded in. Every kernel names the reference.py function it must equal; tests/test_kernels.py
checks each one against that twin.

Legend:  N tokens in the packed batch, B sequences, offsets [B+1] row ranges of the sequences,
         C hidden size (768), H heads (12), D head size (C / H = 64), F feed-forward width (3072).

Signatures: output first, then inputs, then sizes. Arrays are float32 and C-contiguous (model.py
checks that once at its boundary, never inside these loops), except the strided views `matmul`
takes. An output may be the same array as an input where the docstring says so (every element
is read before it is written).

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
def embeddings_forward(out, word, position, token_type, norm_weight, norm_bias, ids, offsets, pad_token_id, eps):
    """reference.embeddings over a packed batch: LN(word + position + token_type[0]).

    out [N, C]; word [N, C] the gathered word rows (may be `out`); position [P, C]; token_type
    [types, C]; ids [N]; offsets [B+1]. Positions restart in every sequence at pad_token_id + 1,
    as RoBERTa numbers tokens (reference.position_ids). A packed batch has no padding, but a
    "<pad>" typed in a text is id pad_token_id too: like transformers, it gets position
    pad_token_id and does not advance the count.
    """
    B = offsets.shape[0] - 1
    C = out.shape[1]
    for b in prange(B):
        counted = pad_token_id
        for n in range(offsets[b], offsets[b + 1]):
            if ids[n] != pad_token_id:
                counted += 1
            row = counted if ids[n] != pad_token_id else pad_token_id
            for c in range(C):
                out[n, c] = word[n, c] + position[row, c] + token_type[0, c]
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


@parallel_kernel
def linear_forward(out, x, weight, n_threads, sgemm, blas_int):
    """out = x @ weight, reference.linear without its bias: x [M, K], weight [K, N] ([in, out]).

    Each thread multiplies its own block of rows with single-threaded BLAS (the caller sets
    OpenBLAS to one thread). Every thread reads all of the weight, which BLAS packs once per call,
    so blocks should be large: model.py sends products on fewer rows (model.ROWS_PER_THREAD) to
    OpenBLAS's own threads instead.
    """
    M = x.shape[0]
    for part in prange(n_threads):
        r0, r1 = M * part // n_threads, M * (part + 1) // n_threads
        matmul(out[r0:r1], x[r0:r1], weight, False, ONE, sgemm, blas_int)


@parallel_kernel
def attention_forward(context, query, key, value, query_bias, value_bias, offsets, query_offsets, H, n_threads,
                      sgemm, blas_int):
    """softmax(q k^T / sqrt(D)) v of reference.attention, per packed sequence and head.

    context [Q, C] (may be `query`); query [Q, C], key and value [N, C]: the three projections
    *without* their biases. Sequence b's keys are rows offsets[b]:offsets[b+1]; its queries are
    rows query_offsets[b]:query_offsets[b+1], the first tokens of the sequence in order (all of
    them, or only the first when the caller needs just the classification token). sgemm and
    blas_int: see `matmul` (the caller sets BLAS to one thread: the threads here share the items).

    The biases cost almost nothing here:
    - query bias: added while copying the head's queries into a small contiguous block.
    - key bias: not needed at all. It adds q . bias_k to every score of query q, the same amount
      along the row, and softmax does not change when a whole row is shifted.
    - value bias: added after the weighted sum. Softmax weights sum to 1, so
      sum_j p_j (v_j + bias) = sum_j p_j v_j + bias: D adds per row instead of T * D.
    """
    C = query.shape[1]
    D = C // H
    scale = f32(1.0 / math.sqrt(D))
    B = offsets.shape[0] - 1
    # Work items are (sequence, head) pairs dealt round-robin to the threads, so each thread gets
    # a fair share of long and short sequences (a plain prange would give one thread the longest).
    for thread in prange(n_threads):
        for item in range(thread, B * H, n_threads):
            b, h = item // H, item % H
            start, T = offsets[b], offsets[b + 1] - offsets[b]
            first, count = query_offsets[b], query_offsets[b + 1] - query_offsets[b]
            heads = slice(h * D, h * D + D)  # this head's D columns
            q = query[first : first + count, heads] + query_bias[heads]  # [count, D], contiguous
            scores = np.empty((count, T), dtype=np.float32)
            matmul(scores, q, key[start : start + T, heads], True, scale, sgemm, blas_int)  # q k^T / sqrt(D)
            totals = np.empty(count, dtype=np.float32)
            for i in range(count):
                totals[i] = _exp_shifted_row(scores[i])  # softmax numerators, in place
            out = context[first : first + count, heads]  # [count, D]: q's rows were read above
            matmul(out, scores, value[start : start + T, heads], False, ONE, sgemm, blas_int)  # [count, T] x [T, D]
            for i in range(count):
                norm = ONE / totals[i]
                for d in range(D):
                    out[i, d] = out[i, d] * norm + value_bias[h * D + d]


# --- matrix products on Numba's threads: OpenBLAS called from Numba, or plain loops -------------
# Each thread of linear_forward and attention_forward multiplies its own blocks with
# single-threaded BLAS: a block of a big product, or one (sequence, head) item of attention, whose
# products ([T, D] x [D, T], then [T, T] x [T, D]) are too small to split further. Numba can call
# a C function at an address, which we give it as a plain integer (blas.cblas_sgemm), so the
# compiled kernels can still be cached: the address is an argument, not a constant in the code.

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


@kernel
def matmul(out, a, b, b_transposed, alpha, sgemm, blas_int):
    """out = alpha * a @ b ([M, K] x [K, N]), or alpha * a @ b.T when b_transposed (b is [N, K]).

    out, a, b are 2-D float32 views whose rows may be strided but whose columns are contiguous
    (a head's columns of a [rows, C] matrix). sgemm is the address of cblas_sgemm, whose integers
    have the type of blas_int (int32 or int64); with sgemm == 0, plain loops do the work.
    """
    M, K = a.shape
    N = b.shape[0] if b_transposed else b.shape[1]
    if M == 0 or N == 0:
        return
    if sgemm == 0:
        for i in range(M):
            for j in range(N):
                out[i, j] = 0.0
            for k in range(K):
                factor = alpha * a[i, k]
                for j in range(N):
                    out[i, j] += factor * (b[j, k] if b_transposed else b[k, j])
        return
    trans = CBLAS_TRANS if b_transposed else CBLAS_NO_TRANS
    call_sgemm(sgemm, blas_int, trans, M, N, K, alpha, a.ctypes.data, a.strides[0] // 4,
               b.ctypes.data, b.strides[0] // 4, out.ctypes.data, out.strides[0] // 4)


if numba.config.DISABLE_JIT:

    def call_sgemm(address, blas_int, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc):
        """cblas_sgemm(row-major, a not transposed, trans_b, ...) through ctypes (JIT disabled)."""
        import ctypes

        integer = ctypes.c_int64 if np.asarray(blas_int).dtype == np.int64 else ctypes.c_int32
        pointer, single = ctypes.c_void_p, ctypes.c_float
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, single,
                                     pointer, integer, pointer, integer, single, pointer, integer)
        prototype(address)(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, trans_b, m, n, k, alpha, a, lda, b, ldb, 0.0, c, ldc)

else:

    @intrinsic
    def call_sgemm(typingctx, address, blas_int, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc):
        """cblas_sgemm(row-major, a not transposed, trans_b, m, n, k, alpha, a, lda, b, ldb, 0, c, ldc),
        the function at `address`; a, b, c are addresses; integers are cast to blas_int's width."""
        signature = types.void(address, blas_int, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc)

        def codegen(context, builder, sig, args):
            integer, enum, single = ir.IntType(blas_int.bitwidth), ir.IntType(32), ir.FloatType()
            pointer = ir.IntType(8).as_pointer()
            function_type = ir.FunctionType(ir.VoidType(), [enum, enum, enum, integer, integer, integer, single, pointer,
                                                            integer, pointer, integer, single, pointer, integer])
            function = builder.inttoptr(args[0], function_type.as_pointer())

            def cast(i, to):
                return context.cast(builder, args[i], sig.args[i], to)

            whole = [cast(i, blas_int) for i in (3, 4, 5, 8, 10, 12)]  # m, n, k, lda, ldb, ldc
            a_, b_, c_ = (builder.inttoptr(args[i], pointer) for i in (7, 9, 11))
            builder.call(function, [enum(CBLAS_ROW_MAJOR), enum(CBLAS_NO_TRANS), cast(2, types.int32),
                                    *whole[:3], cast(6, types.float32), a_, whole[3], b_, whole[4],
                                    single(0.0), c_, whole[5]])
            return context.get_dummy_value()

        return signature, codegen


@kernel
def _exp_shifted_row(x):
    """x = exp(x - max(x)) in place, returning the sum: reference.softmax before its division.
    Subtracting the max keeps every exp <= 1 (numerical stability) and changes nothing else."""
    highest = x[0]
    for j in range(1, x.shape[0]):
        highest = max(highest, x[j])
    total = f32(0.0)
    for j in range(x.shape[0]):
        e = exp32(x[j] - highest)
        x[j] = e
        total += e
    return total


@parallel_kernel
def residual_layer_norm_forward(out, x, bias, residual, norm_weight, norm_bias, eps):
    """reference.layer_norm(x + bias + residual): the two `layer_norm(h + sublayer(h))` of
    reference.encoder_layer, with the bias of the sublayer's last linear folded in.

    out, x, residual [N, C]; bias, norm_weight, norm_bias [C]. `out` may be `x` or `residual`.
    """
    N, C = x.shape
    for n in prange(N):
        for c in range(C):
            out[n, c] = x[n, c] + bias[c] + residual[n, c]
        _layer_norm_row(out, n, norm_weight, norm_bias, eps)


@parallel_kernel
def gelu_forward(out, x, bias):
    """reference.gelu(x + bias): the intermediate linear's bias and the exact-erf GELU.

    out, x [N, F] (out may be x); bias [F].
    """
    N, F = x.shape
    for n in prange(N):
        for f in range(F):
            out[n, f] = gelu32(x[n, f] + bias[f])


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

