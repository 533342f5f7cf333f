"""The fast forward pass: reference.py's steps over packed batches, with Numba kernels and BLAS.

`FastModel(weights, config, threads)(sequences)` -> [B] float32 logits, in the order given. It
must equal reference.forward on the same sequences to 1e-4 (tests/test_kernels.py). The steps
keep reference.py's names and order, so the two files can be read side by side:

    embeddings -> encoder_layer x L (attention, feed_forward, each + residual + layer_norm)
               -> classification_head

What differs, and why:
- Packed batches: the tokens of all sequences lie back to back in one [N, C] matrix (offsets
  [B+1] mark the sequences), so no pad token is multiplied and attention needs no mask.
- Every x @ W.T is x @ M, M the [in, out] copy of the weight that layout.py keeps memory-mapped
  from a cache file (the layout OpenBLAS multiplies fastest). The bias is added by the kernel
  that follows, in the same pass as the GELU, the residual + LayerNorm or the attention.
- One thread pool at a time: big products are split over Numba's threads, each calling
  single-threaded OpenBLAS, so OpenBLAS's own workers never spin beside Numba's (linear_nobias).
- The last layer computes queries, attention output and feed-forward for each sequence's first
  token only: the classification head reads nothing else (keys and values still cover all).
- Memory is bounded by the batch: four [N, C] buffers reused by every layer, and the [N, F]
  feed-forward activation made FFN_ROWS rows at a time.

Legend:  N tokens in the packed batch, B sequences, C hidden size, H heads, F feed-forward width.

Read next: kernels.py (what each kernel fuses), layout.py (the weight copies), reference.py (the
maths in plain NumPy).
"""

import os
from contextlib import contextmanager

import numba
import numpy as np

from . import kernels
from .blas import cblas_sgemm, get_blas_threads, set_blas_threads
from .config import ModelConfig
from .layout import LayerMatrices, gemm_weights
from .weights import Classifier, Embeddings, Layer, Weights, embedding_rows

FFN_ROWS = 1024  # rows of the [rows, F] feed-forward activation made at once: 12 MB, BLAS-sized
ROWS_PER_THREAD = 256  # products on at least this many rows per thread are split over Numba's threads
SGEMM, _BITS = cblas_sgemm()  # for products made on Numba's threads (kernels.matmul); 0: NumPy and plain loops
BLAS_INT = np.int64(0) if _BITS == 64 else np.int32(0)  # tells the kernel the width of BLAS's integers


class FastModel:
    def __init__(self, weights: Weights, config: ModelConfig, threads: int | None = None):
        self.weights, self.config = weights, config
        self.threads = set_threads(threads)
        self.matrices = gemm_weights(weights)  # [LayerMatrices] * L, [in, out]
        _check_float32(weights, self.matrices)

    def __call__(self, sequences: list) -> np.ndarray:
        """[ids] * B, unpadded token-id sequences -> [B] float32 logits."""
        if self.threads:
            numba.set_num_threads(self.threads)  # Numba's count is per calling thread, so set it here
        ids, offsets = pack(sequences, self.config)  # [N], [B+1]
        return forward(ids, offsets, self.weights, self.matrices, self.config)


def pack(sequences: list, config: ModelConfig) -> tuple:
    """[ids] * B -> (ids [N] int64, offsets [B+1] int64), checking every id and length."""
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise ValueError("sequences must be a non-empty list of token-id lists")
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=int(offsets[-1]))
    if lengths.min() < 1:
        raise ValueError(f"sequence {int(np.argmin(lengths))} is empty")
    if lengths.max() > config.max_tokens:
        raise ValueError(f"sequence {int(np.argmax(lengths))} has {lengths.max()} tokens; the model takes at most {config.max_tokens}")
    bad = (ids < 0) | (ids >= config.vocab_size)
    if bad.any():
        where = int(np.searchsorted(offsets, np.argmax(bad), side="right") - 1)
        raise ValueError(
            f"sequence {where} holds token id {ids[np.argmax(bad)]}: ids must be in [0, {config.vocab_size})"
        )
    return ids, offsets


def linear_nobias(out, x, matrix):
    """out = x @ matrix: [rows, in] x [in, out], the matrix being layout.py's copy of the weight.

    Many rows: kernels.linear_forward splits the product over Numba's threads, each calling
    single-threaded OpenBLAS. Few rows (one short pair): NumPy calls OpenBLAS, whose own threads
    spin between calls and so start at once, where waking Numba's costs ~100 us per product.
    """
    threads = numba.get_num_threads()
    if SGEMM == 0 or len(x) < ROWS_PER_THREAD * threads:
        return np.matmul(x, matrix, out=out)
    with single_threaded_blas():
        kernels.linear_forward(out, x, matrix, threads, SGEMM, BLAS_INT)
    return out


@contextmanager
def single_threaded_blas():
    """OpenBLAS on one thread while Numba's threads each call it (kernels.matmul), its previous
    count again after. Two pools on the same cores fight: OpenBLAS's workers spin for ~0.1 s
    after each product, and a Numba kernel sharing their cores ran 1.5x slower."""
    previous = get_blas_threads()
    set_blas_threads(1)
    try:
        yield
    finally:
        set_blas_threads(previous)


def embeddings(ids, offsets, p: Embeddings, config: ModelConfig):
    x = embedding_rows(p.word, ids)  # [N, C], a fresh fp32 array whatever the table's dtype
    x = np.ascontiguousarray(x, dtype=np.float32)
    kernels.embeddings_forward(x, x, p.position, p.token_type, p.norm.weight, p.norm.bias, ids, offsets,
                               config.pad_token_id, np.float32(config.layer_norm_eps))
    return x  # [N, C]


