"""Finding the OpenBLAS that NumPy loaded: its thread count and its kernel name.

The reference path's products run on NumPy, and so on its OpenBLAS (the fast path multiplies
with its own kernel, kernels.fp32._tile). `threads=` must bound OpenBLAS's threads as well as Numba's
(model.set_threads), and the benchmark reports which CPU kernel OpenBLAS chose. NumPy offers
neither, so we look the functions up through ctypes, in the copy of the library mapped into this
process. Without one (another BLAS, or not Linux) nothing is set and BLAS keeps its defaults.

Read next: model.py (set_threads).
"""

import ctypes
import functools
import os

import numpy as np


# OpenBLAS names its functions differently in each build: NumPy's wheels bundle a
# "scipy_openblas" with a 64_ suffix (64-bit integers), system builds use the plain name.
_BLAS_NAMINGS = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", ""))


@functools.cache
def _library():
    """A ctypes handle on the OpenBLAS NumPy loaded, or None. NumPy's own copy comes first: SciPy
    (imported by torch or transformers, say) may have mapped a second OpenBLAS into the process."""
    for path in _loaded_blas_libraries():
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@functools.cache
def blas_function(name: str):
    """OpenBLAS's `name` ("set_num_threads", "get_corename", ...) from the copy NumPy loaded, or None."""
    library = _library()
    for prefix, suffix in _BLAS_NAMINGS if library is not None else ():
        function = getattr(library, f"{prefix}{name}{suffix}", None)
        if function is not None:
            return function
    return None


def set_blas_threads(threads: int | None) -> bool:
    """Set the thread count of the OpenBLAS that NumPy loaded; False when none could be found."""
    setter = blas_function("set_num_threads")
    if setter is not None and threads is not None:
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
    numpy_folder = os.path.dirname(os.path.realpath(np.__file__))  # numpy/ and numpy.libs/ beside it
    return sorted(found, key=lambda path: not os.path.realpath(path).startswith(numpy_folder))
