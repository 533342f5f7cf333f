"""Text -> token ids for XLM-R's sentencepiece Unigram vocabulary, in NumPy arrays and Numba.

What it owns: reading tokenizer.json into a compact form, caching that form on disk, and the
Viterbi search that cuts each word into the pieces of highest total score. It must give exactly
the ids of the `tokenizers` library (and so transformers) on the same file; tests/ check that on
a vocabulary of the real size.

Why not `tokenizers` alone: for a 250,002-piece Unigram vocabulary it holds about 270 MB of
private memory (a Rust HashMap from piece to id, and a byte trie whose every node is a HashMap
of its children) and takes 0.5-2.5 s to parse and build it, on every start. sentencepiece's own
library, on the same pieces, takes 56 MB and about as long (it builds its double-array trie at
load). Here the vocabulary is four flat arrays, built once per tokenizer.json and then
memory-mapped from the nprerank cache: ~20 MB of file-backed pages, shared between processes,
read in a few milliseconds. docs/performance.md has the measurements.

The work is split where the two libraries' jobs meet:
1. `tokenizers` still does everything before the vocabulary, from the same tokenizer.json: it
   splits out the added (special) tokens typed in the text, with their lstrip/rstrip rules, and
   normalises the rest (XLM-R: the sentencepiece "nmt_nfkc" charsmap). For that it runs a
   *frame*: the same tokenizer.json with the Unigram model swapped for a one-word WordLevel
   model and no pre-tokenizer, so each stretch of text between special tokens comes back as one
   placeholder token with its offsets into the text.
2. Each stretch is normalised and pre-tokenised (XLM-R: split on whitespace, "▁" before each
   word) by the same file's normalizer and pre-tokenizer objects.
3. `viterbi_forward` cuts every distinct word of the batch into pieces at once: the best-scoring
   segmentation, unknown characters scored as the lowest piece score - 10 and runs of them fused
   into one <unk>, exactly as tokenizers' `Unigram::encode_optimized` (itself a port of
   sentencepiece's unigram_model.cc) does, down to its tie-breaking.

The vocabulary arrays, built once (`_build`):
- `scores` float64 [V]: each piece's log-probability, by id (float64 as tokenizers keeps them,
  so that sums and ties come out bit for bit the same).
- a byte trie over all V pieces in level order: node 0 is the root, the children of node n are
  the nodes child_start[n] ... child_start[n+1] - 1, sorted by their byte `labels`, so a child is
  found by binary search; `piece` [nodes] is the id of the piece that ends at a node, or -1.

Read next: tokenizer.py, which joins these ids into `<s> query </s></s> passage </s>`.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from numba import njit

from .config import ModelError, open_regular_file

CACHE_VERSION = 1  # bump when the cached arrays change meaning
UNK_PENALTY = 10.0  # tokenizers' K_UNK_PENALTY (sentencepiece's kUnkPenalty): unk scores min_score - 10
PLACEHOLDER = "\x00nprerank-text"  # the frame's one word; no tokenizer.json has it as a piece
ARRAYS = ("scores", "labels", "child_start", "piece")


class Unigram:
    """The tokenizer.json at `path`, ready to encode: `encode_texts`, `token_to_id`, `vocab_size`.

    ModelError (naming the file) when it is missing, not valid JSON, or not a Unigram model with
    an <unk> piece and without byte fallback (XLM-R's kind: all nprerank reads).
    """

    def __init__(self, path):
        from tokenizers import Tokenizer

        path = Path(path)
        frame, arrays = _load(path)
        self.scores, self.labels, self.child_start, self.piece = (arrays[name] for name in ARRAYS)
        self.unk_id = frame["unk_id"]
        self.unk_score = float(self.scores.min()) - UNK_PENALTY  # the lowest score, specials' 0.0 included
        self.added = {token["content"]: token["id"] for token in frame["tokenizer"]["added_tokens"]}
        self.placeholder_id = frame["placeholder_id"]
        try:
            self.frame = Tokenizer.from_str(json.dumps(frame["tokenizer"]))
        except Exception as e:  # the Rust side raises a plain Exception for a bad normalizer etc.
            raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None
        self.frame.no_truncation()
        self.frame.no_padding()
        self.normalizer = self.frame.normalizer
        self.pre_tokenizer = _pre_tokenizer(frame["pre_tokenizer"], path)

    @property
    def vocab_size(self) -> int:
        """The highest id + 1, added tokens included."""
        return max(len(self.scores), max(self.added.values(), default=-1) + 1)

    def token_to_id(self, token: str) -> int | None:
        """The id of an added token or a piece, as tokenizers' `token_to_id`; None if there is none."""
        if token in self.added:
            return self.added[token]
        node = 0
        for byte in token.encode("utf-8"):
            node = _child(node, byte, self.labels, self.child_start)
            if node < 0:
                return None
        return int(self.piece[node]) if node > 0 and self.piece[node] >= 0 else None

    def encode_texts(self, texts: list) -> list:
        """[text] -> [ids] without special tokens or truncation: tokenizers' `encode_batch(texts,
        add_special_tokens=False)` ids, special tokens typed in a text included."""
        words, plans = {}, []  # each distinct word once; per text, its added-token ids and words in order
        for text, encoding in zip(texts, self.frame.encode_batch(texts, add_special_tokens=False)):
            plan, begin = [], 0
            # The text between added tokens is read from the added tokens' spans (which include the
            # whitespace an lstrip/rstrip token takes), not from the placeholders': a placeholder's
            # span can stop short of the text's end when normalising shortens it ("cafe\u0301").
            for token_id, (start, end) in [*zip(encoding.ids, encoding.offsets), (None, (len(text), len(text)))]:
                if token_id == self.placeholder_id:
                    continue
                plan += [words.setdefault(word, len(words)) for word in self._words(text[begin:start])]
                if token_id is not None:
                    plan.append(-1 - token_id)  # an added token: its id, kept apart from word numbers
                begin = end
            plans.append(plan)
        pieces = self._pieces(list(words))
        return [_expand(plan, pieces) for plan in plans]

    def _words(self, text: str) -> list:
        """One stretch of text between added tokens -> its normalised, pre-tokenised words."""
        normalized = self.normalizer.normalize_str(text) if self.normalizer is not None else text
        if self.pre_tokenizer is None:
            return [normalized] if normalized else []
        return [word for word, _ in self.pre_tokenizer.pre_tokenize_str(normalized)]

    def _pieces(self, words: list) -> list:
        """[word] -> [[piece id]]: every word cut by one call of viterbi_forward."""
        if not words:
            return []
        encoded = [word.encode("utf-8") for word in words]
        text = np.frombuffer(b"".join(encoded), dtype=np.uint8)  # [bytes] all words back to back
        offsets = np.zeros(len(words) + 1, dtype=np.int64)  # [W + 1] where each word starts
        np.cumsum([len(word) for word in encoded], out=offsets[1:])
        ids = np.empty(len(text), dtype=np.int32)  # a piece is at least one byte long
        counts = np.empty(len(words), dtype=np.int64)  # [W] pieces per word
        viterbi_forward(
            ids,
            counts,
            text,
            offsets,
            self.labels,
            self.child_start,
            self.piece,
            self.scores,
            self.unk_id,
            self.unk_score,
        )
        ids = ids.tolist()
        ends = np.cumsum(counts).tolist()
        return [ids[end - count : end] for end, count in zip(ends, counts.tolist())]


def _expand(plan: list, pieces: list) -> list:
    """A text's plan (added-token ids as -1 - id, word numbers) -> its token ids."""
    out = []
    for item in plan:
        if item < 0:
            out.append(-1 - item)
        else:
            out += pieces[item]
    return out


# --- the vocabulary arrays, cached ------------------------------------------------------------


def is_cached(path) -> bool:
    """Whether the cache holds current arrays for the tokenizer.json at `path`: then it is a Unigram
    tokenizer nprerank has read before, and its 17 MB of JSON need not be parsed again to say so."""
    with contextlib.suppress(ModelError, OSError, ValueError, KeyError, RuntimeError):
        folder, stamp = _cache_entry(Path(path))
        return json.loads((folder / "stamp.json").read_text()) == stamp
    return False


def _cache_entry(path: Path) -> tuple:
    """(cache folder, stamp) of the tokenizer.json at `path`: the stamp tells this file from a changed
    one (as layout.py's stamp of the checkpoint). ModelError naming the file if it is missing or
    unreadable; RuntimeError if there is no home directory to find the cache in."""
    from .layout import cache_dir

    try:
        with open_regular_file(path) as f:  # a FIFO would block the read for ever, a device never end
            stat = os.fstat(f.fileno())
    except FileNotFoundError:
        raise ModelError(f"{path}: tokenizer.json not found") from None
    except OSError as e:
        raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None
    stamp = {
        "version": CACHE_VERSION,
        "path": str(path.resolve()),
        "size": stat.st_size,
        "inode": stat.st_ino,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
    }
    return cache_dir() / f"unigram-{hashlib.sha256(stamp['path'].encode()).hexdigest()[:16]}", stamp


def _load(path: Path) -> tuple:
    """(frame, arrays) for the tokenizer.json at `path`: memory-mapped from the nprerank cache,
    built and written there first if missing or stale; kept in memory if the cache is unwritable."""
    try:
        folder, stamp = _cache_entry(path)
        with contextlib.suppress(OSError, ValueError, KeyError):
            return _read(folder, stamp)
    except RuntimeError:  # no home directory to find the cache in
        folder = None
    frame, arrays = _build(path)
    try:
        if folder is None:
            raise OSError("no cache folder (set NPRERANK_CACHE)")
        _write(folder, frame, arrays, stamp)
        _prune(folder.parent)
        return _read(folder, stamp)
    except (OSError, ValueError, KeyError) as e:
        for array in arrays.values():  # read-only like the mapped ones: one compiled viterbi_forward
            array.flags.writeable = False
        warnings.warn(
            f"nprerank: cannot cache the tokenizer's arrays ({e}); keeping them in memory "
            f"(about {sum(a.nbytes for a in arrays.values()) >> 20} MB)",
            stacklevel=4,
        )
        return frame, arrays


def _read(folder: Path, stamp: dict) -> tuple:
    """The cached (frame, arrays) in `folder`; OSError/ValueError/KeyError unless whole and written
    for the file `stamp` describes."""
    if json.loads((folder / "stamp.json").read_text()) != stamp:
        raise ValueError(f"{folder}: written for another tokenizer.json")
    frame = json.loads((folder / "frame.json").read_text(encoding="utf-8"))
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r").view(np.ndarray) for name in ARRAYS}
    _check(arrays)
    return frame, arrays


def _write(folder: Path, frame: dict, arrays: dict, stamp: dict) -> None:
    """Write the arrays into a temporary folder, then rename it into place (a reader never sees half
    of it; of two processes writing at once, one wins and both read the same)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "frame.json").write_text(json.dumps(frame, ensure_ascii=False), encoding="utf-8")
        (tmp / "stamp.json").write_text(json.dumps(stamp))  # last: its presence means the rest is there
        if folder.exists():  # stale: move it aside first, a directory cannot be replaced in one step
            old = folder.with_name(f"{folder.name}.{os.getpid()}.old")
            with contextlib.suppress(OSError):
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process may have put its copy there meanwhile
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(cache: Path) -> None:
    """Delete the cached arrays of tokenizer.json files that are gone or have changed since (a
    deleted model folder, an old revision), and temporary folders left by a killed writer. Runs
    after each write, which is rare; a process still mapping deleted arrays keeps them until it exits."""
    for folder in cache.glob("unigram-*"):
        try:
            if folder.name.endswith((".tmp", ".old")):
                stale = time.time() - folder.stat().st_mtime > 3600
            else:
                stamp = json.loads((folder / "stamp.json").read_text())
                stat = os.stat(stamp["path"])
                stale = (stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns) != (
                    stamp["size"],
                    stamp["inode"],
                    stamp["mtime_ns"],
                    stamp["ctime_ns"],
                )
        except (OSError, ValueError, KeyError, TypeError):  # its tokenizer.json is gone, or it is not ours
            stale = True
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _check(arrays: dict) -> None:
    """ValueError unless the arrays have the dtypes and shapes viterbi_forward relies on."""
    scores, labels, child_start, piece = (arrays[name] for name in ARRAYS)
    nodes = len(labels)
    if not (
        scores.dtype == np.float64
        and labels.dtype == np.uint8
        and child_start.dtype == np.int64
        and piece.dtype == np.int32
        and scores.ndim == labels.ndim == child_start.ndim == piece.ndim == 1
        and len(child_start) == nodes + 1
        and len(piece) == nodes
        and nodes >= 1
        and child_start[-1] == nodes
        and int(piece.max()) < len(scores)
    ):
        raise ValueError("cached tokenizer arrays are damaged")


def _build(path: Path) -> tuple:
    """tokenizer.json -> (frame, arrays): the frame is the file's JSON minus its vocabulary (its
    Unigram model becomes a WordLevel placeholder, its pre-tokenizer is kept apart)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: tokenizer.json not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None
    model = document.get("model") if isinstance(document, dict) else None
    if isinstance(model, dict) and model.get("type", "Unigram") != "Unigram":
        raise ModelError(
            f"{path}: the tokenizer's model is {model.get('type')}; nprerank reads XLM-R's Unigram tokenizers"
        )
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), list):
        raise ModelError(f"{path}: not a usable tokenizer.json (no model vocabulary)")
    vocab = model["vocab"]
    if not vocab or not all(
        isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], (int, float))
        for entry in vocab
    ):
        raise ModelError(f"{path}: not a usable tokenizer.json (the Unigram vocabulary must be [piece, score] pairs)")
    unk_id = model.get("unk_id")
    if isinstance(unk_id, bool) or not isinstance(unk_id, int) or not 0 <= unk_id < len(vocab):
        raise ModelError(f"{path}: the Unigram model has no <unk> piece (unk_id {unk_id!r}); not an XLM-R tokenizer")
    if model.get("byte_fallback"):
        raise ModelError(
            f"{path}: the Unigram model uses byte fallback; XLM-R's does not, and nprerank does not either"
        )
    added = document.get("added_tokens") or []
    placeholder_id = max([len(vocab) - 1] + [token.get("id", -1) for token in added]) + 1
    frame_vocab = {token["content"]: token["id"] for token in added}
    frame_vocab[PLACEHOLDER] = placeholder_id
    tokenizer = {
        **document,
        "truncation": None,
        "padding": None,
        "pre_tokenizer": None,
        "model": {"type": "WordLevel", "vocab": frame_vocab, "unk_token": PLACEHOLDER},
    }
    frame = {
        "tokenizer": tokenizer,
        "pre_tokenizer": document.get("pre_tokenizer"),
        "unk_id": unk_id,
        "placeholder_id": placeholder_id,
    }
    arrays = {
        "scores": np.array([score for _, score in vocab], dtype=np.float64),
        **_trie([piece for piece, _ in vocab]),
    }
    return frame, arrays


