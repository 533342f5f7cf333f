"""The readable forward pass: token ids -> one relevance logit per pair, in plain NumPy.

One function per step of the maths, weights passed in explicitly, a shape on every line. This is
the text to read to learn how the cross-encoder works, and the oracle the fast path (kernels/,
model.py) is tested against. It follows transformers' `XLMRobertaForSequenceClassification`
(eager attention, fp32, inference) and `BertForSequenceClassification` (the ms-marco MiniLM
cross-encoders), and must match their logits to 1e-4. The two differ only in position ids, token
types and checkpoint names: `embeddings` takes the first two from config.architecture
(architectures.py); the rest is one forward.

Legend:  B pairs in a batch, T tokens in the longest pair, C hidden size (768), H heads (12),
         D head size (C / H = 64), F feed-forward width (3072).

Read next: model.py, the same steps fused and run over packed sequences.
"""

import math

import numpy as np

from .config import ModelConfig
from .weights import (
    Classifier,
    Embeddings,
    Layer,
    LayerNorm,
    Linear,
    Weights,
    check_all_finite,
    embedding_rows,
    refuse_if_changed,
)


def linear(x, p: Linear):
    # [..., in] -> [..., out]; weights are [out, in] as torch stores them
    return x @ p.weight.T + p.bias


def layer_norm(x, p: LayerNorm, eps: float):
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    variance = x.var(axis=-1, keepdims=True)  # [..., 1], biased, as torch's LayerNorm
    return (x - mean) / np.sqrt(variance + eps) * p.weight + p.bias  # [..., C]


def erf(x):
    # Abramowitz & Stegun 7.1.26, in float64: |error| < 1.5e-7, about one fp32 rounding step.
    # NumPy has no erf, and this is short enough to read; the fast path uses its own (kernels/rowwise.py).
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-z * z))


def gelu(x):
    # "gelu" in the config is the exact form x * Phi(x) with the erf, not GPT-2's tanh approximation
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the max for numerical stability
    return e / e.sum(axis=-1, keepdims=True)


def embeddings(input_ids, attention_mask, p: Embeddings, config: ModelConfig):
    architecture = config.architecture  # XLM-R or BERT: how positions and token types are numbered
    word = embedding_rows(p.word, input_ids.ravel()).reshape(*input_ids.shape, -1)  # [B, T, C]
    position = p.position[architecture.position_ids(input_ids, attention_mask, config.pad_token_id)]  # [B, T, C]
    token_type = p.token_type[architecture.token_type_ids(input_ids, attention_mask)]  # [B, T, C]
    return layer_norm(word + position + token_type, p.norm, config.layer_norm_eps)  # [B, T, C]


QUERY_BLOCK = 512  # queries whose scores attention() holds at once


def attention(x, padding, p: Layer, config: ModelConfig, linear=linear):
    B, T, C = x.shape
    H, D = config.num_attention_heads, config.head_size

    def heads(t):
        return t.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # [B, T, C] -> [B, H, T, D]

    query = heads(linear(x, p.query))  # [B, H, T, D]
    key = heads(linear(x, p.key))  # [B, H, T, D]
    value = heads(linear(x, p.value))  # [B, H, T, D]
    # padded keys get the most negative float, so they receive zero weight (transformers' eager mask)
    mask = np.where(padding, np.finfo(np.float32).min, np.float32(0))[:, None, None, :]  # [B, 1, 1, T]
    context = np.empty_like(query)  # [B, H, T, D]
    # QUERY_BLOCK queries at a time: each row's softmax is whole, but the scores held are
    # [B, H, QUERY_BLOCK, T], not [B, H, T, T] (16 heads x 8192^2 floats would be 4.3 GB)
    for start in range(0, T, QUERY_BLOCK):
        rows = slice(start, start + QUERY_BLOCK)
        scores = query[:, :, rows] @ key.transpose(0, 1, 3, 2) / np.float32(math.sqrt(D))  # [B, H, rows, T]
        context[:, :, rows] = softmax(scores + mask) @ value  # [B, H, rows, D]
    context = context.transpose(0, 2, 1, 3).reshape(B, T, C)  # [B, T, C]
    return linear(context, p.attention_output)  # [B, T, C]


def feed_forward(x, p: Layer, linear=linear):
    return linear(gelu(linear(x, p.intermediate)), p.output)  # [B, T, C] -> [B, T, F] -> [B, T, C]


def encoder_layer(x, padding, p: Layer, config: ModelConfig, linear=linear):
    # post-LN (original BERT): normalise after each residual sum, not before each block
    x = layer_norm(x + attention(x, padding, p, config, linear), p.attention_norm, config.layer_norm_eps)  # [B, T, C]
    return layer_norm(x + feed_forward(x, p, linear), p.output_norm, config.layer_norm_eps)  # [B, T, C]


def classification_head(x, p: Classifier):
    # XLM-R's classifier.dense/out_proj and BERT's pooler + classifier are the same maths
    first = x[:, 0]  # [B, C]: the <s> ([CLS]) token stands for the whole pair
    return linear(np.tanh(linear(first, p.dense)), p.out_proj)[:, 0]  # [B, C] -> [B, C] -> [B]


def forward(input_ids, attention_mask, weights: Weights, config: ModelConfig, linear=linear):
    """[B, T] token ids and [B, T] mask (1 = real token, 0 = padding) -> [B] logits.

    `linear` makes the encoder's products (int8.forward passes its quantized one); the
    classification head's are always this module's."""
    # The mask, not the pad id, says what is padding: a literal "<pad>" typed in a text is token 1
    # too, and transformers attends to it (though position_ids skips it, as it does here).
    padding = attention_mask == 0  # [B, T]
    x = embeddings(input_ids, attention_mask, weights.embeddings, config)  # [B, T, C]
    for layer in weights.layers:
        x = encoder_layer(x, padding, layer, config, linear)  # [B, T, C]
    return classification_head(x, weights.classifier)  # [B]


def pad(sequences: list, pad_token_id: int) -> tuple:
    """[ids] * B -> input_ids [B, T] int64 right-padded to the longest, attention_mask [B, T] int64."""
    input_ids = np.full((len(sequences), max(map(len, sequences))), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros(input_ids.shape, dtype=np.int64)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


class ReferenceModel:
    """The reference engine behind model.FastModel's call: [ids] * B -> [B] float32 logits."""

    def __init__(self, weights: Weights, config: ModelConfig, threads: int | None = None, linear=linear):
        from .model import set_threads  # NumPy's products run on OpenBLAS, whose threads it bounds

        check_all_finite(weights)  # as the fast engine does when it writes its layout
        self.weights, self.config, self.linear = weights, config, linear  # linear: as forward's
        self.threads = set_threads(threads)

    def __call__(self, sequences: list) -> np.ndarray:
        refuse_if_changed(self.weights)  # ModelError rather than stale or mixed weights
        return forward(*pad(sequences, self.config.pad_token_id), self.weights, self.config, self.linear)
