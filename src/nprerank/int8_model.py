"""The int8 forward pass: model.py's steps with the encoder's four products at int8.

`forward(ids, offsets, weights, matrices, config, isa)` -> [B] float32 logits; it must equal
int8.forward (reference.forward with int8.linear_int8 products) up to fp32 rounding
(tests/test_quantized.py). Embeddings, attention, the classification head and the packed batch
are model.py's, unchanged; what differs is each layer's products:

    qkv = linear_int8(x)                 one product on the [C, 3C] weight, x quantized per row first
    context = attention(qkv)             kernels.attention.attention_forward, fp32
    x = output_feed_forward(x, context)  kernels.layers: the other three products at int8, block by block

All layers but the last run in one parallel region, as at fp32 (model.encoder,
kernels.layers.encoder_layers: the rows quantized, then the steps above, the threads meeting at
barriers); encoder_layer below is the last layer (first tokens only), and every layer where the
threading layer cannot hold one region. Four regions a layer cost one 128-token pair 15% of its time.

Legend:  N tokens in the packed batch, B sequences, C hidden size, F feed-forward width.

Read next: kernels/int8.py (the product), kernels/layers.py (the steps after attention), int8.py
(the format and the oracle).
"""

from types import SimpleNamespace

import numba
import numpy as np

from .config import ModelConfig
from .kernels import attention
from .kernels import int8 as int8_kernels  # the format and oracle are ..int8
from .kernels import layers as layer_kernels  # "layers" is the list of Layers in forward
from .kernels.threads import make_workspace
from .int8 import GROUP, Int8Matrices, Int8Product
from .model import classification_head, embeddings, encoder
from .weights import Layer, Weights


def linear(out, column, x, product: Int8Product, buffers, isa: int, threads: int):
    """out[:, column:] = int8.linear_int8(x, product) (all padded columns): x [M, K] quantized per
    row into buffers' scratch, then the product with the panels shared among the threads."""
    M = x.shape[0]
    q = buffers["q"][:M, : product.panels.shape[1] * GROUP]  # [M, K4 * 4]
    scales = buffers["scales"][:M]  # [M]
    int8_kernels.quantize_rows_forward(q, scales, x)
    int8_kernels.linear_int8_forward(
        out, column, q, scales, product.panels, product.scale, product.correction, product.bias, isa, threads
    )


def _parts(product: Int8Product) -> tuple:
    return product.panels, product.scale, product.correction, product.bias


def _products(m: Int8Matrices) -> tuple:
    """A layer's qkv, attention output, intermediate and output products as kernels.layers takes them."""
    return tuple(_parts(product) for product in (m.qkv, m.attention_output, m.intermediate, m.output))


def encoder_layer(
    x, offsets, p: Layer, m: Int8Matrices, buffers, config: ModelConfig, first_tokens_only: bool = False, *, steps
):
    """model.encoder_layer at int8: the same three steps and the same last-layer shortcut (queries,
    attention and feed-forward for the first tokens only). Returns the new hidden states [Q, C].
    steps: forward's (its isa: the products' path)."""
    isa = steps.isa
    workspace, codes = buffers["workspace"], buffers["codes"]
    threads = len(workspace)
    qkv = buffers["qkv"]  # [N, 3 * width]
    width = m.width
    if first_tokens_only:
        query_offsets = np.arange(len(offsets), dtype=np.int64)  # one query per sequence
        hidden = np.ascontiguousarray(x[offsets[:-1]])  # [B, C]
        keys_values = Int8Product(*(a[len(a) // 3 :] for a in _parts(m.qkv)))  # the last two thirds
        queries_only = Int8Product(*(a[: len(a) // 3] for a in _parts(m.qkv)))
        linear(qkv, width, x, keys_values, buffers, isa, threads)
        queries = qkv[: len(hidden)]  # the <s> queries go in the first B rows
        linear(queries, 0, hidden, queries_only, buffers, isa, threads)
    else:
        query_offsets, hidden, queries = offsets, x, qkv
        linear(qkv, 0, x, m.qkv, buffers, isa, threads)
    context = buffers["context"][: len(hidden)]  # [Q, C]
    attention.attention_forward(
        context, queries, qkv, width, offsets, query_offsets, config.num_attention_heads, workspace
    )
    layer_kernels.output_feed_forward(
        hidden,
        context,
        _parts(m.attention_output),
        p.attention_norm.weight,
        p.attention_norm.bias,
        _parts(m.intermediate),
        _parts(m.output),
        p.output_norm.weight,
        p.output_norm.bias,
        np.float32(config.layer_norm_eps),
        isa,
        workspace,
        codes,
    )
    return hidden


def forward(ids, offsets, weights: Weights, matrices: list, config: ModelConfig, isa: int):
    """Packed ids [N] with offsets [B+1] -> [B] logits. matrices: [int8.Int8Matrices] * L."""
    N, B, C = len(ids), len(offsets) - 1, config.hidden_size
    threads = 1 if numba.config.DISABLE_JIT else numba.get_num_threads()  # without JIT prange is a loop
    m = matrices[0]
    output, intermediate = _parts(m.attention_output), _parts(m.intermediate)
    floats = max(
        attention.attention_floats(offsets, offsets, config.head_size),
        *(layer_kernels.feed_forward_floats(rows, threads, output, intermediate) for rows in (N, B)),
    )
    values = max(layer_kernels.feed_forward_codes(rows, threads, output, intermediate) for rows in (N, B))
    # made here, before any parallel region, as model.forward does (kernels/threads.py, "scratch memory")
    buffers = {  # reused by every layer
        "qkv": np.empty((N, 3 * m.width), dtype=np.float32),
        "context": np.empty((N, C), dtype=np.float32),
        "q": np.empty((N, m.qkv.panels.shape[1] * GROUP), dtype=int8_kernels.ACTIVATION[isa]),  # quantized x
        "scales": np.empty(N, dtype=np.float32),
        "workspace": make_workspace(threads, floats),  # [threads, S]: each thread's scratch
        "codes": np.empty((threads, values), dtype=int8_kernels.ACTIVATION[isa]),
    }
    buffers["row_codes"], buffers["row_scales"] = buffers["q"], buffers["scales"]  # encoder_layers' names
    steps = SimpleNamespace(products=_products, isa=isa)
    x = embeddings(ids, offsets, weights.embeddings, config)  # [N, C]
    x = encoder(x, offsets, list(zip(weights.layers, matrices)), buffers, config, steps, encoder_layer)  # [B, C]
    return classification_head(x, weights.classifier)  # [B]