def _trie(pieces: list) -> dict:
    """[piece] (id = position) -> the level-order byte trie: labels, child_start, piece.

    Sorted, the pieces that share their first d bytes are neighbours, so the nodes at depth d are
    the runs of equal d-byte prefixes, numbered in sorted order; each node's children then lie
    side by side, sorted by byte. A piece that appears twice keeps its last id (as tokenizers'
    HashMap from piece to id does).
    """
    ids = {}
    for i, piece in enumerate(pieces):
        ids[piece.encode("utf-8")] = i
    keys = sorted(ids)  # bytes sort byte by byte: UTF-8 order
    lengths = np.array([len(key) for key in keys], dtype=np.int64)  # [P]
    width = int(lengths.max())
    matrix = np.frombuffer(b"".join(key.ljust(width, b"\0") for key in keys), dtype=np.uint8).reshape(-1, width)
    differs = matrix[1:] != matrix[:-1]  # [P - 1, width]
    common = np.where(differs.any(axis=1), differs.argmax(axis=1), width)  # shared leading bytes of neighbours
    common = np.concatenate([[0], np.minimum(common, np.minimum(lengths[1:], lengths[:-1]))])  # [P]

    labels, parents, piece_nodes = [np.zeros(1, np.uint8)], [], np.zeros(len(keys), np.int64)
    node_of = np.zeros(len(keys), np.int64)  # each piece's node at the current depth (the root at 0)
    count = 1
    for depth in range(1, width + 1):
        active = lengths >= depth
        new = active & (common < depth)  # the first piece of each run of equal depth-byte prefixes
        parents.append(node_of[new])
        labels.append(matrix[new, depth - 1])
        node_of = np.where(active, count + np.cumsum(new) - 1, node_of)
        piece_nodes[lengths == depth] = node_of[lengths == depth]
        count += int(new.sum())
    children = np.bincount(np.concatenate(parents), minlength=count)  # [nodes]
    child_start = np.concatenate([[1], 1 + np.cumsum(children)]).astype(np.int64)  # [nodes + 1]
    piece = np.full(count, -1, dtype=np.int32)
    piece[piece_nodes] = [ids[key] for key in keys]
    return {"labels": np.concatenate(labels), "child_start": child_start, "piece": piece}


