"""Reading model.safetensors into the arrays the forward pass uses.

The file is memory-mapped, never read whole, and fp32 tensors are used where they lie in the map
(no copy); fp16 and bf16 tensors are widened to fp32 once at load. The exception is the
word-embedding table, 250002 x 768 (768 MB of the 1.1 GB fp32 checkpoint), of which a batch needs
only the rows of its own tokens. It is not mapped at all: `RowsOnDisk` reads just those rows with
pread. Through a map, each scattered row would bring its neighbours along (the kernel maps 64 KB
or a whole large folio around every fault): 3000 random rows made 590 MB resident here.

The safetensors format: 8 bytes little-endian header length N, N bytes of JSON naming each tensor's
dtype, shape and [begin, end) byte range in the data that follows. We parse it ourselves so that a
truncated or corrupt file is reported by name instead of crashing inside a reader.

`TABLE` is the one place that maps checkpoint names (transformers' module tree, verbatim) to our
fields. Every tensor of the checkpoint is either used once or named as a known, ignored extra;
every shape is checked against the config. Linear weights stay in the checkpoint's [out, in]
layout, as reference.py uses them; the fast path's [in, out] copies are layout.py's business.

Read next: reference.py, which uses these arrays step by step.
"""

import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, ModelError


@dataclass(frozen=True)
class Linear:
    weight: np.ndarray  # [out, in], as stored by torch.nn.Linear
    bias: np.ndarray  # [out]


@dataclass(frozen=True)
class LayerNorm:
    weight: np.ndarray  # [C]
    bias: np.ndarray  # [C]


class RowsOnDisk:
    """A [rows, C] table left in its file; `table[ids]` reads just those rows, as `array[ids]` would."""

    def __init__(self, path: Path, offset: int, shape: tuple, dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, np.dtype(dtype)
        self.row_bytes = shape[1] * self.dtype.itemsize
        self.file = open(path, "rb")  # closed when the table is collected

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)  # [N]
        unique, inverse = np.unique(ids, return_inverse=True)  # read each row once, in file order
        if len(unique) and (unique[0] < 0 or unique[-1] >= self.shape[0]):
            raise IndexError(f"token id out of range [0, {self.shape[0]})")
        rows = np.empty((len(unique), self.shape[1]), dtype=self.dtype)  # [U, C]
        for row, index in zip(rows, unique):
            if os.preadv(self.file.fileno(), [row], self.offset + int(index) * self.row_bytes) != self.row_bytes:
                raise ModelError(f"{self.path}: row {index} of the word embeddings could not be read; the file changed")
        return rows[inverse.reshape(-1)]  # [N, C]


@dataclass(frozen=True)
class Embeddings:
    word: RowsOnDisk  # [vocab, C]; fp32/fp16 as stored, or uint16 holding bf16 bits (an ndarray works too)
    position: np.ndarray  # [max_position_embeddings, C]
    token_type: np.ndarray  # [type_vocab_size, C]
    norm: LayerNorm


@dataclass(frozen=True)
class Layer:
    query: Linear  # [C, C]
    key: Linear  # [C, C]
    value: Linear  # [C, C]
    attention_output: Linear  # [C, C]
    attention_norm: LayerNorm
    intermediate: Linear  # [F, C]
    output: Linear  # [C, F]
    output_norm: LayerNorm


@dataclass(frozen=True)
class Classifier:
    dense: Linear  # [C, C]
    out_proj: Linear  # [1, C]


@dataclass(frozen=True)
class Weights:
    embeddings: Embeddings
    layers: list  # [Layer] * num_hidden_layers
    classifier: Classifier
    source: Path | None = None  # the model.safetensors they were read from (layout.py keys its cache on it)


def _table(config: ModelConfig) -> dict:
    """Checkpoint name -> (our field path, expected shape). `N` in a path is the layer index."""
    C, F = config.hidden_size, config.intermediate_size
    table = {
        "roberta.embeddings.word_embeddings.weight": ("embeddings.word", (config.vocab_size, C)),
        "roberta.embeddings.position_embeddings.weight": ("embeddings.position", (config.max_position_embeddings, C)),
        "roberta.embeddings.token_type_embeddings.weight": ("embeddings.token_type", (config.type_vocab_size, C)),
        "classifier.out_proj.weight": ("classifier.out_proj.weight", (1, C)),
        "classifier.out_proj.bias": ("classifier.out_proj.bias", (1,)),
    }
    modules = {
        "roberta.embeddings.LayerNorm": ("embeddings.norm", C, None),
        "classifier.dense": ("classifier.dense", C, C),
    }
    layer_modules = {
        "attention.self.query": ("query", C, C),
        "attention.self.key": ("key", C, C),
        "attention.self.value": ("value", C, C),
        "attention.output.dense": ("attention_output", C, C),
        "attention.output.LayerNorm": ("attention_norm", C, None),
        "intermediate.dense": ("intermediate", F, C),
        "output.dense": ("output", C, F),
        "output.LayerNorm": ("output_norm", C, None),
    }
    for n in range(config.num_hidden_layers):
        for name, (field, out, inp) in layer_modules.items():
            modules[f"roberta.encoder.layer.{n}.{name}"] = (f"layers.{n}.{field}", out, inp)
    for name, (field, out, inp) in modules.items():
        table[f"{name}.weight"] = (f"{field}.weight", (out, inp) if inp else (out,))
        table[f"{name}.bias"] = (f"{field}.bias", (out,))
    return table


