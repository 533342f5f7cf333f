"""The fast path's weights in the layout its matrix product wants: packed panels, cached on disk.

torch.nn.Linear stores a weight W [out, in], and y = x @ W.T + b. kernels.fp32.linear_forward makes
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

The metadata also holds a checksum of the data (`_checksum`), verified each time the file is
mapped (~0.1 s for bge-reranker-base's 340 MB): a file damaged since it was written is written
again, with a warning. Before a layout is written every weight of the checkpoint is checked to be
finite (weights.check_all_finite); the stamp and the checksum keep that true at later starts
without reading the 1.1 GB checkpoint again.

Where the cache cannot be written (a read-only or missing home, a full disk) the copies are made
in memory instead, with a warning. Weights built in memory (no file behind them) are copied too.

Other precisions (precisions.py) pack their own way (a `Format`: int8.py's int8 panels with
their scales) into a file of their own beside fp32's, "layout-<precision>-<hash>.safetensors",
with the precision in its metadata, written, checked and mapped in the same way.

Read next: kernels/fp32.py (linear_forward, _tile), model.py, which multiplies by these.
"""

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import precisions
from .config import ModelError
from .kernels.fp32 import PANEL
from .weights import FileStamp, Layer, Weights, check_all_finite, map_safetensors, read_safetensors

LAYOUT_VERSION = 3  # bump when the file's contents change meaning (3: the data checksum)
CHECKSUM_BLOCK = 4096  # bytes summed into one uint64 by _checksum
NO_CHECKSUM = "0" * 8  # the checksum's place in the header while the data is written
SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.int8): "I8",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint16): "BF16",
}  # bf16 bits as uint16, as weights.py reads them
PRODUCTS = {
    "qkv": ("query", "key", "value"),
    "attention_output": ("attention_output",),
    "intermediate": ("intermediate",),
    "output": ("output",),
}  # packed name -> Layer's Linear fields