def _pre_tokenizer(spec, path: Path):
    """The file's pre-tokenizer as a `tokenizers` object (None if it has none).

    It runs here on each stretch of normalised text alone, which equals running it inside the
    whole text only if it does not look at where the stretch began: Metaspace's prepend_scheme
    "first" does, so it is refused (XLM-R's tokenizers use "always").
    """
    if spec is None:
        return None
    from tokenizers import Tokenizer

    def schemes(node):
        if isinstance(node, dict):
            yield node.get("prepend_scheme")
            for child in node.get("pretokenizers") or []:
                yield from schemes(child)

    if "first" in schemes(spec):
        raise ModelError(f"{path}: Metaspace prepend_scheme 'first' is not supported (XLM-R uses 'always')")
    holder = {
        "version": "1.0",
        "pre_tokenizer": spec,
        "model": {"type": "WordLevel", "vocab": {PLACEHOLDER: 0}, "unk_token": PLACEHOLDER},
    }
    try:
        return Tokenizer.from_str(json.dumps(holder)).pre_tokenizer
    except Exception as e:  # the Rust side raises a plain Exception
        raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None


# --- the search --------------------------------------------------------------------------------
# Plain njit, cache=True: no fastmath, so each path's score is the same float64 sum, in the same
# order, as tokenizers' (a tie or a near-tie must go the same way).


