"""The fast path's weights in the layout its matrix product wants: packed panels, cached on disk.

torch.nn.Linear stores a weight W [out, in], and y = x @ W.T + b. kernels.linear_forward makes
y PANEL columns at a time (PANEL = 32 with AVX-512): for each k it reads the PANEL weights
W[j, k] of those columns at once, as two vectors. So W is stored as panels [P, in, PANEL]: panel
p holds columns p * PANEL ... of W.T, row k of it being exactly what step k reads, and a whole
panel lies in one contiguous block that streams from memory in order. BLAS makes the same copy
(it "packs" W) inside every call; we make it once. The query, key and value weights go side by
side into one [C, 3C] product, and each Linear is padded with zero columns to whole panels (the
bias too), so the kernels never meet a partial panel.

A copy in memory would cost 340 MB of private memory for bge-reranker-base, above our 200 MB
budget. Instead it is written once, on the first load, to a file in the nprerank cache
($NPRERANK_CACHE, default ~/.cache/nprerank), and then memory-mapped like the checkpoint: pages
are read from disk when touched, are shared between processes, and count as file-backed memory.
The file is a plain safetensors file named by a hash of the checkpoint's path; its metadata
records the layout's version and PANEL, and the checkpoint's path, size, inode, and modification
and change times, and a checkpoint that no longer matches them has its file written again (one
file per checkpoint path: a checkpoint updated in place does not leave its old layout behind).
Writing it takes a second or two, after which the layouts of checkpoints that are gone or have
changed are deleted.

Where the cache cannot be written (a read-only or missing home, a full disk) the copies are made
in memory instead, with a warning. Weights built in memory (no file behind them) are copied too.

Read next: kernels.py (linear_forward, _tile), model.py, which multiplies by these.
"""

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelError
from .kernels import PANEL
from .weights import Layer, Weights, read_safetensors

LAYOUT_VERSION = 2  # bump when the file's contents change meaning
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int8): "I8", np.dtype(np.int32): "I32"}
PRODUCTS = {"qkv": ("query", "key", "value"), "attention_output": ("attention_output",),
            "intermediate": ("intermediate",), "output": ("output",)}  # packed name -> Layer's Linear fields


@dataclass(frozen=True)
class LayerMatrices:
    """One encoder layer's four products, packed for kernels.linear_forward: panels [P, in, PANEL]
    float32 C-contiguous (out rounded up to P * PANEL with zero columns), and the bias [P * PANEL]."""

    qkv: np.ndarray  # [3 Pc, C, PANEL]: the query, key and value panels, in that order (Pc = C / PANEL)
    qkv_bias: np.ndarray  # [3 Pc PANEL]
    attention_output: np.ndarray  # [Pc, C, PANEL]
    attention_output_bias: np.ndarray
    intermediate: np.ndarray  # [Pf, C, PANEL]
    intermediate_bias: np.ndarray
    output: np.ndarray  # [Pc, F, PANEL]
    output_bias: np.ndarray

    @property
    def width(self) -> int:
        """Columns of each of query, key and value in the qkv product: C rounded up to whole panels."""
        return len(self.qkv) // 3 * PANEL


def cache_dir() -> Path:
    """$NPRERANK_CACHE, else ~/.cache/nprerank (RuntimeError when there is no home to find)."""
    return Path(os.environ.get("NPRERANK_CACHE") or Path.home() / ".cache" / "nprerank")


@dataclass(frozen=True)
class Format:
    """How one precision packs a layer: `packed(layer)` yields (name, array), `shapes(layer)`
    (name, shape, dtype) of the same without making them, `matrices(arrays)` the per-layer object."""

    packed: object
    shapes: object
    matrices: object


def formats() -> dict:
    """precision -> Format. int8.py defines its own format (imported here, not at the top: it
    imports reference.py, which the fp32 path does not need)."""
    from . import int8

    return {"fp32": Format(_packed, _shapes, lambda arrays: LayerMatrices(**arrays)),
            "int8": Format(int8.packed, int8.shapes, int8.matrices)}


def gemm_weights(weights: Weights, precision: str = "fp32") -> list:
    """[LayerMatrices] * L for `weights` (or, for precision "int8", [int8.Int8Matrices] * L):
    memory-mapped from the cache file, written first if needed. One file per checkpoint and precision."""
    form = formats()[precision]
    if weights.source is None:
        return [_in_memory(layer, form) for layer in weights.layers]
    name = hashlib.sha256(str(Path(weights.source).resolve()).encode()).hexdigest()[:16]
    stamp = _stamp(weights.source, precision)
    prefix = "layout-" if precision == "fp32" else f"layout-{precision}-"
    try:
        path = cache_dir() / f"{prefix}{name}.safetensors"
        try:
            return _read(path, weights.layers, stamp, form)
        except ModelError:  # missing, stale or damaged: write it, once
            _write(path, weights.layers, stamp, form)
            _prune(path.parent, keep=path)
            return _read(path, weights.layers, stamp, form)
    except (OSError, RuntimeError, ModelError) as e:
        warnings.warn(f"nprerank: cannot use the weight layout cache ({e}); keeping the packed copies in "
                      f"memory instead (about {_bytes(weights.layers, form) >> 20} MB)", stacklevel=3)
        return [_in_memory(layer, form) for layer in weights.layers]


