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
import math
import mmap
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, ModelError, open_regular_file


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
        self.file = open_regular_file(path)
        weakref.finalize(self, self.file.close)  # closed when the table is collected, without a ResourceWarning

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

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop [stop - start, C], read in one call, as `array[start:stop]` would give."""
        rows = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        if os.preadv(self.file.fileno(), [rows], self.offset + start * self.row_bytes) != rows.nbytes:
            raise ModelError(
                f"{self.path}: rows {start}:{stop} of the word embeddings could not be read; the file changed"
            )
        return rows


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
    stamp: tuple | None = None  # the file's FileStamp when it was mapped
    prefix: str = "roberta"  # the checkpoint names' first part (architectures.py), for messages

    def changed(self) -> str | None:
        """None while model.safetensors is as it was when it was loaded (size, inode, modification
        and change times: one os.stat, a few microseconds), else one line naming the file and
        what changed. The arrays are views of the file's memory map: a file rewritten in place
        would mix old and new weights, a truncated one kill the process (SIGBUS) when a page past
        its end is touched, and a replaced one leave us scoring with the old weights."""
        if self.source is None or self.stamp is None:
            return None
        try:
            now = FileStamp.of(os.stat(self.source))
        except OSError as e:
            return f"{self.source}: the model file is gone since it was loaded ({e.strerror})"
        if now == self.stamp:
            return None
        if now.inode != self.stamp.inode:
            what = "was replaced by another file"
        elif now.size != self.stamp.size:
            what = f"changed size from {self.stamp.size} to {now.size} bytes"
        else:
            what = "was written to"
        return f"{self.source}: the model file {what} since it was loaded; load the model again to use it"


@dataclass(frozen=True)
class FileStamp:
    """What tells a file from a changed one without reading it. The change time (ctime) cannot be
    set back by cp -p, rsync -a or tar, unlike the modification time."""

    size: int
    inode: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> "FileStamp":
        return cls(stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


def refuse_if_changed(weights: Weights) -> None:
    """ModelError (Weights.changed's message) once the weights' file has changed: both engines
    call it before each forward pass, rather than score with stale or mixed weights."""
    message = weights.changed()
    if message:
        raise ModelError(message)


# An encoder layer's modules: checkpoint name -> (our Layer field, out size, in size), sizes named by
# their legend letter (None: a LayerNorm, which has no in size).
LAYER_MODULES = {
    "attention.self.query": ("query", "C", "C"),
    "attention.self.key": ("key", "C", "C"),
    "attention.self.value": ("value", "C", "C"),
    "attention.output.dense": ("attention_output", "C", "C"),
    "attention.output.LayerNorm": ("attention_norm", "C", None),
    "intermediate.dense": ("intermediate", "F", "C"),
    "output.dense": ("output", "C", "F"),
    "output.LayerNorm": ("output_norm", "C", None),
}
LARGE = re.compile(
    r"^(roberta|bert)\.encoder\.layer\.\d+\.(attention\.self\.\w+|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)\.weight$"
)  # the layers' products: 97% of the weights beside the word table


def word_embeddings_name(config: ModelConfig) -> str:
    return f"{config.architecture.prefix}.embeddings.word_embeddings.weight"


def _table(config: ModelConfig) -> dict:
    """Checkpoint name -> (our field path, expected shape). `N` in a path is the layer index.
    The names are transformers' module tree under the architecture's prefix ("roberta" or "bert");
    the head's two linears have names of their own per architecture (architectures.py)."""
    C, F = config.hidden_size, config.intermediate_size
    prefix, (dense, out_proj) = config.architecture.prefix, config.architecture.head
    table = {
        word_embeddings_name(config): ("embeddings.word", (config.vocab_size, C)),
        f"{prefix}.embeddings.position_embeddings.weight": ("embeddings.position", (config.max_position_embeddings, C)),
        f"{prefix}.embeddings.token_type_embeddings.weight": ("embeddings.token_type", (config.type_vocab_size, C)),
    }
    modules = {
        f"{prefix}.embeddings.LayerNorm": ("embeddings.norm", C, None),
        dense: ("classifier.dense", C, C),
        out_proj: ("classifier.out_proj", 1, C),
    }
    sizes = {"C": C, "F": F, None: None}
    for n in range(config.num_hidden_layers):
        for name, (field, out, inp) in LAYER_MODULES.items():
            modules[f"{prefix}.encoder.layer.{n}.{name}"] = (f"layers.{n}.{field}", sizes[out], sizes[inp])
    for name, (field, out, inp) in modules.items():
        table[f"{name}.weight"] = (f"{field}.weight", (out, inp) if inp else (out,))
        table[f"{name}.bias"] = (f"{field}.bias", (out,))
    return table


# Older checkpoints name LayerNorm parameters gamma/beta (TensorFlow's names).
_OLD_NAMES = {".gamma": ".weight", ".beta": ".bias"}

_FLOATS = ("F32", "F16", "BF16")  # what a checkpoint may hold
# the integers only in layout.py's int8 cache files, which read_safetensors reads too
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I8": np.int8, "I32": np.int32}


def load_weights(path, config: ModelConfig) -> Weights:
    """Map model.safetensors at `path` and return its tensors as `Weights`, checked against `config`."""
    path = Path(path)
    mapped = map_safetensors(path)
    tensors = mapped.tensors
    for old, new in _OLD_NAMES.items():
        tensors = {(k[: -len(old)] + new if k.endswith(old) else k): v for k, v in tensors.items()}
    _check_sizes(path, tensors, config)  # before _table, whose size follows num_hidden_layers
    table = _table(config)
    missing = [name for name in table if name not in tensors]
    if missing:
        raise ModelError(f"{path}: missing tensors {_shortlist(missing)}")
    extras = re.compile(f"^({config.architecture.extras})$")  # tensors some checkpoints carry that we do not use
    unknown = [name for name in tensors if name not in table and not extras.match(name)]
    if unknown:
        raise ModelError(
            f"{path}: unexpected tensors {_shortlist(unknown)} (is this a {config.architecture_name} reranker?)"
        )

    fields = {}
    for name, (field, shape) in table.items():
        array, dtype, offset = tensors[name]
        if dtype not in _FLOATS:
            raise ModelError(
                f"{path}: {name} is stored as {dtype}; a checkpoint's tensors must be {', '.join(_FLOATS)}"
            )
        if array.shape != shape:
            raise ModelError(f"{path}: {name} has shape {list(array.shape)}, config.json implies {list(shape)}")
        if field == "embeddings.word":  # read row by row, never mapped (see the module's docstring)
            fields[field] = RowsOnDisk(path, offset, shape, array.dtype)
        else:
            fields[field] = _as_float32(array, dtype)
            if not LARGE.match(name):  # small: checked at every load; the large ones by check_all_finite
                check_finite(fields[field], name, path)

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
        stamp=mapped.stamp,
        prefix=config.architecture.prefix,
    )


