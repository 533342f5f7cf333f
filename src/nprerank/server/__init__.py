"""The HTTP server: bge-reranker-base behind the rerank APIs that clients already speak.

One port answers several dialects, each with its own request, response and error shapes, so a
client written for the original service keeps working when pointed here:

- Cloudflare Workers AI `@cf/baai/bge-reranker-base`: `POST /ai/run/@cf/baai/bge-reranker-base`
  and the full `POST /client/v4/accounts/{account_id}/ai/run/@cf/baai/bge-reranker-base`.
- Hugging Face Text Embeddings Inference (TEI): `POST /rerank` (and `POST /`, `POST /invocations`),
  `GET /info`.
- Cohere v1 / Jina: `POST /v1/rerank`; Cohere v2: `POST /v2/rerank`.
- `GET /health` (200 ready, 503 loading; also at TEI's `GET /ping` and `GET /`), `GET /openapi.json`.

How a request flows: the Host and Origin are checked (access.py: web pages cannot drive a local
server), then the API key; the headers and the body must arrive within their deadlines and the body
within --max-body-bytes; the body is parsed by the dialect's rules into a `Query`; only then does the
request take one of --queue-size places (none free: 429), so a slow sender holds no place a ready
request needs. The request is tokenized once (`Reranker.encode`, bounded whatever the body's
shape), queued, and awaits its scores. One worker thread owns the model (`Batcher`): it takes
whatever is waiting, up to a token budget, runs ONE forward call over the sequences of all those
requests and hands each request its slice, so concurrent small requests share a forward pass. A
client that leaves has its job skipped. The model loads and warms up in that thread after the port
is bound, so /health says 503 until the first request would be fast; a checkpoint changed on disk
makes it "stale" (503) until it is reloaded. Every refusal, whatever its cause, answers in the
route's dialect.

Reading order:
1. protocol.py: `ApiError`, `Query`, the field readers and the `Dialect` every dialect fills in.
2. cloudflare.py, tei.py, cohere.py: one module per dialect (parsing, validation, answer, errors,
   schemas), each naming the source it follows; dialects.py lists them.
3. limits.py: the bounds (`Limits`), one `serve` flag each.
4. batcher.py: the worker thread that owns the model; it knows nothing of dialects.
5. app.py: `build_app`, the routes, the API key, admission and body reading.
6. openapi.py: the description served at /openapi.json.
7. access.py: which Host and Origin headers are served.
8. run.py: the `serve` flags, `serve()` and `main()` (`python -m nprerank.server`); uvicorn's
   protocol with the header deadline, the connection bound and half-close support.
9. replicas.py: `serve --workers N`, worker processes on one listening socket.

Starlette and Uvicorn are the optional `nprerank[server]` extra and are imported only to serve;
everything but app.py and run.py is plain Python. Read also: docs/server.md (every route with a
curl example), reranker.py (what the scores are).
"""

from .app import build_app
from .batcher import Batcher
from .cloudflare import CLOUDFLARE_MODEL, CLOUDFLARE_PATHS
from .limits import Limits
from .openapi import openapi_spec
from .protocol import DEFAULT_MODEL, ApiError, Query
from .run import API_KEY_ENV, add_arguments, main, serve, serve_from_args

__all__ = [
    "API_KEY_ENV",
    "CLOUDFLARE_MODEL",
    "CLOUDFLARE_PATHS",
    "DEFAULT_MODEL",
    "ApiError",
    "Batcher",
    "Limits",
    "Query",
    "add_arguments",
    "build_app",
    "main",
    "openapi_spec",
    "serve",
    "serve_from_args",
]
