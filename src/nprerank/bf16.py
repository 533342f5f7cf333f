"""The bf16 format, in plain NumPy: how weights are rounded and packed, and the product's oracle.

`precision="bf16"` stores the encoder's four products per layer (query/key/value, attention
output, intermediate, output) as bfloat16 and keeps everything else fp32: embeddings, LayerNorm,
GELU, attention's two products and softmax, and the classification head (as model.py does them).

The format, named once here:
- **bfloat16** is the upper half of a float32: its sign, its 8-bit exponent (the same range) and 7
  of the 23 mantissa bits (about 3 significant decimal digits; relative rounding error <= 2^-9).
  `to_bf16` rounds a float32 to nearest, ties to even, as `vcvtneps2bf16` and torch do; `widen`
  is exact: the 16 bits shifted back into the top of a float32, the low bits zero.
- **Weights**: rounded once, when the layout cache is written: half the fp32 file's bytes.
- **Activations**: fp32 on the widening paths (the weights are widened to fp32 inside the
  kernel, fp32 fused multiply-add). On AVX512-BF16 `vdpbf16ps` multiplies bf16 by bf16, so there
  each product's input is rounded to bf16 first (`round_activations`); its sums are fp32.
- **Packing** (`pack`): output columns in panels of PANEL (kernels.fp32.PANEL: the fp32 layout's, so
  the kernels' scratch sizes and LayerMatrices serve both), K in pairs: panels [P, K/2, 2 PANEL]
  uint16, where the two values of column j for k-pair g are consecutive, k even first. One 32-bit
  lane then holds one column's pair: the operand of `vdpbf16ps`, which sums the pair's two
  products into that lane, and on the widening paths a shift left by 16 (the even k) and a mask
  of the low half (the odd k) make the two fp32 weights, with no shuffle. K must be even (it is
  in every model of the family: 384, 768, 1024, 1536, 3072, 4096).

`linear_bf16(x, panels, bias)` is the product's oracle in NumPy; kernels/bf16.py's linear_bf16_naive is
its plain-loop twin in Numba, and the ISA paths are checked against that (tests/test_bf16.py).
`rounded(weights)` is the whole model's oracle for the widening paths: reference.forward on it is
what they compute (weights rounded, activations fp32), up to fp32 summation order. For the
avx512bf16 path, which rounds the activations too, `BF16Linears(layers, round_activations=True)`
passed to reference.forward as its `linear` is.

Legend:  M rows (tokens), K the summed dimension, J output columns, P panels.

Read next: kernels/bf16.py (the product per instruction set), bf16_model.py (the forward pass).
"""

from dataclasses import replace

import numpy as np

from .config import ModelError
from .kernels.fp32 import PANEL
from . import layout, reference
from .layout import PRODUCTS, LayerMatrices
from .weights import Layer, Linear, Weights

PAIR = 2  # k values whose products vdpbf16ps sums into one 32-bit lane


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even. Finite values only
    (the weights are checked finite before packing); one too large for bf16 becomes infinity."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def widen(h: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: the bits become the float's upper half."""
    return (np.asarray(h, dtype=np.uint32) << 16).view(np.float32)


