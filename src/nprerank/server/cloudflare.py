"""The Cloudflare Workers AI dialect: `@cf/baai/bge-reranker-base` at Cloudflare's own URLs.

Follows Cloudflare's model page for `@cf/baai/bge-reranker-base` (input `{query, contexts:
[{text}], top_k?}`, strings with minLength 1, top_k minimum 1; output `{response: [{id, score}]}`
best first), the REST envelope `{result, success, errors: [{code, message}], messages}`, the
documented Workers AI error codes (developers.cloudflare.com/workers-ai/platform/errors), and the
Python SDK `cloudflare` (cloudflare-python, `resources/ai/ai.py`): it POSTs to
`{base_url}/accounts/{account_id}/ai/run/{model_name}` with base_url ending in `/client/v4`
and the model name percent-encoded (`@cf%2Fbaai%2Fbge-reranker-base`; the server matches the
decoded path). Cloudflare answers a path it does not route with 404 and error code 7003.

Read next: tei.py and cohere.py (the other dialects), app.py (the routes).
"""

import json
from pathlib import Path

from ..reranker import best_first, sigmoid
from .protocol import Dialect, Query, read_list, read_object, read_optional, read_query, read_texts

CLOUDFLARE_MODEL = "@cf/baai/bge-reranker-base"
CLOUDFLARE_PATHS = (f"/client/v4/accounts/{{account_id}}/ai/run/{CLOUDFLARE_MODEL}", f"/ai/run/{CLOUDFLARE_MODEL}")
NO_ROUTE_CODE = 7003  # Cloudflare's "could not route" for an unknown path, account or model
# Workers AI's model catalogue (developers.cloudflare.com/workers-ai/models) lists one reranker:
# bge-reranker-base. bge-reranker-large, -v2-m3 and the MiniLM cross-encoders have no @cf name.
LISTED_REPO = "BAAI/bge-reranker-base"


def unlisted(model_name: str) -> str | None:
    """None when the served model may answer at CLOUDFLARE_MODEL, else why not, in a few words.

    A repo id must be bge-reranker-base's. A folder cannot say its name, so its config.json
    decides: a BERT cross-encoder, or an XLM-R wider than base's 768 or with more than its 514
    positions (bge-reranker-large, -v2-m3), is not bge-reranker-base; any other XLM-R reranker
    folder (a fine-tune of base, a small test model) is served under base's name as before.
    """
    folder = Path(model_name).expanduser()
    if not folder.is_dir():
        return None if model_name == LISTED_REPO else f"{model_name} has no Workers AI name"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the model reports the problem
    model_name = folder.resolve().name  # a folder by its own name: its path is nobody's business
    architecture = (config.get("architectures") or ["XLMRobertaForSequenceClassification"])[0]
    if architecture == "BertForSequenceClassification":
        return f"{model_name} is a BERT cross-encoder, which Workers AI does not run"
    if config.get("hidden_size", 768) > 768 or config.get("max_position_embeddings", 514) > 514:
        return f"{model_name} is larger than bge-reranker-base (bge-reranker-large or -v2-m3 shape)"
    return None


class Cloudflare(Dialect):
    """Workers AI `@cf/baai/bge-reranker-base`: {query, contexts: [{text}], top_k?} in an envelope.

    Cloudflare's own curl example sends its JSON with `-d` and no Content-Type (so curl labels it
    form-urlencoded): the body is parsed as JSON whatever its Content-Type says.
    """

    name = "cloudflare"
    paths = CLOUDFLARE_PATHS
    summary = f"Cloudflare Workers AI {CLOUDFLARE_MODEL}: sigmoid scores, best first, at most top_k"
    json_only = False
    statuses = dict(
        bad_json=400,
        media_type=400,
        invalid=400,
        empty=400,
        empty_pair=400,
        too_long=400,
        too_many=413,
        too_large=413,
        unauthorized=401,
        forbidden=403,
        timeout=408,
        overloaded=429,
        loading=503,
        internal=500,
    )
    # Workers AI's documented error codes (developers.cloudflare.com/workers-ai/platform/errors)
    codes = dict(
        too_many=(3006, "Request is too large"),
        too_large=(3006, "Request is too large"),
        overloaded=(3040, "Out of capacity"),
        loading=(3040, "Out of capacity"),
        unauthorized=(10000, "Authentication error"),
        forbidden=(10000, "Forbidden"),
        timeout=(3007, "Request timeout"),
        internal=(5000, "Internal error"),
    )

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
        return self.statuses[error.kind], envelope(code, f"AiError: {title}: {error.message}")

    @staticmethod
    def no_route(path: str, unlisted_reason: str | None = None) -> tuple:
        """-> (404, body) for a Cloudflare-style path this server does not serve, saying what it
        does serve. unlisted_reason: why the served model has no Cloudflare route at all."""
        if unlisted_reason:
            message = (
                f"Could not route to {path}: {unlisted_reason}; Workers AI lists only {CLOUDFLARE_MODEL}, "
                "so this server answers no Cloudflare path. Send the same query to POST /rerank (TEI) "
                "or POST /v1/rerank, /v2/rerank (Cohere, Jina)"
            )
            return 404, envelope(NO_ROUTE_CODE, message)
        message = (
            f"Could not route to {path}: this server runs only {CLOUDFLARE_MODEL}, at POST "
            f"/client/v4/accounts/<account_id>/ai/run/{CLOUDFLARE_MODEL} (the cloudflare SDK's base_url "
            f"is http://<host>:<port>/client/v4) and POST /ai/run/{CLOUDFLARE_MODEL}"
        )
        return 404, envelope(NO_ROUTE_CODE, message)

    @staticmethod
    def is_cloudflare_path(path: str) -> bool:
        """A path a Cloudflare client would send: its answer, even a 404, comes in Cloudflare's envelope."""
        return path.startswith(("/client/v4/", "/accounts/")) or "/ai/run/" in path

    def schemas(self, limits):
        text = {"type": "string", "minLength": 1}
        request = {
            "type": "object",
            "required": ["query", "contexts"],
            "properties": {
                "query": text,
                "top_k": {"type": "integer", "minimum": 1},
                "contexts": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": limits.max_contexts,
                    "items": {"type": "object", "required": ["text"], "properties": {"text": text}},
                },
            },
        }
        answer = {
            "type": "object",
            "properties": {
                "result": {
                    "type": "object",
                    "properties": {
                        "response": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"id": {"type": "integer"}, "score": {"type": "number"}},
                            },
                        }
                    },
                },
                "success": {"type": "boolean"},
                "errors": {"type": "array"},
                "messages": {"type": "array"},
            },
        }
        error = {
            "type": "object",
            "properties": {
                "result": {"type": "object"},
                "success": {"const": False},
                "messages": {"type": "array"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
                    },
                },
            },
        }
        return {"request": request, "answer": answer, "error": error}


def envelope(code: int, message: str) -> dict:
    """Cloudflare's failure envelope with one error."""
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}
