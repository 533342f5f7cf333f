"""The bf16 forward pass: model.py's steps with the encoder's four products on bf16 weights.

`BF16Model(weights, config, threads, isa)(sequences)` -> [B] float32 logits, like model.FastModel,
with the query/key/value, attention output, intermediate and output products made by
bf16_kernels on bf16 panels (bf16.py's format, memory-mapped from its own layout cache file, half
the fp32 one). Everything else is model.py's, called as it is: embeddings, attention,
LayerNorm, GELU and the classification head in fp32, the packed batch, the last layer's
first-tokens-only shortcut. Each layer is model.encoder_layer's three parallel regions (the fp32
path's one region for all layers, kernels.encoder_layers, is fp32-only): at rerank-100's sizes a
region's ~0.1 ms wake-up is under 1% of a layer's time.

The error against fp32 is measured, not promised: tests/test_bf16.py bounds it on tiny models,
docs/performance.md reports it on the full-size random model.

Legend:  N tokens in the packed batch, B sequences, C hidden size.

Read next: bf16_kernels.py (the kernels and the choice of instruction set), bf16.py (the format).
"""

import numba
import numpy as np

from . import bf16_kernels
from .config import ModelConfig, ModelError
from .layout import gemm_weights
from .model import (ENGINE_LOCK, FastModel, _check_float32, classification_head, embeddings, encoder_layer,
                    make_buffers, pack, set_threads)
from .weights import Weights, refuse_if_changed


class BF16Steps:
    """model.encoder_layer's `steps` at bf16: linear_forward and output_feed_forward with the
    signatures of kernels', the instruction set and the uint16 scratch for rounded activations bound."""

    def __init__(self, isa: int, rounded: np.ndarray, codes: np.ndarray):
        self.isa, self.rounded, self.codes = isa, rounded, codes

    def linear_forward(self, out, column, x, panels, bias, n_threads):
        bf16_kernels.linear_bf16_forward(out, column, x, panels, bias, n_threads, self.isa, self.rounded)

    def output_feed_forward(self, *arrays):
        bf16_kernels.output_feed_forward_bf16(*arrays, self.isa, self.codes)


def forward(ids, offsets, weights: Weights, matrices: list, config: ModelConfig, isa: int):
    """Packed ids [N] with offsets [B+1] -> [B] logits. matrices: layout.gemm_weights(weights, "bf16");
    isa: bf16_kernels.code(name)."""
    N, B = len(ids), len(offsets) - 1
    buffers = make_buffers(offsets, matrices[0], config)
    threads, m = len(buffers["workspace"]), matrices[0]
    rounding = isa == bf16_kernels.AVX512BF16  # only that path rounds the activations to bf16
    values = max(bf16_kernels.feed_forward_codes(rows, threads, m.attention_output, m.intermediate, isa)
                 for rows in (N, B))
    steps = BF16Steps(isa, np.empty((N, config.hidden_size) if rounding else (1, 1), dtype=np.uint16),
                      np.empty((threads, values), dtype=np.uint16))
    x = embeddings(ids, offsets, weights.embeddings, config)  # [N, C]
    *layers, last = zip(weights.layers, matrices)
    for layer, layer_matrices in layers:
        x = encoder_layer(x, offsets, layer, layer_matrices, buffers, config, steps=steps)
    x = encoder_layer(x, offsets, *last, buffers, config, first_tokens_only=True, steps=steps)  # [B, C]
    return classification_head(x, weights.classifier)  # [B]


class BF16Model(FastModel):
    """model.FastModel with the encoder's products at bf16. isa: bf16_kernels.choose's argument
    (None: $NPRERANK_BF16_ISA, else the best this CPU has); ValueError for a path this CPU cannot
    run. ModelError for a model whose hidden or feed-forward size is odd (bf16.py packs k in pairs)."""

    def __init__(self, weights: Weights, config: ModelConfig, threads: int | None = None, isa: str | None = None):
        odd = [name for name in ("hidden_size", "intermediate_size") if getattr(config, name) % 2]
        if odd:
            raise ModelError(f"precision bf16 needs an even {' and '.join(odd)} (the weights are packed in pairs)")
        self.weights, self.config, self.precision = weights, config, "bf16"
        self.isa = bf16_kernels.choose(isa)
        self.threads = set_threads(threads)
        _check_float32(weights, [])  # the fp32 arrays outside the products (embeddings, LayerNorms)
        self.matrices = gemm_weights(weights, "bf16")  # [LayerMatrices] * L with bf16 panels

    def __call__(self, sequences: list) -> np.ndarray:
        """As FastModel.__call__: [ids] * B -> [B] float32 logits, one pass at a time in the process."""
        ids, offsets = pack(sequences, self.config)  # [N], [B+1]
        refuse_if_changed(self.weights)
        with ENGINE_LOCK:
            numba.set_num_threads(self.threads)
            return forward(ids, offsets, self.weights, self.matrices, self.config, bf16_kernels.code(self.isa))
