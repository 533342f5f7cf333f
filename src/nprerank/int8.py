"""The int8 format, in plain NumPy: how weights and activations are quantized, and the oracle.

`precision="int8"` runs the encoder's four products per layer (query/key/value, attention output,
intermediate, output) on 8-bit integers. Everything else stays fp32: embeddings, LayerNorm, GELU,
attention's two products and softmax (under 10% of the work at 128 tokens, and the part where
errors compound), and the classification head.

The format, named once here:
- **Weights**: symmetric, one scale per output column (per row of torch's [out, in] W):
  scale_j = max_k |W[j, k]| / 127, q[j, k] = round(W[j, k] / scale_j) in [-127, 127] (round half
  to even). Quantized once, when the layout cache is written.
- **Activations**: symmetric, one scale per token (per row of x), computed as each product's input
  is made: a token with large values (trained transformers have a few outlier dimensions) then
  coarsens only its own row. scale_m = max_k |x[m, k]| / 127, q[m, k] = round(x[m, k] * (127 /
  max_k |x[m, k]|)), both in fp32, exactly as the kernels do it (a zero row gets scale 0).
- **Product**: int32 sums of q_x * q_W (at most 3072 * 127 * 127 < 2^26: no overflow, no slicing
  of K), then y[m, j] = float32(sum) * (scale_m * scale_j) + bias_j, as each tile is stored.
- **Packing** (`pack`): columns in panels of PANEL = 32, K in groups of GROUP = 4 (zero-padded):
  panels [P, K/4, PANEL * 4] int8, where the 4 bytes of column j for k-group g are consecutive.
  That is the operand of vpdpbusd, which sums 4 byte products into each 32-bit lane, and the
  other paths read the same bytes (kernels/isa.py). vpdpbusd multiplies an *unsigned* byte by a signed one,
  so that path adds 128 to the activations, and takes 128 * sum_k q_W[k, j] back off: the
  `corrections` [P * PANEL] int32, computed at packing.

`linear_int8(x, packed)` is the product's twin; `forward` is reference.forward with every encoder
product made by it (the int8 fast path must equal it up to fp32 rounding; tests/test_quantized.py).

Legend:  M rows (tokens), K the summed dimension, J output columns, P panels.

Read next: kernels/int8.py (the same product in LLVM IR per instruction set), kernels/isa.py.
"""

from dataclasses import dataclass

import numpy as np

from . import reference
from .layout import Format
from .weights import Layer, Linear

PANEL = 32  # output columns per panel, whatever the instruction set (so one cached file serves all)
GROUP = 4  # k values whose byte products vpdpbusd sums into one 32-bit lane
QMAX = np.float32(127.0)  # symmetric: -128 is never used, so negating a value cannot overflow
PRODUCTS = {
    "qkv": ("query", "key", "value"),
    "attention_output": ("attention_output",),
    "intermediate": ("intermediate",),
    "output": ("output",),
}  # packed name -> Layer's Linear fields
ARRAYS = {"": np.int8, "_scale": np.float32, "_correction": np.int32, "_bias": np.float32}  # per product


@dataclass(frozen=True)
class Int8Product:
    """One packed product (several Linears side by side, each padded to whole panels)."""

    panels: np.ndarray  # [P, K4, PANEL * GROUP] int8; K4 = ceil(K / GROUP)
    scale: np.ndarray  # [P * PANEL] float32, per output column (0 for padding columns)
    correction: np.ndarray  # [P * PANEL] int32: 128 * sum_k q[k, j], for vpdpbusd's unsigned side
    bias: np.ndarray  # [P * PANEL] float32


@dataclass(frozen=True)
class Int8Matrices:
    """One encoder layer's four int8 products (the int8 twin of layout.LayerMatrices)."""

    qkv: Int8Product  # the query, key and value columns, in that order
    attention_output: Int8Product
    intermediate: Int8Product
    output: Int8Product

    @property
    def width(self) -> int:
        """Columns of each of query, key and value in the qkv product: C rounded up to whole panels."""
        return len(self.qkv.panels) // 3 * PANEL


