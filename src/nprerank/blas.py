"""Finding the OpenBLAS that NumPy loaded: its thread count, its kernel name, and its sgemm.

NumPy does every x @ W of the fast path through OpenBLAS, which starts its own threads. The
fast path's `threads=` must bound those too (model.set_threads), and the benchmark reports which
CPU kernel OpenBLAS chose. Attention's small per-head products call OpenBLAS's cblas_sgemm from
inside a Numba kernel (kernels.attention_forward), so they need its address. NumPy offers none of
this, so we look the functions up through ctypes, in the copy of the library mapped into this
process. Without one (another BLAS, or not Linux) nothing is set, BLAS keeps its defaults and
attention multiplies with plain loops.

Read next: model.py (set_threads), kernels.py (sgemm).
"""

import ctypes
import functools
import os

import numpy as np


# OpenBLAS names its functions differently in each build: NumPy's wheels bundle a
# "scipy_openblas" with a 64_ suffix (64-bit integers), system builds use the plain name.
_BLAS_NAMINGS = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", ""))


@functools.cache
def blas_function(name: str):
    """OpenBLAS's `name` ("set_num_threads", "get_corename", ...) from the copy NumPy loaded, or None."""
    for library in _loaded_blas_libraries():
        try:
            handle = ctypes.CDLL(library)
        except OSError:
            continue
        for prefix, suffix in _BLAS_NAMINGS:
            function = getattr(handle, f"{prefix}{name}{suffix}", None)
            if function is not None:
                return function
    return None


def cblas_sgemm() -> tuple:
    """(address of OpenBLAS's cblas_sgemm, its integer width in bits), or (0, 0) when not found.

    NumPy's wheels bundle an ILP64 OpenBLAS (64-bit integers, names ending in 64_); other builds
    take 32-bit integers. The caller must pass integers of the width given here.
    """
    for library in _loaded_blas_libraries():
        try:
            handle = ctypes.CDLL(library)
        except OSError:
            continue
        for name, bits in (("scipy_cblas_sgemm64_", 64), ("cblas_sgemm64_", 64), ("scipy_cblas_sgemm", 32), ("cblas_sgemm", 32)):
            function = getattr(handle, name, None)
            if function is not None:
                return ctypes.cast(function, ctypes.c_void_p).value, bits
    return 0, 0


def set_blas_threads(threads: int | None) -> bool:
    """Set the thread count of the OpenBLAS that NumPy loaded; False when none could be found."""
    setter = blas_function("set_num_threads")
    if setter is not None and threads is not None:
        setter(ctypes.c_int(threads))
    return setter is not None


def get_blas_threads() -> int | None:
    """The thread count of the OpenBLAS that NumPy loaded, or None when none could be found."""
    getter = blas_function("get_num_threads")
    return getter() if getter is not None else None


def _loaded_blas_libraries() -> list:
    """Paths of the shared libraries in this process that look like a BLAS (Linux: /proc/self/maps)."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if "/" in line else ""
                name = os.path.basename(path).lower()
                if "openblas" in name and path not in found:
                    found.append(path)
    except OSError:  # not Linux: look beside NumPy instead
        folder = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
        if os.path.isdir(folder):
            found = [os.path.join(folder, f) for f in os.listdir(folder) if "openblas" in f.lower()]
    return found