def _check_sizes(path: Path, tensors: dict, config: ModelConfig) -> None:
    """Compare config.json's sizes with what the checkpoint holds, before anything is built from
    them: an absurd value (num_hidden_layers 10**7, hidden_size 10**9) is refused at once, naming
    the field and both values, instead of costing minutes and gigabytes before a shape mismatch."""
    prefix = config.architecture.prefix  # "roberta" or "bert"
    layers = {int(m.group(1)) for name in tensors if (m := re.match(rf"{prefix}\.encoder\.layer\.(\d+)\.", name))}
    found = {"num_hidden_layers": max(layers, default=-1) + 1}
    for name, fields in {
        word_embeddings_name(config): ("vocab_size", "hidden_size"),
        f"{prefix}.embeddings.position_embeddings.weight": ("max_position_embeddings", None),
        f"{prefix}.embeddings.token_type_embeddings.weight": ("type_vocab_size", None),
        f"{prefix}.encoder.layer.0.intermediate.dense.weight": ("intermediate_size", None),
    }.items():
        if name in tensors:  # a missing one is reported by load_weights, by name
            for field, size in zip(fields, tensors[name][0].shape):
                if field:
                    found[field] = size
    for field, size in found.items():
        if getattr(config, field) != size:
            raise ModelError(
                f"{path}: config.json says {field} is {getattr(config, field)}, but the checkpoint "
                f"holds {size}; the two files do not belong together"
            )


