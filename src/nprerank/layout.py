"""The fast path's weight matrices in the layout its GEMMs want: [in, out], cached on disk.

torch.nn.Linear stores a weight [out, in], and y = x @ W.T. BLAS can multiply by the transposed
view directly, but OpenBLAS is faster when the weight lies [in, out] (row-major, "NN"): at one
128-token pair, 173 against 154 GFLOP/s on 2 threads over all 12 layers (docs/performance.md).
So the fast path uses [in, out] copies of the six matrices of every layer.

A copy in memory would cost 340 MB of private memory for bge-reranker-base, above our 200 MB
budget. Instead it is written once, on the first load, to a file in the nprerank cache
($NPRERANK_CACHE, default ~/.cache/nprerank), and then memory-mapped like the checkpoint: pages
are read from disk when touched, are shared between processes, and count as file-backed memory.
The file is a plain safetensors file named by a hash of the checkpoint's path; its metadata
records the checkpoint's size, inode, and modification and change times, and a checkpoint that
no longer matches them has its file written again (one file per checkpoint path: a checkpoint
updated in place does not leave its old layout behind). Writing it takes a second or two.

Where the cache cannot be written (a read-only or missing home, a full disk) the copies are made
in memory instead, with a warning. Weights built in memory (no file behind them) are copied too.

Read next: model.py, which multiplies by these.
"""

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelError
from .weights import Layer, Weights, read_safetensors

LAYOUT_VERSION = 1  # bump when the file's contents change meaning
MATRICES = ("query", "key", "value", "attention_output", "intermediate", "output")  # Layer's Linear fields


@dataclass(frozen=True)
class LayerMatrices:
    """One encoder layer's weight matrices, each [in, out] float32 C-contiguous: y = x @ matrix."""

    query: np.ndarray  # [C, C]
    key: np.ndarray  # [C, C]
    value: np.ndarray  # [C, C]
    attention_output: np.ndarray  # [C, C]
    intermediate: np.ndarray  # [C, F]
    output: np.ndarray  # [F, C]


def cache_dir() -> Path:
    """$NPRERANK_CACHE, else ~/.cache/nprerank (RuntimeError when there is no home to find)."""
    return Path(os.environ.get("NPRERANK_CACHE") or Path.home() / ".cache" / "nprerank")


def gemm_weights(weights: Weights) -> list:
    """[LayerMatrices] * L for `weights`: memory-mapped from the cache file, written first if needed."""
    if weights.source is None:
        return [_in_memory(layer) for layer in weights.layers]
    name = hashlib.sha256(str(Path(weights.source).resolve()).encode()).hexdigest()[:16]
    stamp = _stamp(weights.source)
    try:
        path = cache_dir() / f"layout-{name}.safetensors"
        try:
            return _read(path, weights.layers, stamp)
        except ModelError:  # missing, stale or damaged: write it, once
            _write(path, weights.layers, stamp)
            return _read(path, weights.layers, stamp)
    except (OSError, RuntimeError, ModelError) as e:
        warnings.warn(f"nprerank: cannot use the weight layout cache ({e}); keeping the [in, out] copies in "
                      f"memory instead (about {_bytes(weights.layers) >> 20} MB)", stacklevel=3)
        return [_in_memory(layer) for layer in weights.layers]


def _stamp(source: Path) -> dict:
    """What tells this checkpoint file from a changed one (safetensors metadata is all strings).
    The change time cannot be set back by cp -p, rsync -a or tar, unlike the modification time."""
    stat = os.stat(source)
    fields = {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    return {"layout_version": str(LAYOUT_VERSION), **{f"source_{key}": str(value) for key, value in fields.items()}}


def _in_memory(layer: Layer) -> LayerMatrices:
    return LayerMatrices(*(np.ascontiguousarray(getattr(layer, name).weight.T) for name in MATRICES))


def _bytes(layers: list) -> int:
    return sum(getattr(layer, name).weight.nbytes for layer in layers for name in MATRICES)


def _write(path: Path, layers: list, stamp: dict) -> None:
    """Write every layer's matrices transposed to `path` as safetensors: to a temporary file first,
    then renamed into place, so a reader never sees half a file."""
    header, offset = {"__metadata__": stamp}, 0
    for n, layer in enumerate(layers):
        for name in MATRICES:
            out, inp = getattr(layer, name).weight.shape
            header[f"layers.{n}.{name}"] = {"dtype": "F32", "shape": [inp, out], "data_offsets": [offset, offset + 4 * out * inp]}
            offset += 4 * out * inp
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 64)  # the data starts 64-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for layer in layers:
                for name in MATRICES:  # one matrix at a time: at most 9 MB of extra memory
                    f.write(np.ascontiguousarray(getattr(layer, name).weight.T, dtype=np.float32).data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _read(path: Path, layers: list, stamp: dict) -> list:
    """The matrices in the file at `path`; ModelError unless it exists, is whole and was written
    for the checkpoint `stamp` describes."""
    tensors, metadata = read_safetensors(path)
    if metadata != stamp:
        raise ModelError(f"{path}: written for another checkpoint or layout version")
    matrices = []
    for n, layer in enumerate(layers):
        arrays = []
        for name in MATRICES:
            want = getattr(layer, name).weight.shape[::-1]
            array, dtype, _ = tensors.get(f"layers.{n}.{name}", (None, None, None))
            if array is None or dtype != "F32" or array.shape != want:
                raise ModelError(f"{path}: layers.{n}.{name} is missing or not F32 {list(want)}")
            arrays.append(array)
        matrices.append(LayerMatrices(*arrays))
    return matrices
