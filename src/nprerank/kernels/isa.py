"""Which instruction set the reduced-precision kernels use: chosen here, in one place.

The int8 product (int8_kernels.py) has one inner loop per family of CPU instructions, all
compiled into the same machine code and picked at run time by a small integer:

| name      | instructions                                   | needs (LLVM feature names)        |
|-----------|------------------------------------------------|-----------------------------------|
| vnni512   | vpdpbusd on 512-bit vectors (AVX512-VNNI)      | avx512f, avx512bw, avx512vnni     |
| avxvnni   | vpdpbusd on 256-bit vectors (AVX-VNNI)         | avx2, avxvnni                     |
| avx2      | bytes widened to int16, vpmaddwd (cannot saturate) | avx2                          |
| generic   | LLVM's portable vector code, widened to int32   | nothing                           |

The best one this CPU has is used, unless `NPRERANK_ISA` (or the `isa=` option of FastModel)
names another: then that one is used, or a ValueError says what this CPU lacks for it. Forcing
lets one machine run every path it can execute against the plain-loop twins (tests/
test_quantized.py); paths it cannot execute are still compiled there and checked to contain
their instructions.

Read next: int8_kernels.py, which emits each path.
"""

import os

import numba

ISAS = ("vnni512", "avxvnni", "avx2", "generic")  # best first; the index is the kernels' isa code
NEEDS = {
    "vnni512": ("avx512f", "avx512bw", "avx512vnni"),
    "avxvnni": ("avx2", "avxvnni"),
    "avx2": ("avx2",),
    "generic": (),
}
# what a function containing that path is compiled with, whatever the host (LLVM target features)
TARGET_FEATURES = {
    "vnni512": "+avx512f,+avx512bw,+avx512vnni,+avx2,+fma",
    "avxvnni": "+avx2,+avxvnni,+fma",
    "avx2": "+avx2,+fma",
    "generic": "",
}


def host_features() -> dict:
    """LLVM's view of this CPU's features (name -> bool); empty when JIT is disabled."""
    if numba.config.DISABLE_JIT:
        return {}
    from llvmlite import binding

    return dict(binding.get_host_cpu_features())


def supported(name: str, features: dict | None = None) -> bool:
    """Whether this CPU (or `features`) can execute path `name`."""
    features = host_features() if features is None else features
    return all(features.get(flag) for flag in NEEDS[name])


def choose(requested: str | None = None) -> str:
    """The path to use: `requested`, else $NPRERANK_ISA, else the best this CPU supports.

    ValueError when the name is not one of ISAS, or this CPU lacks what it needs."""
    source = "isa"
    if requested is None:
        requested, source = os.environ.get("NPRERANK_ISA", "").strip() or None, "NPRERANK_ISA"
    if requested is None:
        if numba.config.DISABLE_JIT:
            return "generic"
        return next(name for name in ISAS if supported(name))
    if requested not in ISAS:
        raise ValueError(f"{source} must be one of {', '.join(ISAS)}, got {requested!r}")
    if not numba.config.DISABLE_JIT and not supported(requested):
        lacking = [flag for flag in NEEDS[requested] if not host_features().get(flag)]
        raise ValueError(f"{source}={requested} needs {', '.join(lacking)}, which this CPU lacks")
    return requested


def code(name: str) -> int:
    """The integer the kernels take for path `name`."""
    return ISAS.index(name)
