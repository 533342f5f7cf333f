"""The Cohere and Jina dialects: `POST /v1/rerank` (Cohere v1 and Jina) and `POST /v2/rerank` (Cohere v2).

Follows Cohere's Python SDK (cohere-ai/cohere-python, `cohere/v2/client.py` and
`cohere/v2/types/v2rerank_response.py` for v2; `cohere/base_client.py` and
`cohere/types/rerank_response.py` for v1; `cohere/core/http_client.py` for retries, which honour
Retry-After on 429 and 5xx) and Jina's rerank API as its clients read it (LlamaIndex `JinaRerank`,
Haystack `JinaRanker`, LangChain `JinaRerank`: Cohere v1's request, and `detail` in errors).

- v1 `{model?, query, documents: [str | {text}], top_n?, return_documents?}` ->
  `{id, results: [{index, relevance_score, document?: {text}}], meta}`, plus Jina's `model` and
  `usage`, so either client finds what it reads. `rank_fields` other than `["text"]` is refused:
  Cohere would rank on those keys, and scoring `text` instead would be silently wrong.
- v2 `{model, query, documents: [str], top_n?, max_tokens_per_doc?}` ->
  `{id, results: [{index, relevance_score}], meta}`; `max_tokens_per_doc` cuts each document to
  that many tokens (Cohere's default is 4096, beyond what this model takes anyway).
- Errors are `{"message": ..., "detail": ...}` with the same text: Cohere's SDK reads `message`,
  the Jina clients read `detail`. Cohere refuses a blank document or query (400).

Read next: app.py.
"""

import uuid

from ..reranker import best_first, sigmoid
from .protocol import (
    ApiError,
    Dialect,
    Query,
    check_unicode,
    json_type,
    read_list,
    read_object,
    read_optional,
    read_query,
    read_texts,
)


class Cohere(Dialect):
    """Cohere v1 / Jina `/v1/rerank`: {model?, query, documents: [str | {text}], top_n?, return_documents?}."""

    name = "cohere"
    paths = ("/v1/rerank",)
    summary = "Cohere v1 / Jina rerank: relevance_score best first, at most top_n"
    version = "1"
    documents_shape = 'a list of strings or {"text": "..."} objects'
    statuses = dict(
        bad_json=400,
        media_type=415,
        invalid=400,
        empty=400,
        empty_pair=400,
        too_long=400,
        too_many=422,
        too_large=413,
        unauthorized=401,
        forbidden=403,
        timeout=408,
        overloaded=429,
        loading=503,
        internal=500,
    )

    def parse(self, payload, limits):
        payload = read_object(payload)
        query = read_query(payload, "documents", empty="blank")
        documents = read_list(payload, "documents", limits, self.documents_shape)
        texts = read_texts(documents, "documents", objects=self.version == "1", empty="blank")
        return Query(
            query,
            texts,
            top=read_optional(payload, "top_n", int),
            model=self.read_model(payload),
            **self.options(payload),
        )

    def read_model(self, payload: dict) -> str | None:
        model = payload.get("model")
        if model is None:
            return None
        if not isinstance(model, str):
            raise ApiError("invalid", f"model must be a string, got {json_type(model)}")
        check_unicode(model, "model")  # echoed back in the answer
        return model

    def options(self, payload: dict) -> dict:
        read_rank_fields(payload)
        return {"return_text": read_optional(payload, "return_documents", bool, False)}

    def answer(self, query, logits, tokens, model_name):
        scores = sigmoid(logits)
        results = []
        for i in best_first(scores, query.top):
            result = {"index": i, "relevance_score": float(scores[i])}
            if query.return_text:
                result["document"] = {"text": query.texts[i]}
            results.append(result)
        return {
            "id": str(uuid.uuid4()),
            "model": query.model or model_name,
            "results": results,
            "meta": self.meta(),
            "usage": {"total_tokens": tokens},
        }

    def meta(self) -> dict:
        return {"api_version": {"version": self.version}, "billed_units": {"search_units": 1}}

    def error(self, error):
        return self.statuses[error.kind], {"message": error.message, "detail": error.message}

    def schemas(self, limits):
        text = {"type": "string", "minLength": 1, "pattern": r"\S"}
        document = {"oneOf": [text, {"type": "object", "required": ["text"], "properties": {"text": text}}]}
        request = {
            "type": "object",
            "required": ["query", "documents"],
            "properties": {
                "model": {"type": "string"},
                "query": text,
                "top_n": {"type": "integer", "minimum": 1},
                "return_documents": {"type": "boolean", "default": False},
                "documents": {"type": "array", "minItems": 1, "maxItems": limits.max_contexts, "items": document},
            },
        }
        answer = {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "model": {"type": "string"},
                "meta": {"type": "object"},
                "usage": {"type": "object"},
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "index": {"type": "integer"},
                            "relevance_score": {"type": "number"},
                            "document": {"type": "object", "properties": {"text": {"type": "string"}}},
                        },
                    },
                },
            },
        }
        error = {"type": "object", "properties": {"message": {"type": "string"}, "detail": {"type": "string"}}}
        return {"request": request, "answer": answer, "error": error}


def read_rank_fields(payload: dict) -> None:
    """Cohere v1's `rank_fields` picks the object keys a document is ranked on; this server ranks
    the `text` key only, so any other choice is refused rather than silently scored on `text`."""
    fields = payload.get("rank_fields")
    if fields is None or fields == ["text"]:
        return
    raise ApiError(
        "invalid",
        f"rank_fields {fields!r:.80} is not supported: this server ranks each document's "
        'text only; leave rank_fields out or send ["text"]',
    )


class CohereV2(Cohere):
    """Cohere v2 `/v2/rerank`: {model, query, documents: [str], top_n?, max_tokens_per_doc?}."""

    name = "cohere-v2"
    paths = ("/v2/rerank",)
    summary = "Cohere v2 rerank: relevance_score best first, at most top_n"
    version = "2"
    documents_shape = "a list of strings"

    def read_model(self, payload: dict) -> str:
        if payload.get("model") is None:
            raise ApiError("invalid", "model is required (Cohere v2); any name is accepted, this server runs one model")
        return super().read_model(payload)

    def options(self, payload: dict) -> dict:
        return {"passage_max_length": read_optional(payload, "max_tokens_per_doc", int)}

    def answer(self, query, logits, tokens, model_name):
        scores = sigmoid(logits)
        results = [{"index": i, "relevance_score": float(scores[i])} for i in best_first(scores, query.top)]
        return {"id": str(uuid.uuid4()), "results": results, "meta": self.meta()}

    def schemas(self, limits):
        schemas = super().schemas(limits)  # v1's, less what v2 does not have, plus max_tokens_per_doc
        request, answer = schemas["request"]["properties"], schemas["answer"]["properties"]
        schemas["request"]["required"] = ["model", "query", "documents"]
        del request["return_documents"]
        request["documents"]["items"] = request["query"]  # strings only
        request["max_tokens_per_doc"] = {"type": "integer", "minimum": 1}
        del answer["model"], answer["usage"], answer["results"]["items"]["properties"]["document"]
        return schemas
