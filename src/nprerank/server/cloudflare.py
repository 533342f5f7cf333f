"""The Cloudflare Workers AI dialect: `@cf/baai/bge-reranker-base` at Cloudflare's own URLs.

Read next: tei.py and cohere.py (the other dialects), app.py (the routes).
"""

from ..reranker import best_first, sigmoid
from .protocol import Dialect, Query, read_list, read_object, read_optional, read_query, read_texts

CLOUDFLARE_MODEL = "@cf/baai/bge-reranker-base"
CLOUDFLARE_PATHS = (f"/client/v4/accounts/{{account_id}}/ai/run/{CLOUDFLARE_MODEL}", f"/ai/run/{CLOUDFLARE_MODEL}")


class Cloudflare(Dialect):
    """Workers AI `@cf/baai/bge-reranker-base`: {query, contexts: [{text}], top_k?} in an envelope.

    Cloudflare's own curl example sends its JSON with `-d` and no Content-Type (so curl labels it
    form-urlencoded): the body is parsed as JSON whatever its Content-Type says.
    """

    name = "cloudflare"
    json_only = False
    statuses = dict(bad_json=400, media_type=400, invalid=400, empty=400, too_long=400, too_many=413,
                    too_large=413, unauthorized=401, forbidden=403, timeout=408, overloaded=429, loading=503,
                    internal=500)
    # Workers AI's documented error codes (developers.cloudflare.com/workers-ai/platform/errors)
    codes = dict(too_many=(3006, "Request is too large"), too_large=(3006, "Request is too large"),
                 overloaded=(3040, "Out of capacity"), loading=(3040, "Out of capacity"),
                 unauthorized=(10000, "Authentication error"), forbidden=(10000, "Forbidden"),
                 timeout=(3007, "Request timeout"), internal=(5000, "Internal error"))

    def parse(self, payload, limits):
        payload = read_object(payload)
        query = read_query(payload, "contexts")
        contexts = read_list(payload, "contexts", limits, 'a list of {"text": "..."} objects')
        texts = read_texts(contexts, "contexts", strings=False)
        return Query(query, texts, top=read_optional(payload, "top_k", int))

    def answer(self, query, logits, tokens, model_name):
        scores = sigmoid(logits)
        response = [{"id": i, "score": float(scores[i])} for i in best_first(scores, query.top)]
        return {"result": {"response": response}, "success": True, "errors": [], "messages": []}

    def error(self, error):
        code, title = self.codes.get(error.kind, (5006, "Bad input"))
        body = {"result": {}, "success": False, "errors": [{"code": code, "message": f"AiError: {title}: {error.message}"}],
                "messages": []}
        return self.statuses[error.kind], body
