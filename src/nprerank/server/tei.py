"""The Hugging Face Text Embeddings Inference (TEI) dialect: `POST /rerank`.

Read next: cohere.py, app.py.
"""

import numpy as np

from ..reranker import best_first, sigmoid
from .protocol import ApiError, Dialect, Query, read_list, read_object, read_optional, read_query, read_texts


class TEI(Dialect):
    """Text Embeddings Inference `/rerank`: {query, texts, raw_scores?, return_text?, truncate?}.

    Statuses and error types follow TEI's router (router/src/http/server.rs): empty texts 400
    "empty", a batch over the limit or an input too long without truncation 413 "validation",
    overloaded 429, unhealthy 503. Body-level rejections (bad JSON 400, wrong field types 422,
    not JSON 415) are axum's, which TEI answers in plain text; we keep TEI's JSON shape for them.
    """

    name = "tei"
    statuses = dict(bad_json=400, media_type=415, invalid=422, empty=400, too_long=413, too_many=413,
                    too_large=413, unauthorized=401, forbidden=403, timeout=408, overloaded=429, loading=503,
                    internal=424)
    error_types = dict(empty="empty", overloaded="overloaded", loading="unhealthy", internal="backend",
                       unauthorized="unauthorized", forbidden="forbidden", timeout="timeout")

    def __init__(self, auto_truncate: bool = False):
        self.auto_truncate = auto_truncate

    def parse(self, payload, limits):
        payload = read_object(payload)
        query = read_query(payload, "texts")
        texts = read_texts(read_list(payload, "texts", limits, "a list of strings"), "texts", objects=False)
        direction = payload.get("truncation_direction")
        if direction is not None and (not isinstance(direction, str) or direction.lower() not in ("right", "left")):
            raise ApiError("invalid", f'truncation_direction must be "Right" or "Left", got {direction!r:.40}')
        if isinstance(direction, str) and direction.lower() == "left":
            raise ApiError("invalid", 'truncation_direction "Left" is not supported: nprerank cuts the end of the text')
        return Query(query, texts, raw_scores=read_optional(payload, "raw_scores", bool, False),
                     return_text=read_optional(payload, "return_text", bool, False),
                     truncate=read_optional(payload, "truncate", bool, self.auto_truncate))

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
        return self.statuses[error.kind], {"error": error.message,
                                           "error_type": self.error_types.get(error.kind, "validation")}
