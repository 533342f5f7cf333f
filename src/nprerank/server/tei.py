"""The Hugging Face Text Embeddings Inference (TEI) dialect: `POST /rerank`, `/` and `/invocations`.

Follows TEI's router (huggingface/text-embeddings-inference: `router/src/http/server.rs` for the
routes, the rerank handler and the status of each error type, `router/src/http/types.rs` for the
request, `router/src/lib.rs` for `/info`'s `Info`, `core/src/tokenization.rs` for validation and
truncation). What it does, and so what this module does:

- `{query, texts, truncate?, truncation_direction?, raw_scores?, return_text?}` ->
  `[{index, score, text?}]`, best first; scores are sigmoid unless raw_scores.
- `truncate` left out means the server's `--auto-truncate`, true by default since TEI 1.9; a pair
  too long without truncation is 413 "validation". TEI cuts a pair `longest_first` (tokens come
  off the longer of query and text), so this route asks for that unless the server was started
  with an explicit `--truncation`.
- A pair is refused only when the query and the text are both empty (413 "validation",
  "`inputs` cannot be empty"); an empty query or an empty text alone is scored.
- An empty `texts` list is 400 "empty"; more texts than the client batch limit 413 "validation".
- A reranker also answers `POST /` and `POST /invocations` (SageMaker) as rerank, and
  `GET /`, `GET /ping` as health; `GET /info` describes the model and the limits.

Read next: cohere.py, app.py.
"""

import numpy as np

from .. import __version__
from ..reranker import best_first, sigmoid
from .protocol import ApiError, Dialect, Query, read_list, read_object, read_optional, read_query, read_texts

# /info's model_dtype for each precision (precisions.py): TEI's DType names, and "int8", which TEI lacks
MODEL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
TRUNCATION = "longest_first"  # how TEI cuts a pair (core/src/tokenization.rs: TruncationStrategy::LongestFirst)


class TEI(Dialect):
    """Text Embeddings Inference `/rerank`: {query, texts, raw_scores?, return_text?, truncate?}.

    Body-level rejections (bad JSON 400, wrong field types 422, not JSON 415) are axum's, which TEI
    answers in plain text; we keep TEI's JSON shape for them.
    """

    name = "tei"
    paths = ("/rerank", "/", "/invocations")
    summary = "Text Embeddings Inference rerank: sigmoid scores (logits with raw_scores), best first"
    statuses = dict(
        bad_json=400,
        media_type=415,
        invalid=422,
        empty=400,
        empty_pair=413,
        too_long=413,
        too_many=413,
        too_large=413,
        unauthorized=401,
        forbidden=403,
        timeout=408,
        overloaded=429,
        loading=503,
        internal=424,
    )
    error_types = dict(
        empty="empty",
        overloaded="overloaded",
        loading="unhealthy",
        internal="backend",
        unauthorized="unauthorized",
        forbidden="forbidden",
        timeout="timeout",
    )

    def __init__(self, auto_truncate: bool = True, truncation: str | None = None):
        self.auto_truncate = auto_truncate
        self.truncation = truncation or TRUNCATION  # an explicit --truncation wins over TEI's own

    def parse(self, payload, limits):
        payload = read_object(payload)
        query = read_query(payload, "texts", empty="allow")
        texts = read_texts(
            read_list(payload, "texts", limits, "a list of strings"), "texts", objects=False, empty="allow"
        )
        if not query:
            for i, text in enumerate(texts):
                if not text:
                    raise ApiError(
                        "empty_pair",
                        f"`inputs` cannot be empty: the query and texts[{i}] are both "
                        "empty, so there is nothing to score",
                    )
        direction = payload.get("truncation_direction")
        if direction is not None and (not isinstance(direction, str) or direction.lower() not in ("right", "left")):
            raise ApiError("invalid", f'truncation_direction must be "Right" or "Left", got {direction!r:.40}')
        if isinstance(direction, str) and direction.lower() == "left":
            raise ApiError("invalid", 'truncation_direction "Left" is not supported: nprerank cuts the end of the text')
        return Query(
            query,
            texts,
            raw_scores=read_optional(payload, "raw_scores", bool, False),
            return_text=read_optional(payload, "return_text", bool, False),
            truncate=read_optional(payload, "truncate", bool, self.auto_truncate),
            truncation=self.truncation,
        )

    def answer(self, query, logits, tokens, model_name):
        scores = logits.astype(np.float64) if query.raw_scores else sigmoid(logits)
        ranks = []
        for i in best_first(scores, None):
            rank = {"index": i, "score": float(scores[i])}
            if query.return_text:
                rank["text"] = query.texts[i]
            ranks.append(rank)
        return ranks

    def error(self, error):
        return self.statuses[error.kind], {
            "error": error.message,
            "error_type": self.error_types.get(error.kind, "validation"),
        }

    def info(self, model_name: str, max_input_length: int, limits, precision: str = "fp32") -> dict:
        """`GET /info`: TEI's `Info` for this server (fields TEI fills from its flags come from ours).
        model_dtype names the precision the encoder runs at (Reranker.precision), in TEI's words
        where it has one ("float32", "bfloat16"); int8, which TEI does not offer, as "int8"."""
        labels = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}  # a reranker has exactly one label
        return {
            "model_id": model_name,
            "model_sha": None,
            "model_dtype": MODEL_DTYPES[precision],
            "model_type": {"reranker": labels},
            "max_concurrent_requests": limits.queue_size,
            "max_input_length": max_input_length,
            "max_batch_tokens": limits.batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": limits.max_contexts,
            "auto_truncate": self.auto_truncate,
            "tokenization_workers": 1,
            "version": __version__,
            "sha": None,
            "docker_label": None,
        }

    def schemas(self, limits):
        text = {"type": "string"}  # TEI takes "" on one side of a pair
        request = {
            "type": "object",
            "required": ["query", "texts"],
            "properties": {
                "query": text,
                "texts": {"type": "array", "minItems": 1, "maxItems": limits.max_contexts, "items": text},
                "raw_scores": {"type": "boolean", "default": False},
                "return_text": {"type": "boolean", "default": False},
                "truncate": {"type": "boolean", "default": limits.auto_truncate},
                "truncation_direction": {"enum": ["Right"], "default": "Right"},
            },
        }
        answer = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"index": {"type": "integer"}, "score": {"type": "number"}, "text": {"type": "string"}},
            },
        }
        error = {"type": "object", "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
        return {"request": request, "answer": answer, "error": error}

    @staticmethod
    def info_schema() -> dict:
        integer, string = {"type": "integer"}, {"type": "string"}
        return {
            "type": "object",
            "properties": {
                "model_id": string,
                "model_dtype": string,
                "model_type": {"type": "object", "required": ["reranker"]},
                "max_concurrent_requests": integer,
                "max_input_length": integer,
                "max_batch_tokens": integer,
                "max_client_batch_size": integer,
                "auto_truncate": {"type": "boolean"},
                "version": string,
            },
        }