# Tensors some checkpoints carry that the forward pass does not use.
_KNOWN_EXTRAS = re.compile(r"^(roberta\.embeddings\.position_ids|roberta\.pooler\.dense\.(weight|bias))$")

# Older checkpoints name LayerNorm parameters gamma/beta (TensorFlow's names).
_OLD_NAMES = {".gamma": ".weight", ".beta": ".bias"}

_FLOATS = ("F32", "F16", "BF16")  # what a checkpoint may hold
# the integers only in layout.py's int8 cache files, which read_safetensors reads too
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I8": np.int8, "I32": np.int32}


def load_weights(path, config: ModelConfig) -> Weights:
    """Map model.safetensors at `path` and return its tensors as `Weights`, checked against `config`."""
    path = Path(path)
    tensors, _ = read_safetensors(path)
    for old, new in _OLD_NAMES.items():
        tensors = {(k[: -len(old)] + new if k.endswith(old) else k): v for k, v in tensors.items()}
    table = _table(config)
    missing = [name for name in table if name not in tensors]
    if missing:
        raise ModelError(f"{path}: missing tensors {_shortlist(missing)}")
    unknown = [name for name in tensors if name not in table and not _KNOWN_EXTRAS.match(name)]
    if unknown:
        raise ModelError(f"{path}: unexpected tensors {_shortlist(unknown)} (is this an XLM-RoBERTa reranker?)")

    fields = {}
    for name, (field, shape) in table.items():
        array, dtype, offset = tensors[name]
        if dtype not in _FLOATS:
            raise ModelError(f"{path}: {name} is stored as {dtype}; a checkpoint's tensors must be {', '.join(_FLOATS)}")
        if array.shape != shape:
            raise ModelError(f"{path}: {name} has shape {list(array.shape)}, config.json implies {list(shape)}")
        if field == "embeddings.word":
            fields[field] = RowsOnDisk(path, offset, shape, array.dtype)
        else:
            fields[field] = _as_float32(array, dtype)

    def linear(prefix):
        return Linear(fields[f"{prefix}.weight"], fields[f"{prefix}.bias"])

    def layer_norm(prefix):
        return LayerNorm(fields[f"{prefix}.weight"], fields[f"{prefix}.bias"])

    layers = [
        Layer(
            query=linear(f"layers.{n}.query"),
            key=linear(f"layers.{n}.key"),
            value=linear(f"layers.{n}.value"),
            attention_output=linear(f"layers.{n}.attention_output"),
            attention_norm=layer_norm(f"layers.{n}.attention_norm"),
            intermediate=linear(f"layers.{n}.intermediate"),
            output=linear(f"layers.{n}.output"),
            output_norm=layer_norm(f"layers.{n}.output_norm"),
        )
        for n in range(config.num_hidden_layers)
    ]
    return Weights(
        embeddings=Embeddings(
            word=fields["embeddings.word"],
            position=fields["embeddings.position"],
            token_type=fields["embeddings.token_type"],
            norm=layer_norm("embeddings.norm"),
        ),
        layers=layers,
        classifier=Classifier(dense=linear("classifier.dense"), out_proj=linear("classifier.out_proj")),
        source=path,
    )


def embedding_rows(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Gather rows of the word-embedding table as fp32: [N] ids -> [N, C]. Only these rows are read."""
    rows = table[ids]
    if rows.dtype == np.uint16:  # bf16 bits: the top half of an fp32
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32, copy=False)


def _as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return array
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def read_safetensors(path: Path) -> tuple:
    """(tensors, metadata): name -> (read-only array over a memory map, safetensors dtype, byte
    offset in the file), and the header's string-to-string __metadata__ ({} when absent).

    Validates the header against the file's size before anything is read.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise ModelError(f"{path}: file is {size} bytes, too short to be safetensors")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelError(f"{path}: model.safetensors not found") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from None

    header_size = int.from_bytes(buffer[:8], "little")
    if header_size > size - 8:
        raise ModelError(f"{path}: header claims {header_size} bytes but the file has {size}; truncated or not safetensors")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: header's __metadata__ is not a JSON object; the file is corrupt")

    data_start = 8 + header_size
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: header entry for {name} is malformed") from None
        if dtype not in _DTYPES:
            raise ModelError(f"{path}: {name} is stored as {dtype}; only {', '.join(_DTYPES)} are supported")
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != itemsize * int(np.prod(shape)) or begin < 0:
            raise ModelError(f"{path}: {name} byte range [{begin}, {end}) does not fit its shape {list(shape)}")
        if data_start + end > size:
            raise ModelError(f"{path}: {name} ends at byte {data_start + end} beyond the file's {size}; the file is truncated")
        array = np.frombuffer(buffer, _DTYPES[dtype], int(np.prod(shape)), data_start + begin).reshape(shape)
        if not array.flags.aligned:
            array = array.copy()  # BLAS and Numba want aligned data; current writers align, old ones may not
        tensors[name] = (array, dtype, data_start + begin)
    return tensors, metadata


def _shortlist(names: list) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