def rounded_to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 and held as float32 (the values a bf16 product multiplies)."""
    return widen(to_bf16(x))


def round_linear(linear: Linear) -> Linear:
    """`linear` with its weight rounded to bf16 (held as float32), its bias as it is."""
    return Linear(rounded_to_bf16(linear.weight), linear.bias)


def pack(linears: list) -> tuple:
    """Linears [J, K] side by side -> (panels [P, K/2, 2 PANEL] uint16, bias [P PANEL] float32),
    each Linear padded with zero columns to whole panels. ModelError when K is odd."""
    rows, biases = [], []
    for linear in linears:
        J, K = linear.weight.shape
        if K % PAIR:
            raise ModelError(f"bf16 packs the summed dimension in pairs; a Linear with {K} inputs cannot be packed")
        count = -(-J // PANEL)
        rows.append(np.pad(to_bf16(linear.weight), ((0, count * PANEL - J), (0, 0))))  # [count PANEL, K]
        biases.append(np.pad(np.asarray(linear.bias, dtype=np.float32), (0, count * PANEL - J)))
    weight = np.concatenate(rows)  # [P PANEL, K]
    P, K2 = len(weight) // PANEL, weight.shape[1] // PAIR
    panels = weight.reshape(P, PANEL, K2, PAIR).transpose(0, 2, 1, 3).reshape(P, K2, PAIR * PANEL)
    return np.ascontiguousarray(panels), np.concatenate(biases)


def unpack(panels: np.ndarray) -> np.ndarray:
    """The packed weights back as bf16 bits [P PANEL, K] (torch's [out, in], padded)."""
    P, K2, _ = panels.shape
    return panels.reshape(P, K2, PANEL, PAIR).transpose(0, 2, 1, 3).reshape(P * PANEL, K2 * PAIR)


def linear_bf16(x: np.ndarray, panels: np.ndarray, bias: np.ndarray, round_activations: bool = False) -> np.ndarray:
    """The product's oracle: x [M, K] @ widen(W).T + bias -> [M, P PANEL] float32, the sums made in
    float64 (so only the kernels' fp32 summation differs). round_activations: x rounded to bf16
    first, as the AVX512-BF16 path does."""
    x = rounded_to_bf16(x) if round_activations else np.asarray(x, dtype=np.float32)
    return (x.astype(np.float64) @ widen(unpack(panels)).astype(np.float64).T + bias).astype(np.float32)


def packed(layer: Layer):
    """(name, array) for every array of the layer's bf16 LayerMatrices, made one product at a time
    (layout.py writes them to the cache file under these names): layout's, with bf16's pack.
    ModelError when a product's summed dimension is odd."""
    _check_even(layer)
    return layout._packed(layer, pack)


def shapes(layer: Layer):
    """(name, shape, dtype) of what packed(layer) makes, without making it. ModelError when a
    product's summed dimension (hidden_size, intermediate_size) is odd."""
    _check_even(layer)
    return layout._shapes(layer, lambda K: [K // PAIR, PAIR * PANEL], np.uint16)


def _check_even(layer: Layer) -> None:
    odd = sorted({linear.weight.shape[1] for linear in _products(layer) if linear.weight.shape[1] % PAIR})
    if odd:
        raise ModelError(
            f"precision bf16 needs an even hidden_size and intermediate_size (the weights are "
            f"packed in pairs); this model has a product with {odd[0]} inputs"
        )


def _products(layer: Layer) -> list:
    return [getattr(layer, field) for fields in PRODUCTS.values() for field in fields]


def matrices(arrays: dict) -> LayerMatrices:
    """layout.LayerMatrices holding bf16 panels [P, K/2, 2 PANEL] uint16 (its `width` holds: P
    counts the same PANEL-column panels as fp32's)."""
    return LayerMatrices(**arrays)


FORMAT = layout.Format(packed, shapes, matrices)  # how layout.py caches it (precisions.py's bf16 row)


class BF16Linears:
    """reference.linear's stand-in for engine="reference" at bf16: the encoder's products with their
    weights rounded to bf16 (each rounded once, by identity), the classification head's at fp32 as
    the fast path leaves it. round_activations: each product's input rounded to bf16 too, as the
    avx512bf16 path's vdpbf16ps needs; None: as the path this host's fast engine chooses
    (kernels.isa.BF16.choose), so that engine="reference" is the oracle of engine="fast" here."""

    def __init__(self, layers: list, round_activations: bool | None = None):
        if round_activations is None:
            from .kernels.isa import BF16  # the kernels' choice: imported only when asked

            round_activations = BF16.choose() == "avx512bf16"
        self.round_activations = round_activations
        self.rounded = {id(linear): round_linear(linear) for layer in layers for linear in _products(layer)}

    def __call__(self, x, p: Linear):
        if id(p) not in self.rounded:
            return reference.linear(x, p)
        x = rounded_to_bf16(x) if self.round_activations else x
        return reference.linear(x, self.rounded[id(p)])


def rounded(weights: Weights) -> Weights:
    """`weights` with the encoder's product weights rounded to bf16 (held as float32): reference.forward
    on them equals the widening paths' forward up to fp32 rounding. In memory (no layout file)."""

    fields = [field for names in PRODUCTS.values() for field in names]
    layers = [
        replace(layer, **{field: round_linear(getattr(layer, field)) for field in fields}) for layer in weights.layers
    ]
    return replace(weights, layers=layers, source=None, stamp=None)
