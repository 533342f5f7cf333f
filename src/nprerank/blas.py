"""Finding the OpenBLAS that NumPy loaded: its thread count, its kernel name, and its sgemm.

The fast path's matrix products run on OpenBLAS: through NumPy on few rows, where OpenBLAS
starts its own threads, and as cblas_sgemm called from inside Numba kernels
(kernels.linear_forward, kernels.attention_forward), which need its address and its integer
width. The fast path's `threads=` must bound OpenBLAS's threads too (model.set_threads), and the
benchmark reports which CPU kernel OpenBLAS chose. NumPy offers none of
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


def cblas_sgemm() -> tuple:
    """(address of OpenBLAS's cblas_sgemm, its integer width in bits), or (0, 0) when not found.

    NumPy's wheels bundle an ILP64 OpenBLAS (64-bit integers); other builds may take 32-bit ones.
    The width comes from the build's own configuration string (USE64BITINT), or else from the
    name (ILP64 builds of NumPy's wheels end their names in 64_). The caller must pass integers
    of that width: a wrong one corrupts memory.
    """
    library = _library()
    for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_", "scipy_cblas_sgemm", "cblas_sgemm") if library else ():
        function = getattr(library, name, None)
        if function is not None:
            config = blas_function("get_config")
            if config is not None:
                config.restype = ctypes.c_char_p
                bits = 64 if b"USE64BITINT" in (config() or b"") else 32
            else:
                bits = 64 if name.endswith("64_") else 32
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
    numpy_folder = os.path.dirname(os.path.realpath(np.__file__))  # numpy/ and numpy.libs/ beside it
    return sorted(found, key=lambda path: not os.path.realpath(path).startswith(numpy_folder))
