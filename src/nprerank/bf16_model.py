"""The bf16 forward pass: model.py's steps with the encoder's four products on bf16 weights.

`forward(ids, offsets, weights, matrices, config, isa)` -> [B] float32 logits, model.forward's
contract (precisions.py's bf16 row: `FastModel(..., precision="bf16")` calls it), with the
query/key/value, attention output, intermediate and output products made by kernels/bf16.py on bf16
panels (bf16.py's format, memory-mapped from its own layout cache file, half the fp32 one).
Everything else is model.py's, called as it is: embeddings, attention, LayerNorm, GELU and the
classification head in fp32, the packed batch, the one region for all layers but the last
(model.encoder), the last layer's first-tokens-only shortcut. Attention stays fp32: on bf16
(vdpbf16ps, built and measured) it ran ~2% faster on rerank-100 and moved the logits 0.60 from
fp32's instead of 0.41 (docs/performance.md).

The error against fp32 is measured, not promised: tests/test_bf16.py bounds it on tiny models,
docs/performance.md reports it on the full-size random model.

Legend:  N tokens in the packed batch, B sequences, C hidden size.

Read next: kernels/bf16.py (the product), kernels/isa.py (the choice of instruction set), bf16.py
(the format).
"""

import numpy as np

from .config import ModelConfig
from .kernels import bf16 as bf16_kernels  # the format and oracle are ..bf16
from .kernels.layers import feed_forward_codes
from .model import classification_head, embeddings, encoder, layer_products, make_buffers
from .weights import Weights


class BF16Steps:
    """model.encoder_layer's `steps` at bf16: linear_forward with the signature of fp32's, the
    instruction set and the uint16 scratch for its rounded activations bound; isa, the path the
    feed-forward's products take (kernels.layers.output_feed_forward, bf16 by its panels)."""

    products = staticmethod(layer_products)  # bf16 panels in fp32's LayerMatrices

    def __init__(self, isa: int, rounded: np.ndarray):
        self.isa, self.rounded = isa, rounded

    def linear_forward(self, out, column, x, panels, bias, n_threads):
        bf16_kernels.linear_bf16_forward(out, column, x, panels, bias, n_threads, self.isa, self.rounded)


def forward(ids, offsets, weights: Weights, matrices: list, config: ModelConfig, isa: int):
    """Packed ids [N] with offsets [B+1] -> [B] logits. matrices: layout.gemm_weights(weights, "bf16");
    isa: kernels.isa.BF16.code(name)."""
    N, B = len(ids), len(offsets) - 1
    buffers = make_buffers(offsets, matrices[0], config)
    threads, m = len(buffers["workspace"]), matrices[0]
    rounding = isa == bf16_kernels.AVX512BF16  # only that path rounds the activations to bf16
    output, intermediate = (m.attention_output, m.attention_output_bias), (m.intermediate, m.intermediate_bias)
    values = max(feed_forward_codes(rows, threads, output, intermediate) for rows in (N, B)) if rounding else 0
    buffers["codes"] = np.empty((threads, values), dtype=np.uint16)  # the feed-forward's rounded inputs
    rounded = np.empty((N, config.hidden_size) if rounding else (1, 1), dtype=np.uint16)
    buffers["row_codes"] = rounded  # the qkv product's rounded input, in every layer
    steps = BF16Steps(isa, rounded)
    x = embeddings(ids, offsets, weights.embeddings, config)  # [N, C]
    x = encoder(x, offsets, list(zip(weights.layers, matrices)), buffers, config, steps)  # [B, C]
    return classification_head(x, weights.classifier)  # [B]
