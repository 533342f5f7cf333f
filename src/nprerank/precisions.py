"""The precisions the encoder runs at, in one table: `precision=` everywhere is looked up here.

Each precision is one row of PRECISIONS naming, as "module:attribute" (imported only when that
precision is used, so an fp32 run never loads the int8 kernels), the three things that differ:

- `format`: how layout.py packs a layer's weights for it and reads them back from the cache
  file (a layout.Format);
- `forward`: the fast forward pass, (ids [N], offsets [B+1], weights, matrices, config, **options)
  -> [B] logits, as model.forward;
- `oracle`: for engine="reference", a stand-in for reference.linear made from the Weights'
  layers (None: reference.linear itself, the exact fp32 product).

`isa` names, as "module:attribute", the table of the fast pass's instruction-set paths if it has
several (a kernels.isa.Paths: INT8 for int8's products, BF16 for bf16's; `choose(name)`, forceable,
and `code(name)`). Adding a precision is one line here, plus its modules. The CLI, the server,
batch and bench take their choices from NAMES.
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    format: str  # "module:attribute" of its layout.Format
    forward: str  # "module:attribute" of its fast forward pass
    oracle: str | None  # "module:attribute" of its reference.linear stand-in's factory, or None: exact
    isa: str | None  # "module:attribute" of its kernels.isa.Paths, whose code its forward takes as isa=


PRECISIONS = {
    "fp32": Precision("nprerank.layout:FP32", "nprerank.model:forward", None, isa=None),
    "int8": Precision(
        "nprerank.int8:FORMAT",
        "nprerank.int8_model:forward",
        "nprerank.int8:Int8Linears",
        isa="nprerank.kernels.isa:INT8",
    ),
    "bf16": Precision(
        "nprerank.bf16:FORMAT",
        "nprerank.bf16_model:forward",
        "nprerank.bf16:BF16Linears",
        isa="nprerank.kernels.isa:BF16",
    ),
}
NAMES = tuple(PRECISIONS)
DEFAULT = "fp32"
# --precision's help in every command that has it (rerank, batch, serve): one text, so that none
# forgets a precision (tests/test_cli.py checks that each name is explained)
HELP = (
    "fp32 (exact, the default); int8 (the encoder's products on 8-bit integers: faster, logits off "
    "by ~0.01-1 on random models); bf16 (its weights in bfloat16: half the memory, faster only with "
    'AVX512-BF16, logits off by ~0.3 on random models). docs/performance.md, "Reduced precision"'
)


def check(precision) -> Precision:
    """The row for `precision`; ValueError naming the choices for anything else."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(NAMES)}, got {precision!r:.40}")
    return PRECISIONS[precision]


def load(reference: str):
    """The object a "module:attribute" string names."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)