@njit(cache=True)
def _child(node, byte, labels, child_start):
    """The child of `node` labelled `byte`, or -1: binary search among its sorted children."""
    low, high = child_start[node], child_start[node + 1]
    while low < high:
        middle = (low + high) // 2
        if labels[middle] < byte:
            low = middle + 1
        else:
            high = middle
    if low < child_start[node + 1] and labels[low] == byte:
        return low
    return -1


@njit(cache=True)
def viterbi_forward(ids, counts, text, offsets, labels, child_start, piece, scores, unk_id, unk_score):
    """Cut each word into its best pieces: tokenizers' `Unigram::encode_optimized` + `tokenize`.

    ids [bytes] int32 out: the words' piece ids back to back; counts [W] out: pieces per word.
    text [bytes] uint8: the words' UTF-8 back to back, word w in offsets[w]:offsets[w+1].
    For each character position, in order, every piece starting there (found by walking the
    trie) offers the best score up to its end; a candidate replaces the one there only if
    strictly higher. A position with no one-character piece offers an <unk> of one character
    scored `unk_score`. Then back from the end along the best path, consecutive <unk>s fused.
    """
    longest = 0
    for w in range(len(offsets) - 1):
        longest = max(longest, offsets[w + 1] - offsets[w])
    best = np.zeros(longest + 1, np.float64)  # [n + 1] best score of a path ending at each byte
    start = np.empty(longest + 1, np.int64)  # [n + 1] where the last piece of that path starts; -1: none yet
    token = np.empty(longest + 1, np.int64)  # [n + 1] that piece's id
    path = np.empty(longest, np.int64)  # the best path's ids, last first
    total = 0
    for w in range(len(offsets) - 1):
        begin, n = offsets[w], offsets[w + 1] - offsets[w]
        start[: n + 1] = -1
        best[0] = 0.0
        i = 0
        while i < n:
            lead = text[begin + i]
            width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4  # UTF-8 length
            here = best[i]
            single = False
            node, k = 0, i
            while k < n:
                node = _child(node, text[begin + k], labels, child_start)
                if node < 0:
                    break
                k += 1
                if piece[node] >= 0:
                    candidate = scores[piece[node]] + here
                    if start[k] < 0 or candidate > best[k]:
                        best[k], start[k], token[k] = candidate, i, piece[node]
                    if k - i == width:
                        single = True
            if not single:
                candidate = unk_score + here
                k = i + width
                if start[k] < 0 or candidate > best[k]:
                    best[k], start[k], token[k] = candidate, i, unk_id
            i += width
        m, end, after_unk = 0, n, False
        while end > 0:
            is_unk = token[end] == unk_id
            if not (is_unk and after_unk):  # an <unk> right after another joins it (fuse_unk)
                path[m] = token[end]
                m += 1
            after_unk = is_unk
            end = start[end]
        for j in range(m):
            ids[total + j] = path[m - 1 - j]
        counts[w] = m
        total += m
    return total
