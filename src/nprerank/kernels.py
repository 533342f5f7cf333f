"""Numba kernels for the fast forward pass: the elementwise and attention work between the GEMMs.

model.py runs the same steps as reference.py, but over a *packed* batch: the tokens of all B
sequences lie back to back in one [N, C] matrix, sequence b in rows offsets[b]:offsets[b+1], so
no pad token is ever multiplied. The big matrix products (x @ W.T, about 85% of the work) stay in
BLAS, called from model.py; the kernels here do everything else, each in one pass over memory
and with the bias of the GEMM before it folded in. Every kernel names the reference.py function
it must equal; tests/test_kernels.py checks each one against that twin.

Legend:  N tokens in the packed batch, B sequences, offsets [B+1] row ranges of the sequences,
         C hidden size (768), H heads (12), D head size (C / H = 64), F feed-forward width (3072).

Signatures: output first, then inputs, then sizes. Arrays are float32 and C-contiguous; model.py
checks that once at its boundary, never inside these loops. An output may be the same array as
an input where the docstring says so (every element is read before it is written).

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
# Threading layer "workqueue": Numba's own pool, whose workers sleep between parallel regions.
#   The OpenMP layer's workers spin after each region and steal the cores that OpenBLAS needs
#   for the GEMM that follows (REFERENCE.md: 0.279 s vs 0.183 s for one pair); see
#   docs/performance.md. An explicit NUMBA_THREADING_LAYER in the environment still wins.
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
def attention_forward(context, query, key, value, query_bias, key_bias, value_bias, offsets, query_offsets,
                      H, n_threads):
    """softmax(q k^T / sqrt(D)) v of reference.attention, per packed sequence and head.

    context [Q, C] (may be `query`); query [Q, C], key and value [N, C]: the three projections
    *without* their biases, which are added here (query_bias, key_bias, value_bias [C]).
    Sequence b's keys are rows offsets[b]:offsets[b+1]; its queries are rows
    query_offsets[b]:query_offsets[b+1], the first tokens of the sequence in order (all of them,
    or only the first when the caller needs just the classification token).

    Why the value bias is added after the weighted sum: softmax weights sum to 1, so
    sum_j p_j (v_j + bias) = sum_j p_j v_j + bias, D adds per row instead of T * D.
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
            first = query_offsets[b]
            heads = slice(h * D, h * D + D)  # this head's D columns
            # Copy this head's keys (transposed, [D, T]) and values ([T, D]) into small contiguous
            # blocks: the inner loops then run over unit-stride memory that LLVM turns into SIMD.
            key_t = np.empty((D, T), dtype=np.float32)
            value_h = np.empty((T, D), dtype=np.float32)
            k_bias, q_bias, v_bias = key_bias[heads], query_bias[heads], value_bias[heads]
            for j in range(T):
                k_row, v_row = key[start + j, heads], value[start + j, heads]
                for d in range(D):
                    key_t[d, j] = k_row[d] + k_bias[d]
                    value_h[j, d] = v_row[d]
            # Queries go four at a time: each key and value row loaded from cache then feeds four
            # multiply-adds instead of one. A short last block repeats its last row (same result).
            q = np.empty((ROWS, D), dtype=np.float32)
            scores = np.empty((ROWS, T), dtype=np.float32)
            weighted = np.empty((ROWS, D), dtype=np.float32)
            totals = np.empty(ROWS, dtype=np.float32)
            count = query_offsets[b + 1] - first
            for i in range(0, count, ROWS):
                for r in range(ROWS):
                    q_row = query[first + min(i + r, count - 1), heads]
                    for d in range(D):
                        q[r, d] = (q_row[d] + q_bias[d]) * scale
                _four_rows_matmul(scores, q, key_t)  # [ROWS, D] x [D, T] -> [ROWS, T]
                for r in range(ROWS):
                    totals[r] = _exp_shifted_row(scores[r])  # softmax numerators, in place
                _four_rows_matmul(weighted, scores, value_h)  # [ROWS, T] x [T, D] -> [ROWS, D]
                for r in range(ROWS):
                    out_row = context[first + min(i + r, count - 1), heads]
                    norm = ONE / totals[r]
                    for d in range(D):
                        out_row[d] = weighted[r, d] * norm + v_bias[d]


ROWS = 4  # query rows per block in attention_forward (the inner kernels below are written for 4)


@kernel
def _four_rows_matmul(out, a, b):
    """out = a @ b for four rows of a: [4, K] x [K, M] -> [4, M].

    Attention's two products are of this shape: q k^T (a = 4 query rows [4, D], b = keys
    transposed [D, T]) and p v (a = 4 rows of probabilities [4, T], b = values [T, D]). Four
    output rows share every load of b, and two rows of b go per pass, so each loaded b row feeds
    eight multiply-adds; LLVM vectorises the inner loop over M.
    """
    K, M = b.shape
    o0, o1, o2, o3 = out[0], out[1], out[2], out[3]
    r0, r1, r2, r3 = a[0], a[1], a[2], a[3]
    for m in range(M):
        o0[m] = 0.0
        o1[m] = 0.0
        o2[m] = 0.0
        o3[m] = 0.0
    for k in range(0, K - 1, 2):
        b0, b1 = b[k], b[k + 1]
        a00, a01, a10, a11 = r0[k], r0[k + 1], r1[k], r1[k + 1]
        a20, a21, a30, a31 = r2[k], r2[k + 1], r3[k], r3[k + 1]
        for m in range(M):
            x0, x1 = b0[m], b1[m]
            o0[m] += a00 * x0 + a01 * x1
            o1[m] += a10 * x0 + a11 * x1
            o2[m] += a20 * x0 + a21 * x1
            o3[m] += a30 * x0 + a31 * x1
    for k in range(K - K % 2, K):  # an odd K leaves one row of b
        b0 = b[k]
        for m in range(M):
            o0[m] += r0[k] * b0[m]
            o1[m] += r1[k] * b0[m]
            o2[m] += r2[k] * b0[m]
            o3[m] += r3[k] * b0[m]


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