def groups(K: int) -> int:
    """k-groups of GROUP for a summed dimension K (the last one zero-padded)."""
    return -(-K // GROUP)


def quantize_columns(weight: np.ndarray) -> tuple:
    """W [J, K] float32 -> (q [J, K] int8, scale [J] float32): symmetric, one scale per output column."""
    weight = np.asarray(weight, dtype=np.float32)
    largest = np.abs(weight).max(axis=1)  # [J]
    scale = largest / QMAX  # [J]
    inverse = np.where(largest > 0, QMAX / np.where(largest > 0, largest, 1), 0).astype(np.float32)
    return np.rint(weight * inverse[:, None]).astype(np.int8), scale.astype(np.float32)


def quantize_rows(x: np.ndarray) -> tuple:
    """x [M, K] float32 -> (q [M, K4 * GROUP] int8, zero-padded; scale [M] float32): one scale per row.
    The fp32 operations of kernels/int8.py's quantize_rows, in the same order, so the bytes are equal."""
    x = np.asarray(x, dtype=np.float32)
    M, K = x.shape
    largest = np.abs(x).max(axis=1) if K else np.zeros(M, np.float32)  # [M]
    scale = (largest / QMAX).astype(np.float32)  # [M]
    inverse = np.where(largest > 0, QMAX / np.where(largest > 0, largest, 1), 0).astype(np.float32)
    q = np.zeros((M, groups(K) * GROUP), dtype=np.int8)
    q[:, :K] = np.rint(x * inverse[:, None])
    return q, scale


def pack(linears: list) -> Int8Product:
    """Linears [J, K] side by side -> one Int8Product, each Linear padded to whole panels."""
    q_parts, scales, biases = [], [], []
    for linear in linears:
        J, K = linear.weight.shape
        count = -(-J // PANEL)
        q, scale = quantize_columns(linear.weight)
        q_parts.append(np.pad(q, ((0, count * PANEL - J), (0, groups(K) * GROUP - K))))  # [count * PANEL, K4 * 4]
        scales.append(np.pad(scale, (0, count * PANEL - J)))
        biases.append(np.pad(np.asarray(linear.bias, dtype=np.float32), (0, count * PANEL - J)))
    q = np.concatenate(q_parts)  # [P * PANEL, K4 * 4]
    P, K4 = len(q) // PANEL, q.shape[1] // GROUP
    panels = q.reshape(P, PANEL, K4, GROUP).transpose(0, 2, 1, 3).reshape(P, K4, PANEL * GROUP)
    correction = 128 * q.astype(np.int32).sum(axis=1)  # [P * PANEL]
    return Int8Product(
        np.ascontiguousarray(panels), np.concatenate(scales), correction.astype(np.int32), np.concatenate(biases)
    )


def unpack(product: Int8Product) -> np.ndarray:
    """The quantized weights back as q [P * PANEL, K4 * GROUP] int8 (torch's [out, in], padded)."""
    P, K4, _ = product.panels.shape
    return product.panels.reshape(P, K4, PANEL, GROUP).transpose(0, 2, 1, 3).reshape(P * PANEL, K4 * GROUP)


def product_from_parts(q_x, x_scale, product: Int8Product) -> np.ndarray:
    """[M, P * PANEL] float32: the int32 sums of q_x [M, K4 * 4] and the packed weights, then
    float32(sum) * (x_scale[m] * scale[j]) + bias[j]. The twin of kernels/int8.py's tile stores.
    The sums are made in float64, exact for integers below 2^53, so NumPy's BLAS can do them."""
    sums = q_x.astype(np.float64) @ unpack(product).astype(np.float64).T  # [M, J], exact integers
    return sums.astype(np.int32).astype(np.float32) * (x_scale[:, None] * product.scale[None, :]) + product.bias


def linear_int8(x: np.ndarray, product: Int8Product, out_features: int | None = None) -> np.ndarray:
    """reference.linear at int8: x [..., K] -> [..., J] (J = out_features, else all padded columns)."""
    shape = x.shape
    q, scale = quantize_rows(x.reshape(-1, shape[-1]))
    y = product_from_parts(q, scale, product)
    return y[:, :out_features].reshape(*shape[:-1], -1)


def packed(layer: Layer):
    """(name, array) for every array of the layer's Int8Matrices, made one product at a time
    (layout.py writes them to the cache file under these names)."""
    for name, fields in PRODUCTS.items():
        product = pack([getattr(layer, field) for field in fields])
        yield from ((name + suffix, array) for suffix, array in zip(ARRAYS, vars(product).values()))


def shapes(layer: Layer):
    """(name, shape, dtype) of what packed(layer) makes, without making it."""
    for name, fields in PRODUCTS.items():
        count = sum(-(-getattr(layer, field).weight.shape[0] // PANEL) for field in fields)
        K = getattr(layer, fields[0]).weight.shape[1]
        yield name, [count, groups(K), PANEL * GROUP], np.int8
        for suffix in list(ARRAYS)[1:]:
            yield name + suffix, [count * PANEL], ARRAYS[suffix]


def matrices(arrays: dict) -> Int8Matrices:
    """Int8Matrices from the named arrays of packed() (or of the cache file)."""
    return Int8Matrices(**{name: Int8Product(*(arrays[name + suffix] for suffix in ARRAYS)) for name in PRODUCTS})


FORMAT = Format(packed, shapes, matrices)  # how layout.py caches it (precisions.py's int8 row)


# --- the oracle: reference.forward with int8 products ------------------------------------------


class Int8Linears:
    """reference.linear's stand-in: each Linear of the encoder quantized once (by identity), the
    classification head's left at fp32 as the fast path leaves it."""

    def __init__(self, layers: list):
        self.products = {
            id(getattr(layer, f)): (pack([getattr(layer, f)]), getattr(layer, f).weight.shape[0])
            for layer in layers
            for fields in PRODUCTS.values()
            for f in fields
        }

    def __call__(self, x, p: Linear):
        if id(p) not in self.products:
            return reference.linear(x, p)
        product, out_features = self.products[id(p)]
        return linear_int8(x.astype(np.float32), product, out_features)


def forward(input_ids, attention_mask, weights, config):
    """reference.forward with the encoder's products at int8 (this module's format): [B] logits."""
    return reference.forward(input_ids, attention_mask, weights, config, linear=Int8Linears(weights.layers))
