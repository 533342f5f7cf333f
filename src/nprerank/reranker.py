"""The reranker: text in, relevance scores and rankings out.

`Reranker` owns everything between the user's texts and the model's forward pass: checking the
input, tokenizing pairs, sorting them by length and cutting them into batches under a token
budget (so memory stays bounded and little work goes to padding), running the model, restoring
the input order, the sigmoid, and the ranking. The work is three steps, each public:

- `encode(pairs, ...) -> Encoding`: the token-id sequences the model will be given, which pair
  owns each, and each pair's length (tokenizer.py does the reading and cutting).
- `run(sequences) -> [S] logits`: batched forward passes (the server's batcher runs several
  requests' sequences in one call), then `Encoding.pair_logits` gives each pair its logit.
- `score(encoding)` = `pair_logits(run(sequences))`; `logits(pairs)` = `score(encode(pairs))`.

On top of them it speaks the interfaces users already call:

- `rerank(query, contexts, top_k)`: Cloudflare Workers AI `@cf/baai/bge-reranker-base`.
- `compute_score(sentence_pairs, ...)`: FlagEmbedding's `FlagReranker.compute_score`.
- `predict(sentences, ...)` and `rank(query, documents, ...)`: sentence-transformers' `CrossEncoder`.

Read next: model.py (the fast forward pass it calls) and reference.py (the readable one).
"""

import logging
import sys
from dataclasses import dataclass

import numpy as np

from . import precisions, reference
from .config import ModelConfig, ModelError, default_max_length
from .hub import check_folder, resolve
from .tokenizer import SPECIAL_TOKENS_IN_PAIR, TRUNCATIONS, PairTokenizer, check_pairs, check_text
from .weights import load_weights

LONG_DOCUMENTS = ("truncate", "chunk")
ENGINES = ("fast", "reference")


