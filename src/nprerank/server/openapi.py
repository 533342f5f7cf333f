"""The OpenAPI 3.1 description of every route, served at `GET /openapi.json`.

Read next: app.py (the routes this must list; tests/test_server.py checks they agree).
"""

from .cloudflare import CLOUDFLARE_PATHS, Cloudflare
from .cohere import Cohere
from .limits import Limits
from .protocol import Dialect
from .tei import TEI


def openapi_spec(limits: Limits = Limits()) -> dict:
    """OpenAPI 3.1 for every route; tests/test_server.py checks that it lists exactly the app's routes."""
    text = {"type": "string", "minLength": 1}
    texts = lambda item: {"type": "array", "minItems": 1, "maxItems": limits.max_contexts, "items": item}  # noqa: E731
    positive = {"type": "integer", "minimum": 1}
    cloudflare_request = {"type": "object", "required": ["query", "contexts"], "properties": {
        "query": text, "top_k": positive,
        "contexts": texts({"type": "object", "required": ["text"], "properties": {"text": text}})}}
    cloudflare_answer = {"type": "object", "properties": {
        "result": {"type": "object", "properties": {"response": {"type": "array", "items": {
            "type": "object", "properties": {"id": {"type": "integer"}, "score": {"type": "number"}}}}}},
        "success": {"type": "boolean"}, "errors": {"type": "array"}, "messages": {"type": "array"}}}
    cloudflare_error = {"type": "object", "properties": {
        "result": {"type": "object"}, "success": {"const": False}, "messages": {"type": "array"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "code": {"type": "integer"}, "message": {"type": "string"}}}}}}
    tei_request = {"type": "object", "required": ["query", "texts"], "properties": {
        "query": text, "texts": texts(text), "raw_scores": {"type": "boolean", "default": False},
        "return_text": {"type": "boolean", "default": False},
        "truncate": {"type": "boolean", "default": limits.auto_truncate},
        "truncation_direction": {"enum": ["Right"], "default": "Right"}}}
    tei_answer = {"type": "array", "items": {"type": "object", "properties": {
        "index": {"type": "integer"}, "score": {"type": "number"}, "text": {"type": "string"}}}}
    tei_error = {"type": "object", "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
    cohere_request = {"type": "object", "required": ["query", "documents"], "properties": {
        "model": {"type": "string"}, "query": text, "top_n": positive,
        "return_documents": {"type": "boolean", "default": False},
        "documents": texts({"oneOf": [text, {"type": "object", "required": ["text"], "properties": {"text": text}}]})}}
    cohere_answer = {"type": "object", "properties": {
        "id": {"type": "string"}, "model": {"type": "string"}, "meta": {"type": "object"}, "usage": {"type": "object"},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "relevance_score": {"type": "number"},
            "document": {"type": "object", "properties": {"text": {"type": "string"}}}}}}}}
    message_error = {"type": "object", "properties": {"message": {"type": "string"}}}

    def post(summary, request, answer, error, dialect: Dialect, parameters=()):
        codes = sorted(set(dialect.statuses.values()))
        responses = {"200": {"description": "best first", "content": {"application/json": {"schema": answer}}}}
        responses.update({str(code): {"description": "error", "content": {"application/json": {"schema": error}}}
                          for code in codes})
        return {"post": {"summary": summary, "parameters": list(parameters), "responses": responses,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": request}}}}}

    account = {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "any value; kept so Cloudflare's URLs work unchanged"}
    cloudflare_summary = "Cloudflare Workers AI @cf/baai/bge-reranker-base: sigmoid scores, best first, at most top_k"
    return {
        "openapi": "3.1.0",
        "info": {"title": "nprerank", "version": _version(),
                 "description": "bge-reranker-base in three rerank dialects. With --api-key every route "
                                "but /health needs 'Authorization: Bearer <key>'."},
        "paths": {
            CLOUDFLARE_PATHS[0]: post(cloudflare_summary, cloudflare_request, cloudflare_answer, cloudflare_error,
                                      Cloudflare(), [account]),
            CLOUDFLARE_PATHS[1]: post(cloudflare_summary, cloudflare_request, cloudflare_answer, cloudflare_error,
                                      Cloudflare()),
            "/rerank": post("Text Embeddings Inference rerank: sigmoid scores (logits with raw_scores), best first",
                            tei_request, tei_answer, tei_error, TEI()),
            "/v1/rerank": post("Cohere / Jina rerank: relevance_score best first, at most top_n",
                               cohere_request, cohere_answer, message_error, Cohere()),
            "/health": {"get": {"summary": "200 when the model is ready, 503 while it loads or if it failed",
                                "responses": {"200": {"description": "ready"}, "503": {"description": "loading or failed"}}}},
            "/openapi.json": {"get": {"summary": "this description", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }


def _version() -> str:
    from .. import __version__

    return __version__