def attention(query_rows, x, offsets, query_offsets, p: Layer, m: LayerMatrices, buffers, config: ModelConfig):
    """The Q, K, V projections and the per-head softmax attention; returns the context [Q, C].

    query_rows [Q, C] are the rows that ask (all of x, or each sequence's first token).
    The output projection is left to encoder_layer, which folds its bias into the LayerNorm.
    """
    query, key, value = buffers["query"][: len(query_rows)], buffers["key"], buffers["value"]
    linear_nobias(query, query_rows, m.query)  # [Q, C]
    linear_nobias(key, x, m.key)  # [N, C]
    linear_nobias(value, x, m.value)  # [N, C]
    context = query  # each (row, head) block of the query is read just before its context replaces it
    threads = numba.get_num_threads()
    with single_threaded_blas():
        kernels.attention_forward(context, query, key, value, p.query.bias, p.value.bias, offsets, query_offsets,
                                  config.num_attention_heads, threads, SGEMM, BLAS_INT)
    return context  # [Q, C]


def feed_forward_layer_norm(x, p: Layer, m: LayerMatrices, buffers, config: ModelConfig):
    """x = layer_norm(x + feed_forward(x)) in place, FFN_ROWS rows at a time to bound memory."""
    intermediate, output = buffers["intermediate"], buffers["key"]
    eps = np.float32(config.layer_norm_eps)
    for start in range(0, len(x), FFN_ROWS):
        rows = x[start : start + FFN_ROWS]  # [R, C]
        hidden = intermediate[: len(rows)]
        linear_nobias(hidden, rows, m.intermediate)  # [R, C] -> [R, F]
        kernels.gelu_forward(hidden, hidden, p.intermediate.bias)  # [R, F]
        out = output[start : start + len(rows)]
        linear_nobias(out, hidden, m.output)  # [R, F] -> [R, C]
        kernels.residual_layer_norm_forward(rows, out, p.output.bias, rows, p.output_norm.weight,
                                            p.output_norm.bias, eps)  # [R, C]


def encoder_layer(x, offsets, p: Layer, m: LayerMatrices, buffers, config: ModelConfig, first_tokens_only: bool = False):
    # post-LN (original BERT): normalise after each residual sum, as reference.encoder_layer
    if first_tokens_only:
        query_offsets = np.arange(len(offsets), dtype=np.int64)  # one query per sequence
        residual = np.ascontiguousarray(x[offsets[:-1]])  # [B, C]: the <s> rows
    else:
        query_offsets, residual = offsets, x
    context = attention(residual, x, offsets, query_offsets, p, m, buffers, config)  # [Q, C]
    projected = linear_nobias(buffers["value"][: len(residual)], context, m.attention_output)  # [Q, C]
    kernels.residual_layer_norm_forward(residual, projected, p.attention_output.bias, residual,
                                        p.attention_norm.weight, p.attention_norm.bias,
                                        np.float32(config.layer_norm_eps))  # [Q, C]
    feed_forward_layer_norm(residual, p, m, buffers, config)  # [Q, C]
    return residual


def classification_head(first, p: Classifier):
    logits = np.empty(len(first), dtype=np.float32)  # [B]
    kernels.classification_head_forward(logits, first, p.dense.weight, p.dense.bias, p.out_proj.weight, p.out_proj.bias)
    return logits


def forward(ids, offsets, weights: Weights, matrices: list, config: ModelConfig):
    """Packed ids [N] with offsets [B+1] -> [B] logits. matrices: layout.gemm_weights(weights)."""
    N, C, F = len(ids), config.hidden_size, config.intermediate_size
    buffers = {
        "query": np.empty((N, C), dtype=np.float32),  # Q projection, then the attention context
        "key": np.empty((N, C), dtype=np.float32),  # K projection, then the FFN output
        "value": np.empty((N, C), dtype=np.float32),  # V projection, then the attention output
        "intermediate": np.empty((min(N, FFN_ROWS), F), dtype=np.float32),
    }
    x = embeddings(ids, offsets, weights.embeddings, config)  # [N, C]
    last = len(weights.layers) - 1
    for i, (layer, layer_matrices) in enumerate(zip(weights.layers, matrices)):
        x = encoder_layer(x, offsets, layer, layer_matrices, buffers, config, first_tokens_only=(i == last))
    # after the last layer x holds only the <s> row of each sequence: [B, C]
    return classification_head(x, weights.classifier)  # [B]


# --- threads -----------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int | None:
    """Use `threads` (or $NPRERANK_NUM_THREADS) threads in Numba's kernels and in OpenBLAS (which
    runs single-threaded inside them during a forward pass, and with `threads` for NumPy's own
    products, the path taken where no OpenBLAS could be called directly).

    Returns the count in force, or None when neither is given (both libraries keep their defaults).
    """
    if threads is None:
        value = os.environ.get("NPRERANK_NUM_THREADS", "").strip()
        if not value:
            return None
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"NPRERANK_NUM_THREADS must be a positive integer, got {value!r}")
        threads = int(value)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    threads = min(int(threads), numba.config.NUMBA_NUM_THREADS)  # Numba's pool is sized at start-up
    numba.set_num_threads(threads)
    set_blas_threads(threads)
    return threads


def _check_float32(weights: Weights, matrices: list) -> None:
    """The kernels take float32 C-contiguous arrays; weights.py and layout.py guarantee it, checked once here."""
    arrays = [weights.embeddings.position, weights.embeddings.token_type, weights.embeddings.norm.weight]
    for layer, layer_matrices in zip(weights.layers, matrices):
        arrays += [layer.query.bias, layer_matrices.query, layer_matrices.output, layer.output_norm.bias]
    for array in arrays:
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError(f"FastModel needs float32 C-contiguous weights, got {array.dtype} {array.shape}")