@dataclass(frozen=True)
class LayerMatrices:
    """One encoder layer's four products, packed for kernels.fp32.linear_forward: panels [P, in, PANEL]
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
    """$NPRERANK_CACHE (a leading ~ expanded, as a shell would), else ~/.cache/nprerank
    (RuntimeError when there is no home to find)."""
    return Path(os.environ.get("NPRERANK_CACHE") or Path.home() / ".cache" / "nprerank").expanduser()


@dataclass(frozen=True)
class Format:
    """How one precision packs a layer: `packed(layer)` yields (name, array), `shapes(layer)`
    (name, shape, dtype) of the same without making them, `matrices(arrays)` the per-layer object."""

    packed: object
    shapes: object
    matrices: object


def gemm_weights(weights: Weights, precision: str = "fp32") -> list:
    """[LayerMatrices] * L for `weights` (for precision "int8", [int8.Int8Matrices] * L):
    memory-mapped from the cache file, written first if needed; one file per checkpoint and
    precision. ModelError naming the tensor when a weight is NaN or infinite."""
    form = precisions.load(precisions.check(precision).format)  # a Format
    # the format's shapes refuse weights it cannot pack (bf16: an odd size): refused here, before any
    # cache file is tried, so the ModelError is not raised again while handling the failed write
    size = _bytes(weights.layers, form)
    if weights.source is None:
        check_all_finite(weights)
        return [_in_memory(layer, form) for layer in weights.layers]
    name = hashlib.sha256(str(Path(weights.source).resolve()).encode()).hexdigest()[:16]
    stamp = _stamp(weights.source, weights.stamp, precision)
    prefix = "layout-" if precision == "fp32" else f"layout-{precision}-"
    matrices = problem = None
    try:
        path = cache_dir() / f"{prefix}{name}.safetensors"
        matrices = _read(path, weights.layers, stamp, form)
    except DamagedLayout as e:  # the file is ours but its data changed since we wrote it
        warnings.warn(f"nprerank: {e}; writing it again", stacklevel=2)
    except ModelError:  # missing, or written for another checkpoint or version
        pass
    except (OSError, RuntimeError) as e:  # no cache folder to be had
        problem = e
    if matrices is not None:
        return matrices
    # Every weight is checked once, here, before its layout is written; the layout's checksum and
    # the checkpoint's stamp then keep that true at every later start, without reading it again.
    check_all_finite(weights)
    try:
        if problem is not None:
            raise problem
        _write(path, weights.layers, stamp, form)
        _prune(path.parent, keep=path)
        return _read(path, weights.layers, stamp, form)
    except (OSError, RuntimeError, ModelError) as e:
        warnings.warn(
            f"nprerank: cannot use the weight layout cache ({e}); keeping the packed copies in "
            f"memory instead (about {size >> 20} MB)",
            stacklevel=2,
        )
        return [_in_memory(layer, form) for layer in weights.layers]


class DamagedLayout(ModelError):
    """A layout file whose data no longer matches the checksum written with it."""


def _checksum(buffer, start: int) -> str:
    """A checksum of buffer[start:] (start a multiple of 8), as 8 hex digits: the uint64 sum of
    each 4 KB block, then zlib.crc32 over those sums and the last partial block. Any changed
    byte changes its block's sum (mod 2^64 a single change cannot cancel), and the crc32 over
    the sums catches blocks swapped or zeroed. It runs at memory speed (numpy's sum, ~0.1 s for
    bge-reranker-base's 340 MB where zlib.crc32 alone takes ~0.45 s), within the start-up
    budget; it guards against damage, not against someone forging a file."""
    whole = (len(buffer) - start) // CHECKSUM_BLOCK * CHECKSUM_BLOCK
    sums = np.frombuffer(buffer, np.uint64, whole // 8, start).reshape(-1, CHECKSUM_BLOCK // 8).sum(axis=1)
    return f"{zlib.crc32(buffer[start + whole :], zlib.crc32(sums)):08x}"


def _stamp(source: Path, file: FileStamp | None = None, precision: str = "fp32") -> dict:
    """What tells this checkpoint file from a changed one (weights.FileStamp: the stamp taken when
    it was mapped, else its stat now), and the precision of the layout, as safetensors metadata,
    which is all strings."""
    file = file or FileStamp.of(os.stat(source))
    fields = {"path": Path(source).resolve(), **asdict(file)}
    precision_field = {} if precision == "fp32" else {"precision": precision}  # fp32 files predate the field
    return {
        "layout_version": str(LAYOUT_VERSION),
        "panel": str(PANEL),
        **precision_field,
        **{f"source_{key}": str(value) for key, value in fields.items()},
    }


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
            metadata.pop("data_checksum", None)
            source = metadata.get("source_path")
            precision = metadata.get("precision", "fp32")
            stale = not source or not os.path.exists(source) or _stamp(source, precision=precision) != metadata
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
    to whole panels (so kernels.fp32.linear_forward never meets a partial one)."""
    panels, biases = [], []
    for linear in linears:
        out, inp = linear.weight.shape
        count = -(-out // PANEL)
        weight = np.zeros((count * PANEL, inp), dtype=np.float32)
        weight[:out] = linear.weight
        panels.append(weight.reshape(count, PANEL, inp).transpose(0, 2, 1))  # [count, in, PANEL]
        biases.append(np.pad(np.asarray(linear.bias, dtype=np.float32), (0, count * PANEL - out)))
    return np.ascontiguousarray(np.concatenate(panels)), np.concatenate(biases)


def _packed(layer: Layer, pack=_pack):
    """(name, array) for every array of the layer's LayerMatrices, made one product at a time.
    pack: Linears -> (panels, bias), fp32's _pack or another format's (bf16.pack)."""
    for name, fields in PRODUCTS.items():
        panels, bias = pack([getattr(layer, field) for field in fields])
        yield name, panels
        yield f"{name}_bias", bias


def _shapes(layer: Layer, panel=lambda K: [K, PANEL], dtype=np.float32):
    """(name, shape, dtype) of what _packed(layer) makes, without making it. panel: a panel's shape
    for K inputs, and dtype its values', for a format other than fp32's (bf16.shapes)."""
    for name, fields in PRODUCTS.items():
        count = sum(-(-getattr(layer, field).weight.shape[0] // PANEL) for field in fields)
        yield name, [count, *panel(getattr(layer, fields[0]).weight.shape[1])], dtype
        yield f"{name}_bias", [count * PANEL], np.float32


FP32 = Format(_packed, _shapes, lambda arrays: LayerMatrices(**arrays))  # precisions.py's fp32 format


def _in_memory(layer: Layer, form: Format):
    return form.matrices(dict(form.packed(layer)))


def _bytes(layers: list, form: Format) -> int:
    return sum(
        np.dtype(dtype).itemsize * int(np.prod(shape)) for layer in layers for _, shape, dtype in form.shapes(layer)
    )


def _write(path: Path, layers: list, stamp: dict, form: Format) -> None:
    """Write every layer's packed arrays to `path` as safetensors: to a temporary file first, then
    renamed into place, so a reader never sees half a file."""
    header, offset = {"__metadata__": {**stamp, "data_checksum": NO_CHECKSUM}}, 0
    for n, layer in enumerate(layers):
        for name, shape, dtype in form.shapes(layer):
            size = np.dtype(dtype).itemsize * int(np.prod(shape))
            header[f"layers.{n}.{name}"] = {
                "dtype": SAFETENSORS_DTYPES[np.dtype(dtype)],
                "shape": shape,
                "data_offsets": [offset, offset + size],
            }
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
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as written:  # the checksum, in its place
                checksum = _checksum(written, 8 + len(text))
            f.seek(8)
            placeholder, value = (f'"data_checksum": "{c}"'.encode() for c in (NO_CHECKSUM, checksum))
            f.write(text.replace(placeholder, value))  # the same length: the data stays where it is
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _read(path: Path, layers: list, stamp: dict, form: Format) -> list:
    """The packed arrays in the file at `path`; ModelError unless it exists, is whole and was
    written for the checkpoint `stamp` describes; DamagedLayout when its data fails the checksum."""
    mapped = map_safetensors(path)
    tensors, metadata = mapped.tensors, dict(mapped.metadata)
    checksum = metadata.pop("data_checksum", None)
    if metadata != stamp:
        raise ModelError(f"{path}: written for another checkpoint or layout version")
    if checksum != _checksum(mapped.buffer, mapped.data_start):
        raise DamagedLayout(f"{path}: the layout cache file is damaged (its data fails the checksum written with it)")
    matrices = []
    for n, layer in enumerate(layers):
        arrays = {}
        for name, shape, want in form.shapes(layer):
            array, dtype, _ = tensors.get(f"layers.{n}.{name}", (None, None, None))
            if array is None or dtype != SAFETENSORS_DTYPES[np.dtype(want)] or list(array.shape) != shape:
                raise ModelError(
                    f"{path}: layers.{n}.{name} is missing or not {SAFETENSORS_DTYPES[np.dtype(want)]} {shape}"
                )
            arrays[name] = array
        matrices.append(form.matrices(arrays))
    return matrices