class Reranker:
    def __init__(
        self,
        config: ModelConfig,
        weights,
        tokenizer: PairTokenizer,
        engine: str = "fast",
        batch_size: int = 32,
        max_batch_tokens: int = 2048,
        long_documents: str = "truncate",
        chunk_overlap: int = 32,
        max_windows: int = 16,
        threads: int | None = None,
        precision: str = "fp32",
    ):
        _check_int("batch_size", batch_size)
        # any budget works: a sequence longer than it is a batch of its own (run), never a refusal
        _check_int("max_batch_tokens", max_batch_tokens)
        _check_int("chunk_overlap", chunk_overlap, minimum=0)
        _check_int("max_windows", max_windows)
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents must be one of {LONG_DOCUMENTS}, got {long_documents!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        row = precisions.check(precision)  # before any weights are packed
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.long_documents = long_documents
        self.chunk_overlap = chunk_overlap
        self.max_windows = max_windows
        self.engine = engine
        if engine == "fast":
            from .model import FastModel

            self.model = FastModel(weights, config, threads=threads, precision=precision)
        else:
            # int8, bf16: the fast path's oracle, reference.py with that format's products
            linear = precisions.load(row.oracle)(weights.layers) if row.oracle else reference.linear
            self.model = reference.ReferenceModel(weights, config, threads=threads, linear=linear)
        self.precision = precision

    @classmethod
    def from_pretrained(
        cls,
        path="BAAI/bge-reranker-base",
        max_length: int | None = None,
        truncation: str | None = None,
        query_max_length: int | None = None,
        **options,
    ) -> "Reranker":
        """Load a model folder (config.json, tokenizer.json, model.safetensors), or a Hugging Face
        repo id: found in the Hugging Face cache, else downloaded (hub.py). docs/models.md lists
        the models: bge-reranker-base, -large, -v2-m3 (XLM-RoBERTa) and the ms-marco MiniLM
        cross-encoders (BERT).

        max_length None: config.default_max_length's rule (512 for all of them, lowered by the
        tokenizer's model_max_length or the position table). truncation None: the architecture's
        library's default ("only_second" as FlagEmbedding for XLM-R, "longest_first" as
        sentence-transformers for BERT). `precision="int8"` (an option passed to Reranker) runs the
        encoder's products at int8 (int8.py's format), `precision="bf16"` on bfloat16 weights
        (bf16.py's; ModelError for a model with an odd hidden or feed-forward size); their logit
        errors on random models are in docs/performance.md; "fp32", the default, is exact.
        ModelError for a folder or checkpoint we cannot run; ValueError for a bad option."""
        folder = check_folder(resolve(check_text("path", path) if isinstance(path, str) else path))
        config = ModelConfig.from_json(folder / "config.json")
        if max_length is None:
            max_length = default_max_length(config, folder / "tokenizer_config.json")
        elif isinstance(max_length, int) and max_length > config.max_tokens:
            raise ValueError(f"max_length {max_length} exceeds the model's {config.max_tokens} usable positions")
        truncation = config.architecture.truncation if truncation is None else truncation
        tokenizer = PairTokenizer(folder / "tokenizer.json", max_length, truncation, query_max_length)
        if tokenizer.kind != config.architecture.tokenizer:
            raise ModelError(
                f"{folder / 'tokenizer.json'}: a {tokenizer.kind} tokenizer, but "
                f"{config.architecture_name} needs {config.architecture.tokenizer}"
            )
        if tokenizer.vocab_size > config.vocab_size:  # its ids would index past the embedding table
            raise ModelError(
                f"{folder / 'tokenizer.json'}: token ids go up to {tokenizer.vocab_size - 1}, but "
                f"config.json's vocab_size is {config.vocab_size}; the two do not belong together"
            )
        weights = load_weights(folder / "model.safetensors", config)
        return cls(config, weights, tokenizer, **options)

    # --- Cloudflare Workers AI -------------------------------------------------------------

    def rerank(self, query: str, contexts: list, top_k: int | None = None) -> list:
        """Cloudflare's `{query, contexts: [{text}], top_k}` -> `[{"id", "score"}]`, best first."""
        check_text("query", query, allow_empty=False)
        if top_k is not None:
            _check_int("top_k", top_k)
        if not isinstance(contexts, (list, tuple)):
            raise ValueError(f"contexts must be a list, got {type(contexts).__name__}")
        texts = [_context_text(i, context) for i, context in enumerate(contexts)]
        scores = sigmoid(self.logits([(query, text) for text in texts]))
        return [{"id": i, "score": float(scores[i])} for i in best_first(scores, top_k)]

    # --- FlagEmbedding ---------------------------------------------------------------------

    def compute_score(
        self,
        sentence_pairs,
        *,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        device: str | None = None,
    ) -> list:
        """FlagEmbedding's `FlagReranker.compute_score` (inference/reranker/encoder_only/base.py):
        [(query, passage)] * P, or one pair -> a list of P raw logits (sigmoid scores if normalize).

        batch_size: pairs per forward pass (None: the Reranker's). max_length: this call's tokens per
        pair; it wins over the Reranker's, up to the model's usable positions. query_max_length:
        the query's share (None: the Reranker's, else 3/4 of max_length). device: None or "cpu".
        """
        if device not in (None, "cpu"):
            raise ValueError(f"nprerank runs on the CPU: device must be None or 'cpu', got {device!r}")
        pairs = _as_pairs(sentence_pairs)
        encoding = self.encode(pairs, max_length, query_max_length=query_max_length)
        logits = self.score(encoding, batch_size)  # [P]
        return (sigmoid(logits) if normalize else logits.astype(np.float64)).tolist()

    # --- sentence-transformers -------------------------------------------------------------

    def predict(
        self,
        sentences,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        activation_fn=None,
        apply_softmax: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        activation_fct=None,
    ):
        """sentence-transformers' `CrossEncoder.predict` (cross_encoder/CrossEncoder.py):
        [(query, passage)] * P -> [P] float32 scores, or a NumPy scalar for one pair.

        Scores are sigmoid(logit), the one-label model's default activation, unless activation_fn
        is given: any callable taking the [P] float32 logits as a NumPy array (`lambda x: x` gives
        the logits); a torch module (torch.nn.Identity(), torch.nn.Sigmoid()) is called on a tensor
        view of them, torch being whatever the caller imported (nprerank itself never imports it).
        activation_fct is the older name of activation_fn. apply_softmax changes nothing with one
        logit per pair (as in sentence-transformers). convert_to_numpy=False gives a list of NumPy
        scalars; convert_to_tensor=True a torch tensor (needs torch installed).
        show_progress_bar: a tqdm bar over the batches; None shows it when this module's logger
        is at INFO or DEBUG, as sentence-transformers does.
        """
        single = _is_pair(sentences)
        pairs = _as_pairs(sentences)
        logits = self.score(self.encode(pairs), batch_size, _show_progress(show_progress_bar))
        scores = _activate(logits, activation_fn if activation_fn is not None else activation_fct)
        if convert_to_tensor:
            scores = _torch().from_numpy(scores)
        elif not convert_to_numpy:
            scores = list(scores)
        return scores[0] if single else scores

    def rank(
        self,
        query: str,
        documents: list,
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        activation_fn=None,
        apply_softmax: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        activation_fct=None,
    ) -> list:
        """sentence-transformers' `CrossEncoder.rank`: [{"corpus_id", "score", "text"?}] best first,
        at most top_k; scores as `predict` gives them (as Python floats, whatever convert_to_* say)."""
        check_text("query", query, allow_empty=False)
        if top_k is not None:
            _check_int("top_k", top_k)
        if not isinstance(documents, (list, tuple)):
            raise ValueError(f"documents must be a list of strings, got {type(documents).__name__}")
        for i, document in enumerate(documents):
            check_text(f"documents[{i}]", document)
        pairs = [(query, document) for document in documents]
        logits = self.score(self.encode(pairs), batch_size, _show_progress(show_progress_bar))
        scores = _activate(logits, activation_fn if activation_fn is not None else activation_fct)
        ranked = []
        for i in best_first(scores, top_k):
            hit = {"corpus_id": i, "score": float(scores[i])}
            if return_documents:
                hit["text"] = documents[i]
            ranked.append(hit)
        return ranked

    # --- the work: encode, then score ----------------------------------------------------

    def encode(
        self,
        pairs,
        max_length: int | None = None,
        truncation: str | None = None,
        passage_max_length: int | None = None,
        query_max_length: int | None = None,
    ) -> "Encoding":
        """[(query, passage)] * P -> the Encoding the model will be given (S sequences, S >= P in chunk mode).

        max_length: tokens per sequence, special tokens included; None is the Reranker's; a larger
        value than the model's usable positions is lowered to them (the model cannot see more).
        truncation: None is the Reranker's; "only_second" or "longest_first" for this call (see
        tokenizer.py). passage_max_length: every passage is first cut to that many tokens (Cohere's
        `max_tokens_per_doc`). query_max_length: the query's share under "only_second" and in chunk
        mode (None: the Reranker's, else 3/4 of max_length, as FlagEmbedding).
        Each distinct text is tokenized once per call, and only as far as the model can read it.
        Raises ValueError for a pair that is not two valid Unicode strings or a bad option.
        """
        if max_length is None:
            max_length = self.tokenizer.max_length
        else:
            _check_int("max_length", max_length, minimum=SPECIAL_TOKENS_IN_PAIR + 2)
            max_length = min(max_length, self.config.max_tokens)
        if truncation is not None and truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        for name, value in (("passage_max_length", passage_max_length), ("query_max_length", query_max_length)):
            if value is not None:
                _check_int(name, value)
        chunk = (self.chunk_overlap, self.max_windows) if self.long_documents == "chunk" else None
        owners, sequences, lengths = self.tokenizer.encode(
            pairs, max_length, truncation, passage_max_length, query_max_length, chunk
        )
        return Encoding(np.array(owners, dtype=np.int64), sequences, lengths, max_length)

    def score(self, encoding: "Encoding", batch_size: int | None = None, show_progress_bar: bool = False) -> np.ndarray:
        """Encoding of P pairs -> [P] float32 logits, in input order (a chunked pair: its best window)."""
        return encoding.pair_logits(self.run(encoding.sequences, batch_size, show_progress_bar))

    def logits(
        self,
        pairs: list,
        batch_size: int | None = None,
        max_length: int | None = None,
        truncation: str | None = None,
        passage_max_length: int | None = None,
    ) -> np.ndarray:
        """[(query, passage)] * P -> [P] float32 logits: `score(encode(pairs, ...))`."""
        return self.score(self.encode(pairs, max_length, truncation, passage_max_length), batch_size)

    def run(self, sequences: list, batch_size: int | None = None, show_progress_bar: bool = False) -> np.ndarray:
        """Token-id sequences [S] -> [S] float32 logits, in order, batched longest first under the token budget.

        The server's batcher runs the sequences of several requests in one call here, then each
        request takes its own logits with its Encoding.pair_logits.
        """
        if batch_size is not None:
            _check_int("batch_size", batch_size)
        batch_size = batch_size or self.batch_size
        # longest first, ties broken by content not position: the same inputs in any order form the
        # same batches, so reordering the input never changes a score, not even in the last bit
        order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), sequences[i]))
        logits = np.empty(len(sequences), dtype=np.float32)  # [S]
        progress = _progress_bar(len(sequences)) if show_progress_bar else None
        start = 0
        while start < len(order):
            longest = len(sequences[order[start]])
            # longest first, so every later pair fits in `longest`: the padded size bounds memory;
            # a sequence longer than the whole budget goes alone (attention's memory is O(T), kernels/attention.py)
            count = max(1, min(batch_size, self.max_batch_tokens // longest, len(order) - start))
            batch = order[start : start + count]
            logits[batch] = self.model([sequences[i] for i in batch])
            start += count
            if progress is not None:
                progress.update(count)
        if progress is not None:
            progress.close()
        return logits


@dataclass(frozen=True)
class Encoding:
    """What `Reranker.encode` made of P pairs: S >= P token-id sequences, ready for the model.

    owners: np.int64 [S], the pair index of each sequence (in chunk mode a pair owns its windows).
    sequences: S lists of token ids, each `<s> q </s></s> p </s>`, at most max_length long.
    lengths: [P] ints, each pair's token count with special tokens before max_length cuts it
        (after passage_max_length); exact while <= max_length, beyond it only known to be larger.
    max_length: the max_length the sequences were cut to.
    """

    owners: np.ndarray
    sequences: list
    lengths: list
    max_length: int

    def pair_logits(self, sequence_logits) -> np.ndarray:
        """[S] logits of the sequences -> [P] float32 logits of the pairs: each pair's best sequence."""
        sequence_logits = np.asarray(sequence_logits, dtype=np.float32)
        if sequence_logits.shape != self.owners.shape:
            raise ValueError(f"expected {self.owners.shape[0]} sequence logits, got shape {sequence_logits.shape}")
        logits = np.full(len(self.lengths), -np.inf, dtype=np.float32)  # [P]
        np.maximum.at(logits, self.owners, sequence_logits)  # a chunked document scores as its best window
        return logits


def _show_progress(show: bool | None) -> bool:
    # sentence-transformers' rule for None: shown when its logger would print INFO
    return logging.getLogger(__name__).getEffectiveLevel() <= logging.INFO if show is None else bool(show)


def _activate(logits: np.ndarray, activation_fn) -> np.ndarray:
    """[P] logits -> [P] float32 scores: sigmoid, or activation_fn (a callable, or a torch module)."""
    if activation_fn is None:
        return sigmoid(logits).astype(np.float32)
    if not callable(activation_fn):
        raise ValueError(f"activation_fn must be a callable on the logits, got {activation_fn!r:.80}")
    if any(cls.__module__.split(".")[0] == "torch" for cls in type(activation_fn).__mro__):
        torch = sys.modules["torch"]  # a torch module was made by the caller, so torch is imported
        scores = activation_fn(torch.from_numpy(logits)).detach().cpu().numpy()
    else:
        scores = activation_fn(logits)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != logits.shape:
        raise ValueError(f"activation_fn must return one score per pair: {logits.shape} in, {scores.shape} out")
    return scores


def _torch():
    try:
        import torch
    except ImportError:
        raise ValueError("convert_to_tensor=True needs torch, which nprerank does not install") from None
    return torch


def _progress_bar(total: int):
    from tqdm.auto import tqdm  # tqdm comes with huggingface_hub, which tokenizers depends on

    return tqdm(total=total, desc="Batches", unit="seq")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # in float64: a float32 sigmoid of a large logit rounds to exactly 1.0 and ties the ranking
    # 1 / (1 + exp(-x)) written as exp(-log(1 + exp(-x))): no overflow for very negative logits
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def best_first(scores: np.ndarray, top_k: int | None = None) -> list:
    """Indices of `scores` from best to worst, at most top_k; ties keep their input order."""
    order = np.argsort(-np.asarray(scores), kind="stable").tolist()
    return order[:top_k] if top_k is not None else order


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _context_text(i: int, context) -> str:
    if not isinstance(context, (dict, str)):
        raise ValueError(f"contexts[{i}] must be an object with a text field, got {type(context).__name__}")
    text = context.get("text") if isinstance(context, dict) else context
    return check_text(f"contexts[{i}].text", text, allow_empty=False)


def _is_pair(pairs) -> bool:
    return isinstance(pairs, (list, tuple)) and len(pairs) == 2 and all(isinstance(t, str) for t in pairs)


def _as_pairs(pairs) -> list:
    """One (query, passage) pair or a list of them -> a list of (str, str) tuples of valid text."""
    if _is_pair(pairs):
        return check_pairs([pairs])
    return check_pairs(pairs)
