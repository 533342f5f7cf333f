"""The OpenAPI 3.1 description of every route, served at `GET /openapi.json`.

Each dialect brings its own paths and schemas (`Dialect.paths`, `Dialect.schemas`); this module
adds the routes that are not a dialect's rerank: health, TEI's `/info` and this description.
Read next: app.py (the routes this must list; tests/test_server.py checks they agree).
"""

from .. import __version__
from .dialects import dialects
from .limits import Limits
from .protocol import Dialect
from .tei import TEI

HEALTH = {
    "summary": "200 when the model is ready, 503 while it loads or if it failed; needs no API key",
    "responses": {"200": {"description": "ready"}, "503": {"description": "loading or failed"}},
}


def openapi_spec(limits: Limits = Limits()) -> dict:
    """OpenAPI 3.1 for every route; tests/test_server.py checks that it lists exactly the app's routes."""
    paths = {}
    for dialect in dialects(limits):
        for path in dialect.paths:
            paths.setdefault(path, {})["post"] = rerank_operation(dialect, limits, path)
    for path in ("/health", "/ping", "/"):  # /ping and GET / are TEI's (and SageMaker's) health probes
        paths.setdefault(path, {})["get"] = HEALTH
    tei_error = TEI().schemas(limits)["error"]
    paths["/info"] = {
        "get": {
            "summary": "Text Embeddings Inference's description of the model and the limits",
            "responses": {
                "200": {"description": "TEI's Info", "content": {"application/json": {"schema": TEI.info_schema()}}},
                "503": {"description": "the model is loading", "content": {"application/json": {"schema": tei_error}}},
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {"summary": "this description", "responses": {"200": {"description": "OpenAPI 3.1"}}}
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nprerank",
            "version": __version__,
            "description": "a bge-reranker cross-encoder in the rerank dialects of Cloudflare Workers AI, "
            "Text Embeddings Inference, Cohere (v1 and v2) and Jina. With --api-key every route "
            "but the health probes needs 'Authorization: Bearer <key>'.",
        },
        "paths": paths,
    }


def rerank_operation(dialect: Dialect, limits: Limits, path: str) -> dict:
    """The POST operation of one dialect's rerank route: its request, its answer, its error statuses."""
    schemas = dialect.schemas(limits)
    json_of = lambda schema: {"application/json": {"schema": schema}}  # noqa: E731
    responses = {"200": {"description": "best first", "content": json_of(schemas["answer"])}}
    responses.update(
        {
            str(code): {"description": "error", "content": json_of(schemas["error"])}
            for code in sorted(set(dialect.statuses.values()))
        }
    )
    parameters = (
        [
            {
                "name": "account_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "any value; kept so Cloudflare's URLs work unchanged",
            }
        ]
        if "{account_id}" in path
        else []
    )
    return {
        "summary": dialect.summary,
        "parameters": parameters,
        "responses": responses,
        "requestBody": {"required": True, "content": json_of(schemas["request"])},
    }
