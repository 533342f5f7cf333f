"""The reranker: text in, relevance scores and rankings out.

`Reranker` owns everything between the user's texts and the model's forward pass: checking the
input, tokenizing pairs, sorting them by length and cutting them into batches under a token
budget (so memory stays bounded and little work goes to padding), running the model, restoring
the input order, the sigmoid, and the ranking. It speaks the interfaces users already call:

- `rerank(query, contexts, top_k)`: Cloudflare Workers AI `@cf/baai/bge-reranker-base`.
- `compute_score(pairs, normalize)`: FlagEmbedding's `FlagReranker.compute_score`.
- `predict(pairs)` and `rank(query, documents)`: sentence-transformers' `CrossEncoder`.

Read next: model.py (the fast forward pass it calls) and reference.py (the readable one).
"""

import numpy as np

from . import reference
from .config import ModelConfig, ModelError
from .hub import resolve
from .tokenizer import SPECIAL_TOKENS_IN_PAIR, PairTokenizer
from .weights import load_weights

LONG_DOCUMENTS = ("truncate", "chunk")
ENGINES = ("fast", "reference")
MODEL_FILES = ("config.json", "tokenizer.json", "model.safetensors")


class Reranker:
    def __init__(self, config: ModelConfig, weights, tokenizer: PairTokenizer, engine: str = "fast",
                 batch_size: int = 32, max_batch_tokens: int = 2048, long_documents: str = "truncate",
                 chunk_overlap: int = 32, threads: int | None = None, precision: str = "fp32"):
        _check_int("batch_size", batch_size)
        _check_int("max_batch_tokens", max_batch_tokens, minimum=tokenizer.max_length)
        _check_int("chunk_overlap", chunk_overlap, minimum=0)
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents must be one of {LONG_DOCUMENTS}, got {long_documents!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.long_documents = long_documents
        self.chunk_overlap = chunk_overlap
        self.engine = engine
        if engine == "fast":
            from .model import FastModel

            self.model = FastModel(weights, config, threads=threads, precision=precision)
        else:
            from . import int8
            from .model import PRECISIONS

            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
            # int8: the fast path's oracle, reference.py with int8.py's products
            linear = int8.Int8Linears(weights.layers) if precision == "int8" else reference.linear
            self.model = reference.ReferenceModel(weights, config, linear=linear)
        self.precision = precision

    @classmethod
    def from_pretrained(cls, path="BAAI/bge-reranker-base", max_length: int | None = None, truncation: str = "only_second",
                        query_max_length: int | None = None, **options) -> "Reranker":
        """Load a bge-reranker-base folder (config.json, tokenizer.json, model.safetensors), or a
        Hugging Face repo id: found in the Hugging Face cache, else downloaded (hub.py).
        `precision="int8"` (option passed to Reranker) runs the encoder's products at int8 (int8.py's
        format; about 0.01-0.4 of logit error on random models, docs/performance.md); "fp32", the
        default, is exact."""
        folder = resolve(path)
        # exists(), not is_file(): a FIFO or a folder in its place is refused by its reader, by name
        missing = [name for name in MODEL_FILES if not (folder / name).exists()]
        if missing:
            raise ModelError(f"{folder}: missing {', '.join(missing)} (a model folder needs {', '.join(MODEL_FILES)})")
        config = ModelConfig.from_json(folder / "config.json")
        if max_length is None:
            max_length = config.default_max_length
        elif isinstance(max_length, int) and max_length > config.max_tokens:
            raise ValueError(f"max_length {max_length} exceeds the model's {config.max_tokens} usable positions")
        tokenizer = PairTokenizer(folder / "tokenizer.json", max_length, truncation, query_max_length)
        if tokenizer.vocab_size > config.vocab_size:  # its ids would index past the embedding table
            raise ModelError(f"{folder / 'tokenizer.json'}: token ids go up to {tokenizer.vocab_size - 1}, but "
                             f"config.json's vocab_size is {config.vocab_size}; the two do not belong together")
        weights = load_weights(folder / "model.safetensors", config)
        return cls(config, weights, tokenizer, **options)

    # --- Cloudflare Workers AI -------------------------------------------------------------

    def rerank(self, query: str, contexts: list, top_k: int | None = None) -> list:
        """Cloudflare's `{query, contexts: [{text}], top_k}` -> `[{"id", "score"}]`, best first."""
        _check_text("query", query)
        if top_k is not None:
            _check_int("top_k", top_k)
        if not isinstance(contexts, (list, tuple)):
            raise ValueError(f"contexts must be a list, got {type(contexts).__name__}")
        texts = [_context_text(i, context) for i, context in enumerate(contexts)]
        scores = sigmoid(self.logits([(query, text) for text in texts]))
        return [{"id": i, "score": float(scores[i])} for i in best_first(scores, top_k)]

    # --- FlagEmbedding ---------------------------------------------------------------------

    def compute_score(self, pairs, normalize: bool = False, batch_size: int | None = None,
                      max_length: int | None = None) -> list:
        """FlagReranker.compute_score: [(query, passage)] -> [logit] (or sigmoid if normalize)."""
        pairs = _as_pairs(pairs)
        logits = self.logits(pairs, batch_size=batch_size, max_length=max_length)
        return (sigmoid(logits) if normalize else logits.astype(np.float64)).tolist()

    # --- sentence-transformers -------------------------------------------------------------

    def predict(self, pairs, batch_size: int | None = None, activation: str | None = "sigmoid"):
        """CrossEncoder.predict: float32 scores as an ndarray (a scalar for one pair)."""
        single = _is_pair(pairs)
        if activation not in ("sigmoid", None, "none"):
            raise ValueError(f"activation must be 'sigmoid' or None, got {activation!r}")
        logits = self.logits(_as_pairs(pairs), batch_size=batch_size)
        scores = (sigmoid(logits) if activation == "sigmoid" else logits).astype(np.float32)
        return scores[0] if single else scores

    def rank(self, query: str, documents: list, top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None) -> list:
        """CrossEncoder.rank: [{"corpus_id", "score", "text"?}] best first."""
        _check_text("query", query)
        if top_k is not None:
            _check_int("top_k", top_k)
        if not isinstance(documents, (list, tuple)) or not all(isinstance(d, str) for d in documents):
            raise ValueError("documents must be a list of strings")
        scores = sigmoid(self.logits([(query, d) for d in documents], batch_size=batch_size)).astype(np.float32)
        ranked = []
        for i in best_first(scores, top_k):
            hit = {"corpus_id": i, "score": float(scores[i])}
            if return_documents:
                hit["text"] = documents[i]
            ranked.append(hit)
        return ranked

    # --- the work --------------------------------------------------------------------------

    def logits(self, pairs: list, batch_size: int | None = None, max_length: int | None = None) -> np.ndarray:
        """[(query, passage)] * N -> [N] float32 logits, in input order. The server batches through here."""
        if batch_size is not None:
            _check_int("batch_size", batch_size)
        if max_length is not None:
            _check_int("max_length", max_length, minimum=SPECIAL_TOKENS_IN_PAIR + 2)
            max_length = min(max_length, self.tokenizer.max_length)
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        owners, sequences = self._encode(pairs, max_length)
        unit_logits = self.run(sequences, batch_size or self.batch_size)
        logits = np.full(len(pairs), -np.inf, dtype=np.float32)
        np.maximum.at(logits, owners, unit_logits)  # a chunked document scores as its best window
        return logits

    def token_counts(self, pairs: list) -> list:
        """Untruncated length of each `<s> q </s></s> p </s>`: to refuse over-long input instead of cutting it."""
        queries = self.tokenizer.encode_texts([query for query, _ in pairs])
        passages = self.tokenizer.encode_texts([passage for _, passage in pairs])
        return [len(q) + len(p) + SPECIAL_TOKENS_IN_PAIR for q, p in zip(queries, passages)]

    def _encode(self, pairs: list, max_length: int | None) -> tuple:
        """Pairs -> (owner pair index per sequence, token-id sequences); one sequence per pair unless chunking."""
        if self.long_documents == "truncate":
            return np.arange(len(pairs)), self.tokenizer.encode_pairs(pairs, max_length)
        owners, sequences = [], []
        for i, windows in enumerate(self.tokenizer.encode_chunked(pairs, max_length, self.chunk_overlap)):
            owners += [i] * len(windows)
            sequences += windows
        return np.array(owners), sequences

    def run(self, sequences: list, batch_size: int | None = None) -> np.ndarray:
        """Token-id sequences -> [N] logits, in order, batched longest first under the token budget."""
        batch_size = batch_size or self.batch_size
        # longest first, ties broken by content not position: the same inputs in any order form the
        # same batches, so reordering the input never changes a score, not even in the last bit
        order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), sequences[i]))
        logits = np.empty(len(sequences), dtype=np.float32)
        start = 0
        while start < len(order):
            longest = len(sequences[order[start]])
            # longest first, so every later pair fits in `longest`: the padded size bounds memory
            count = max(1, min(batch_size, self.max_batch_tokens // longest, len(order) - start))
            batch = order[start : start + count]
            logits[batch] = self.model([sequences[i] for i in batch])
            start += count
        return logits


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # in float64: a float32 sigmoid of a large logit rounds to exactly 1.0 and ties the ranking
    # 1 / (1 + exp(-x)) written as exp(-log(1 + exp(-x))): no overflow for very negative logits
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def best_first(scores: np.ndarray, top_k: int | None = None) -> list:
    """Indices of `scores` from best to worst, at most top_k; ties keep their input order."""
    order = np.argsort(-np.asarray(scores), kind="stable").tolist()
    return order[:top_k] if top_k is not None else order


def _check_text(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r:.80}")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _context_text(i: int, context) -> str:
    text = context.get("text") if isinstance(context, dict) else context
    if not isinstance(context, (dict, str)):
        raise ValueError(f"contexts[{i}] must be an object with a text field, got {type(context).__name__}")
    _check_text(f"contexts[{i}].text", text)
    return text


def _is_pair(pairs) -> bool:
    return isinstance(pairs, (list, tuple)) and len(pairs) == 2 and all(isinstance(t, str) for t in pairs)


def _as_pairs(pairs) -> list:
    """One (query, passage) pair or a list of them -> a list of (str, str) tuples."""
    if _is_pair(pairs):
        return [tuple(pairs)]
    if not isinstance(pairs, (list, tuple)):
        raise ValueError(f"pairs must be a (query, passage) pair or a list of them, got {type(pairs).__name__}")
    for i, pair in enumerate(pairs):
        if not _is_pair(pair):
            raise ValueError(f"pairs[{i}] must be a (query, passage) pair of strings, got {pair!r:.80}")
    return [tuple(pair) for pair in pairs]
