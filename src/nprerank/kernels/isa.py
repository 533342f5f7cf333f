"""Which instruction set each product uses: every such choice of the package, in one place.

**fp32** (fp32.py): one tile, shaped for this CPU's vector registers when the module loads
(`fp32_tile_shape`): 14 rows x 2 vectors of 16 floats with AVX-512's 32 registers, 6 x 2 x 8 with
AVX2's 16, 6 x 2 x 4 with 128-bit vectors. It cannot be forced: the layout cache's panels are as
wide as two of this CPU's vectors.

**int8** (int8.py) and **bf16** (bf16.py): one inner loop per family of CPU instructions, all
compiled into the same machine code (each LLVM function carrying the target features it needs)
and picked at run time by a small integer, the path's index in its `Paths` table:

| INT8 path  | instructions                                        | needs (LLVM feature names)        |
|------------|-----------------------------------------------------|-----------------------------------|
| vnni512    | vpdpbusd on 512-bit vectors (AVX512-VNNI)           | avx512f, avx512bw, avx512vnni     |
| avxvnni    | vpdpbusd on 256-bit vectors (AVX-VNNI)              | avx2, avxvnni                     |
| avx2       | bytes widened to int16, vpmaddwd (cannot saturate)  | avx2                              |
| generic    | LLVM's portable vector code, widened to int32       | nothing                           |

| BF16 path  | instructions                                        | needs (LLVM feature names)        |
|------------|-----------------------------------------------------|-----------------------------------|
| avx512bf16 | vdpbf16ps on 512-bit vectors (AVX512-BF16)          | avx512f, avx512bw, avx512bf16     |
| avx2       | bf16 widened to fp32 in the register, FMA           | avx2, fma                         |
| generic    | the same in LLVM's portable vector code             | nothing                           |

The best path this CPU has is used, unless the table's environment variable (`NPRERANK_ISA`,
`NPRERANK_BF16_ISA`) or the `isa=` option of FastModel names another: then that one is used, or
a ValueError says what this CPU lacks for it. Forcing lets one machine run every path it can
execute against the plain-loop twins (tests/test_quantized.py, tests/test_bf16.py); paths it
cannot execute are still compiled there and checked to contain their instructions.

Read next: fp32.py, whose tile is shaped here.
"""

import os
from dataclasses import dataclass

import numba


def host_features() -> dict:
    """LLVM's view of this CPU's features (name -> bool); empty when JIT is disabled."""
    if numba.config.DISABLE_JIT:
        return {}
    from llvmlite import binding

    return dict(binding.get_host_cpu_features())


def fp32_tile_shape() -> tuple:
    """(rows, lanes per vector) of fp32._tile for this CPU: its sums must fit the vector registers."""
    if numba.config.DISABLE_JIT:
        return 14, 16
    features = host_features()
    if features.get("avx512f"):
        return 14, 16  # 32 registers of 16 floats
    if features.get("avx2"):
        return 6, 8  # 16 registers of 8 floats: 6 x 2 sums + 2 weights + 1 broadcast
    return 6, 4  # 128-bit vectors (SSE, NEON)


@dataclass(frozen=True)
class Paths:
    """One product's instruction-set paths: `names` best first (a name's index is the integer the
    kernels take as `isa`), what each needs of the CPU and is compiled with, and the environment
    variable that forces one."""

    names: tuple
    needs: dict  # name -> the LLVM feature names a CPU must have to execute it
    target_features: dict  # name -> what its LLVM function is compiled with, whatever the host
    variable: str  # the environment variable that forces a path

    def supported(self, name: str, features: dict | None = None) -> bool:
        """Whether this CPU (or `features`, LLVM's feature names) can execute path `name`."""
        features = host_features() if features is None else features
        return all(features.get(flag) for flag in self.needs[name])

    def choose(self, requested: str | None = None) -> str:
        """The path to use: `requested`, else $variable, else the best this CPU supports.

        ValueError when the name is not one of `names`, or this CPU lacks what it needs."""
        source = "isa"
        if requested is None:
            requested, source = os.environ.get(self.variable, "").strip() or None, self.variable
        if requested is None:
            if numba.config.DISABLE_JIT:
                return "generic"
            return next(name for name in self.names if self.supported(name))
        if requested not in self.names:
            raise ValueError(f"{source} must be one of {', '.join(self.names)}, got {requested!r}")
        if not numba.config.DISABLE_JIT and not self.supported(requested):
            lacking = [flag for flag in self.needs[requested] if not host_features().get(flag)]
            raise ValueError(f"{source}={requested} needs {', '.join(lacking)}, which this CPU lacks")
        return requested

    def code(self, name: str) -> int:
        """The integer the kernels take for path `name`."""
        return self.names.index(name)


INT8 = Paths(
    names=("vnni512", "avxvnni", "avx2", "generic"),
    needs={
        "vnni512": ("avx512f", "avx512bw", "avx512vnni"),
        "avxvnni": ("avx2", "avxvnni"),
        "avx2": ("avx2",),
        "generic": (),
    },
    target_features={
        "vnni512": "+avx512f,+avx512bw,+avx512vnni,+avx2,+fma",
        "avxvnni": "+avx2,+avxvnni,+fma",
        "avx2": "+avx2,+fma",
        "generic": "",
    },
    variable="NPRERANK_ISA",
)
BF16 = Paths(
    names=("avx512bf16", "avx2", "generic"),
    needs={"avx512bf16": ("avx512f", "avx512bw", "avx512bf16"), "avx2": ("avx2", "fma"), "generic": ()},
    target_features={"avx512bf16": "+avx512f,+avx512bw,+avx512bf16,+avx2,+fma", "avx2": "+avx2,+fma", "generic": ""},
    variable="NPRERANK_BF16_ISA",
)