def _stamp(source: Path, precision: str = "fp32") -> dict:
    """What tells this checkpoint file from a changed one (safetensors metadata is all strings).
    The change time cannot be set back by cp -p, rsync -a or tar, unlike the modification time."""
    stat = os.stat(source)
    fields = {"path": Path(source).resolve(), "size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns,
              "ctime_ns": stat.st_ctime_ns}
    precision_field = {} if precision == "fp32" else {"precision": precision}  # fp32 files predate the field
    return {"layout_version": str(LAYOUT_VERSION), "panel": str(PANEL), **precision_field,
            **{f"source_{key}": str(value) for key, value in fields.items()}}


def _prune(folder: Path, keep: Path) -> None:
    """Delete the layout files whose checkpoint is gone or has changed since they were written (a
    deleted model folder, an old Hugging Face revision), and temporary files over an hour old (a
    writer killed mid-write). Runs after each write, which is rare; a file in use by another
    process stays readable through its memory map until that process lets go."""
    for path in folder.glob("layout-*.safetensors"):
        if path == keep:
            continue
        try:
            _, metadata = read_safetensors(path)
            source = metadata.get("source_path")
            precision = metadata.get("precision", "fp32")
            stale = not source or not os.path.exists(source) or _stamp(source, precision) != metadata
        except (OSError, ModelError):  # unreadable: not a layout file we can use
            stale = True
        if stale:
            with contextlib.suppress(OSError):
                path.unlink()
    for path in folder.glob("layout-*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > 3600:
                path.unlink()


def _pack(linears: list) -> tuple:
    """Linear layers [out, in] side by side -> (panels [P, in, PANEL], bias [P * PANEL]): panel p
    holds output columns p * PANEL ... as [in, PANEL] rows, each layer padded with zero columns
    to whole panels (so kernels.linear_forward never meets a partial one)."""
    panels, biases = [], []
    for linear in linears:
        out, inp = linear.weight.shape
        count = -(-out // PANEL)
        weight = np.zeros((count * PANEL, inp), dtype=np.float32)
        weight[:out] = linear.weight
        panels.append(weight.reshape(count, PANEL, inp).transpose(0, 2, 1))  # [count, in, PANEL]
        biases.append(np.pad(np.asarray(linear.bias, dtype=np.float32), (0, count * PANEL - out)))
    return np.ascontiguousarray(np.concatenate(panels)), np.concatenate(biases)


def _packed(layer: Layer):
    """(name, array) for every array of the layer's LayerMatrices, made one product at a time."""
    for name, fields in PRODUCTS.items():
        panels, bias = _pack([getattr(layer, field) for field in fields])
        yield name, panels
        yield f"{name}_bias", bias


def _shapes(layer: Layer):
    """(name, shape, dtype) of what _packed(layer) makes, without making it."""
    for name, fields in PRODUCTS.items():
        count = sum(-(-getattr(layer, field).weight.shape[0] // PANEL) for field in fields)
        yield name, [count, getattr(layer, fields[0]).weight.shape[1], PANEL], np.float32
        yield f"{name}_bias", [count * PANEL], np.float32


def _in_memory(layer: Layer, form: Format):
    return form.matrices(dict(form.packed(layer)))


def _bytes(layers: list, form: Format) -> int:
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for layer in layers for _, shape, dtype in form.shapes(layer))


def _write(path: Path, layers: list, stamp: dict, form: Format) -> None:
    """Write every layer's packed arrays to `path` as safetensors: to a temporary file first, then
    renamed into place, so a reader never sees half a file."""
    header, offset = {"__metadata__": stamp}, 0
    for n, layer in enumerate(layers):
        for name, shape, dtype in form.shapes(layer):
            size = np.dtype(dtype).itemsize * int(np.prod(shape))
            header[f"layers.{n}.{name}"] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": shape,
                                            "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 64)  # the data starts 64-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for layer in layers:
                for _, array in form.packed(layer):  # one product at a time: at most ~30 MB of extra memory
                    f.write(array.data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _read(path: Path, layers: list, stamp: dict, form: Format) -> list:
    """The packed arrays in the file at `path`; ModelError unless it exists, is whole and was
    written for the checkpoint `stamp` describes."""
    tensors, metadata = read_safetensors(path)
    if metadata != stamp:
        raise ModelError(f"{path}: written for another checkpoint or layout version")
    matrices = []
    for n, layer in enumerate(layers):
        arrays = {}
        for name, shape, want in form.shapes(layer):
            array, dtype, _ = tensors.get(f"layers.{n}.{name}", (None, None, None))
            if array is None or dtype != SAFETENSORS_DTYPES[np.dtype(want)] or list(array.shape) != shape:
                raise ModelError(f"{path}: layers.{n}.{name} is missing or not {SAFETENSORS_DTYPES[np.dtype(want)]} {shape}")
            arrays[name] = array
        matrices.append(form.matrices(arrays))
    return matrices
