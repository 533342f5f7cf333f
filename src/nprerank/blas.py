"""Finding the OpenBLAS that NumPy loaded, to set its thread count and ask which kernel it runs.

NumPy does every x @ W.T of the fast path through OpenBLAS, which starts its own threads. The
fast path's `threads=` must bound those too (model.set_threads), and the benchmark reports which
CPU kernel OpenBLAS chose. NumPy offers neither, so we call OpenBLAS's own functions through
ctypes, from the copy of the library mapped into this process. Without one (another BLAS, or not
Linux) nothing is set and BLAS keeps its defaults.

Read next: model.py (set_threads).
"""

import ctypes
import os

import numpy as np


# OpenBLAS names its functions differently in each build: NumPy's wheels bundle a
# "scipy_openblas" with a 64_ suffix (64-bit integers), system builds use the plain name.
_BLAS_NAMINGS = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", ""))


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


def set_blas_threads(threads: int) -> bool:
    """Set the thread count of the OpenBLAS that NumPy loaded; False when none could be found."""
    setter = blas_function("set_num_threads")
    if setter is not None:
        setter(ctypes.c_int(threads))
    return setter is not None


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