def embedding_rows(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Gather rows of the word-embedding table as fp32: [N] ids -> [N, C]. Only these rows are read."""
    rows = _rows_as_float32(table[ids])
    if not np.isfinite(rows).all():  # cheap, and the rows a batch reads are all it can be hurt by
        bad = int(ids[np.argmin(np.isfinite(rows).all(axis=1))])
        raise ModelError(
            f"{getattr(table, 'path', 'the word embeddings')}: word_embeddings.weight row {bad} holds NaN "
            "or infinity; the checkpoint is damaged"
        )
    return rows


def _rows_as_float32(rows: np.ndarray) -> np.ndarray:
    if rows.dtype == np.uint16:  # bf16 bits: the top half of an fp32
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32, copy=False)


def check_finite(array: np.ndarray, name: str, path) -> None:
    """ModelError naming the tensor unless every value of `array` is finite: a NaN or infinity in
    a weight gives NaN scores for every pair it touches, with nothing to say why."""
    finite = np.isfinite(array)
    if not finite.all():
        where = np.unravel_index(np.argmin(finite), array.shape)
        raise ModelError(
            f"{path}: {name} holds {array[where]} at {list(map(int, where))}; every weight must be "
            "finite (the checkpoint is damaged, or was saved from a diverged model)"
        )


def check_all_finite(weights: "Weights") -> None:
    """check_finite on the large tensors load_weights leaves unchecked: every layer's products
    (340 MB at bge-reranker-base's size, ~0.2 s) and the word-embedding table (768 MB, read in
    chunks, ~0.5 s). layout.py runs it once, when it writes its cache file; the reference engine
    at construction."""
    fields = {field: name for name, (field, _, inp) in LAYER_MODULES.items() if inp}
    for n, layer in enumerate(weights.layers):
        for field, name in fields.items():
            check_finite(
                getattr(layer, field).weight, f"{weights.prefix}.encoder.layer.{n}.{name}.weight", weights.source
            )
    word = weights.embeddings.word
    for start in range(0, word.shape[0], 4096):  # a chunk of rows at a time: no 768 MB copy
        stop = min(start + 4096, word.shape[0])
        rows = _rows_as_float32(word.rows(start, stop) if isinstance(word, RowsOnDisk) else word[start:stop])
        if not np.isfinite(rows).all():
            where = np.unravel_index(np.argmin(np.isfinite(rows)), rows.shape)
            raise ModelError(
                f"{weights.source}: {weights.prefix}.embeddings.word_embeddings.weight holds {rows[where]} at "
                f"[{start + int(where[0])}, {int(where[1])}]; every weight must be finite"
            )


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
    mapped = map_safetensors(path)
    return mapped.tensors, mapped.metadata


@dataclass(frozen=True)
class Mapped:
    """A safetensors file mapped into memory: read_safetensors' answer, and the map itself."""

    tensors: dict  # name -> (array, dtype, offset)
    metadata: dict
    buffer: mmap.mmap  # the whole file, read-only
    data_start: int  # where the tensors' data begins (8 + the header's length)
    stamp: FileStamp  # the file's, as it was mapped


def map_safetensors(path: Path) -> Mapped:
    """read_safetensors, keeping the map and where the data starts (layout.py checksums it)."""
    try:
        with open_regular_file(path) as f:  # a FIFO or a device is refused, not opened to block
            stamp = FileStamp.of(os.fstat(f.fileno()))  # of the very file mapped, not of its name later
            size = f.seek(0, 2)
            if size < 8:
                raise ModelError(f"{path}: file is {size} bytes, too short to be safetensors")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelError(f"{path}: model.safetensors not found") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from None

    header_size = int.from_bytes(buffer[:8], "little")
    if header_size > min(size - 8, MAX_HEADER):
        raise ModelError(
            f"{path}: header claims {header_size} bytes but the file has {size} (and safetensors allows "
            f"at most {MAX_HEADER}); truncated or not safetensors"
        )
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(
            f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:100]}); the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: header's __metadata__ is not a JSON object; the file is corrupt")

    data_start = 8 + header_size
    tensors, ranges = {}, []
    for name, info in header.items():
        dtype, shape, begin, end = _header_entry(path, name, info, size - data_start)
        count = math.prod(shape)
        array = np.frombuffer(buffer, _DTYPES[dtype], count, data_start + begin).reshape(shape)
        if not array.flags.aligned:
            array = array.copy()  # BLAS and Numba want aligned data; current writers align, old ones may not
        tensors[name] = (array, dtype, data_start + begin)
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:  # two tensors sharing bytes: writing one would change the other
            raise ModelError(f"{path}: the byte ranges of {first} and {second} overlap; the file is corrupt")
    return Mapped(tensors, metadata, buffer, data_start, stamp)


MAX_HEADER = 100_000_000  # bytes: the safetensors format's own limit on the header


def _header_entry(path: Path, name: str, info, data_size: int) -> tuple:
    """(dtype, shape, begin, end) of one header entry, each checked: ModelError naming the file
    and the tensor for anything a safetensors writer cannot have written."""
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not isinstance(info, dict):
        raise ModelError(f"{path}: header entry for {shown} is not an object; the file is corrupt")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ModelError(f"{path}: {shown} has dtype {dtype!r:.40}, not a string; the file is corrupt")
    if dtype not in _DTYPES:
        raise ModelError(f"{path}: {shown} is stored as {dtype[:20]}; only {', '.join(_DTYPES)} are supported")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise ModelError(f"{path}: {shown} has shape {shape!r:.60}, not a list of integers >= 0; the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise ModelError(
            f"{path}: {shown} has data_offsets {offsets!r:.60}, not two integers >= 0; the file is corrupt"
        )
    begin, end = offsets
    if end - begin != np.dtype(_DTYPES[dtype]).itemsize * math.prod(shape):  # Python ints: no overflow
        raise ModelError(f"{path}: {shown} byte range [{begin}, {end}) does not fit its shape {shape}")
    if end > data_size:
        raise ModelError(
            f"{path}: {shown} ends at byte {end} of the data, beyond its {data_size}; the file is truncated"
        )
    return dtype, tuple(shape), begin, end


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shortlist(names: list) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
