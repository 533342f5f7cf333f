"""The Cohere / Jina dialect: `POST /v1/rerank`.

Read next: app.py.
"""

import uuid

from ..reranker import best_first, sigmoid
from .protocol import (ApiError, Dialect, Query, json_type, read_list, read_object, read_optional, read_query,
                       read_texts)


class Cohere(Dialect):
    """Cohere / Jina `/v1/rerank`: {model?, query, documents: [str | {text}], top_n?, return_documents?}.

    The answer carries both Cohere's `id` and `meta` and Jina's `model` and `usage`, so either
    client finds what it reads. Errors are `{"message": ...}`.
    """

    name = "cohere"
    statuses = dict(bad_json=400, media_type=415, invalid=400, empty=400, too_long=400, too_many=422,
                    too_large=413, unauthorized=401, forbidden=403, timeout=408, overloaded=429, loading=503,
                    internal=500)

    def parse(self, payload, limits):
        payload = read_object(payload)
        query = read_query(payload, "documents")
        documents = read_list(payload, "documents", limits, 'a list of strings or {"text": "..."} objects')
        texts = read_texts(documents, "documents")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError("invalid", f"model must be a string, got {json_type(model)}")
        return Query(query, texts, top=read_optional(payload, "top_n", int),
                     return_text=read_optional(payload, "return_documents", bool, False), model=model)

    def answer(self, query, logits, tokens, model_name):
        scores = sigmoid(logits)
        results = []
        for i in best_first(scores, query.top):
            result = {"index": i, "relevance_score": float(scores[i])}
            if query.return_text:
                result["document"] = {"text": query.texts[i]}
            results.append(result)
        return {"id": str(uuid.uuid4()), "model": query.model or model_name, "results": results,
                "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
                "usage": {"total_tokens": tokens}}

    def error(self, error):
        return self.statuses[error.kind], {"message": error.message}
