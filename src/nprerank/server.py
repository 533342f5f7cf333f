"""The HTTP server: bge-reranker-base behind the rerank APIs that clients already speak.

One port answers three dialects, each with its own request, response and error shapes, so a
client written for the original service keeps working when pointed here:

- Cloudflare Workers AI `@cf/baai/bge-reranker-base`: `POST /ai/run/@cf/baai/bge-reranker-base`
  and the full `POST /client/v4/accounts/{account_id}/ai/run/@cf/baai/bge-reranker-base`.
- Hugging Face Text Embeddings Inference (TEI): `POST /rerank`.
- Cohere / Jina: `POST /v1/rerank`.
- `GET /health` (200 ready, 503 loading) and `GET /openapi.json`.

How a request flows: check the API key, take one of --queue-size places (none free: 429 at once,
before the body is read, so memory stays bounded), read the body (at most --max-body-bytes), parse
it by the dialect's rules, count its tokens, queue it and await its scores. One worker thread owns
the model (`Batcher`): it takes whatever is waiting, up to a token budget, runs ONE
`Reranker.logits` call over all those requests' pairs and hands each request its slice, so
concurrent small requests share a forward pass. A client that leaves has its job skipped. The
model loads in that thread after the port is bound, so /health can say 503 meanwhile.

Starlette and Uvicorn are the optional `nprerank[server]` extra and are imported only to serve;
everything above `build_app` is plain Python. Read next: docs/server.md (every route with a curl
example), reranker.py (what `logits` computes).
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import queue
import signal
import sys
import threading
import uuid
from dataclasses import dataclass, fields

import numpy as np

from .arguments import positive_int
from .config import ModelError
from .reranker import best_first, sigmoid

DEFAULT_MODEL = "BAAI/bge-reranker-base"
CLOUDFLARE_MODEL = "@cf/baai/bge-reranker-base"
API_KEY_ENV = "NPRERANK_API_KEY"
log = logging.getLogger("uvicorn.error")  # uvicorn's logger, so our lines share its format


@dataclass(frozen=True)
class Limits:
    """Every bound the server enforces; each is a `nprerank serve` flag of the same name."""

    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body is refused with 413
    max_contexts: int = 1000  # contexts / texts / documents in one request
    queue_size: int = 64  # requests in progress (read, waiting or scored); one more is refused with 429
    batch_tokens: int = 16384  # tokens the worker takes from the queue for one forward call
    auto_truncate: bool = False  # TEI's `truncate` when a request leaves it out (TEI's default)

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be an integer >= 1, got {value!r}")


class ApiError(Exception):
    """A request we refuse. `kind` says why; each dialect maps kinds to its own status and shape."""

    KINDS = ("bad_json", "media_type", "invalid", "empty", "too_many", "too_long", "too_large",
             "unauthorized", "overloaded", "loading", "internal")

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class Query:
    """One rerank request, whatever dialect it came in: a query against a list of texts."""

    query: str
    texts: list
    top: int | None = None  # Cloudflare's top_k, Cohere's top_n
    raw_scores: bool = False  # TEI: logits instead of sigmoid scores
    return_text: bool = False  # TEI's return_text, Cohere's return_documents
    truncate: bool = True  # False: refuse a pair that does not fit instead of cutting it (TEI)
    model: str | None = None  # Cohere/Jina echo it back


# --- reading a request ------------------------------------------------------------------------


def parse_json(body: bytes):
    if not body.strip():
        raise ApiError("bad_json", "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 too
        raise ApiError("bad_json", f"the request body is not valid JSON: {e}") from None


def _object(payload) -> dict:
    if not isinstance(payload, dict):
        raise ApiError("invalid", f"the request body must be a JSON object, got {_json_type(payload)}")
    return payload


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise ApiError("invalid", f"{name} must be a string, got {_json_type(value)}")
    if not value:
        raise ApiError("invalid", f"{name} must not be empty")
    return value


def _query(payload: dict, ranked: str) -> str:
    if "query" not in payload:
        raise ApiError("invalid", f"query is required: the text to rank the {ranked} against")
    return _text(payload["query"], "query")


def _texts(items: list, name: str, objects: bool = True, strings: bool = True) -> list:
    """The text of each item: a string, or an object {"text": ...}, as far as the dialect allows."""
    texts = []
    for i, item in enumerate(items):
        if objects and isinstance(item, dict):
            if "text" not in item:
                raise ApiError("invalid", f"{name}[{i}] has no text field")
            texts.append(_text(item["text"], f"{name}[{i}].text"))
        elif strings:
            texts.append(_text(item, f"{name}[{i}]"))
        else:
            raise ApiError("invalid", f'{name}[{i}] must be an object {{"text": "..."}}, got {_json_type(item)}')
    return texts


def _list(payload: dict, name: str, limits: Limits, shape: str) -> list:
    if payload.get(name) is None:
        raise ApiError("invalid", f"{name} is required: {shape}")
    items = payload[name]
    if not isinstance(items, list):
        raise ApiError("invalid", f"{name} must be {shape}, got {_json_type(items)}")
    if not items:
        raise ApiError("empty", f"{name} must not be empty")
    if len(items) > limits.max_contexts:
        raise ApiError("too_many", f"{name} has {len(items)} items; this server takes at most "
                                   f"{limits.max_contexts} per request (--max-contexts)")
    return items


def _optional(payload: dict, name: str, kind: type, default=None):
    """An optional field; JSON null counts as absent. Integers must be >= 1."""
    value = payload.get(name)
    if value is None:
        return default
    if kind is bool and not isinstance(value, bool):
        raise ApiError("invalid", f"{name} must be true or false, got {_json_type(value)} {value!r:.40}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ApiError("invalid", f"{name} must be an integer >= 1, got {_json_type(value)} {value!r:.40}")
    return value


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- the dialects -----------------------------------------------------------------------------


class Dialect:
    """How one API family spells requests, answers and errors. Subclasses fill in the tables."""

    name = ""
    json_only = True  # refuse a body whose Content-Type is not JSON (415)
    statuses: dict = {}  # ApiError kind -> HTTP status

    def parse(self, payload, limits: Limits) -> Query:
        raise NotImplementedError

    def answer(self, query: Query, logits: np.ndarray, tokens: int, model_name: str):
        raise NotImplementedError

    def error(self, error: ApiError) -> tuple:
        """-> (HTTP status, JSON body)."""
        raise NotImplementedError


class Cloudflare(Dialect):
    """Workers AI `@cf/baai/bge-reranker-base`: {query, contexts: [{text}], top_k?} in an envelope.

    Cloudflare's own curl example sends its JSON with `-d` and no Content-Type (so curl labels it
    form-urlencoded): the body is parsed as JSON whatever its Content-Type says.
    """

    name = "cloudflare"
    json_only = False
    statuses = dict(bad_json=400, media_type=400, invalid=400, empty=400, too_long=400, too_many=413,
                    too_large=413, unauthorized=401, overloaded=429, loading=503, internal=500)
    # Workers AI's documented error codes (developers.cloudflare.com/workers-ai/platform/errors)
    codes = dict(too_many=(3006, "Request is too large"), too_large=(3006, "Request is too large"),
                 overloaded=(3040, "Out of capacity"), loading=(3040, "Out of capacity"),
                 unauthorized=(10000, "Authentication error"), internal=(5000, "Internal error"))

    def parse(self, payload, limits):
        payload = _object(payload)
        query = _query(payload, "contexts")
        contexts = _list(payload, "contexts", limits, 'a list of {"text": "..."} objects')
        texts = _texts(contexts, "contexts", strings=False)
        return Query(query, texts, top=_optional(payload, "top_k", int))

    def answer(self, query, logits, tokens, model_name):
        scores = sigmoid(logits)
        response = [{"id": i, "score": float(scores[i])} for i in best_first(scores, query.top)]
        return {"result": {"response": response}, "success": True, "errors": [], "messages": []}

    def error(self, error):
        code, title = self.codes.get(error.kind, (5006, "Bad input"))
        body = {"result": {}, "success": False, "errors": [{"code": code, "message": f"AiError: {title}: {error.message}"}],
                "messages": []}
        return self.statuses[error.kind], body


class TEI(Dialect):
    """Text Embeddings Inference `/rerank`: {query, texts, raw_scores?, return_text?, truncate?}.

    Statuses and error types follow TEI's router (router/src/http/server.rs): empty texts 400
    "empty", a batch over the limit or an input too long without truncation 413 "validation",
    overloaded 429, unhealthy 503. Body-level rejections (bad JSON 400, wrong field types 422,
    not JSON 415) are axum's, which TEI answers in plain text; we keep TEI's JSON shape for them.
    """

    name = "tei"
    statuses = dict(bad_json=400, media_type=415, invalid=422, empty=400, too_long=413, too_many=413,
                    too_large=413, unauthorized=401, overloaded=429, loading=503, internal=424)
    error_types = dict(empty="empty", overloaded="overloaded", loading="unhealthy", internal="backend",
                       unauthorized="unauthorized")

    def __init__(self, auto_truncate: bool = False):
        self.auto_truncate = auto_truncate

    def parse(self, payload, limits):
        payload = _object(payload)
        query = _query(payload, "texts")
        texts = _texts(_list(payload, "texts", limits, "a list of strings"), "texts", objects=False)
        direction = payload.get("truncation_direction")
        if direction is not None and (not isinstance(direction, str) or direction.lower() not in ("right", "left")):
            raise ApiError("invalid", f'truncation_direction must be "Right" or "Left", got {direction!r:.40}')
        if isinstance(direction, str) and direction.lower() == "left":
            raise ApiError("invalid", 'truncation_direction "Left" is not supported: nprerank cuts the end of the text')
        return Query(query, texts, raw_scores=_optional(payload, "raw_scores", bool, False),
                     return_text=_optional(payload, "return_text", bool, False),
                     truncate=_optional(payload, "truncate", bool, self.auto_truncate))

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


class Cohere(Dialect):
    """Cohere / Jina `/v1/rerank`: {model?, query, documents: [str | {text}], top_n?, return_documents?}.

    The answer carries both Cohere's `id` and `meta` and Jina's `model` and `usage`, so either
    client finds what it reads. Errors are `{"message": ...}`.
    """

    name = "cohere"
    statuses = dict(bad_json=400, media_type=415, invalid=400, empty=400, too_long=400, too_many=422,
                    too_large=413, unauthorized=401, overloaded=429, loading=503, internal=500)

    def parse(self, payload, limits):
        payload = _object(payload)
        query = _query(payload, "documents")
        documents = _list(payload, "documents", limits, 'a list of strings or {"text": "..."} objects')
        texts = _texts(documents, "documents")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError("invalid", f"model must be a string, got {_json_type(model)}")
        return Query(query, texts, top=_optional(payload, "top_n", int),
                     return_text=_optional(payload, "return_documents", bool, False), model=model)

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


# --- the worker that owns the model ---------------------------------------------------------


@dataclass
class Job:
    pairs: list  # [(query, text)] of one request
    tokens: int  # what those pairs cost the batch's token budget
    future: concurrent.futures.Future  # -> [len(pairs)] float32 logits


class Batcher:
    """A queue of jobs and one thread that loads the model, then scores the jobs in batches.

    The thread takes the oldest job, adds later ones while their tokens fit in `batch_tokens`,
    and runs one `reranker.logits` over all their pairs (the Reranker sorts and sub-batches them
    under its own memory budget). A job whose client went away is cancelled and skipped.
    """

    def __init__(self, reranker_or_loader, batch_tokens: int):
        if callable(reranker_or_loader) and not hasattr(reranker_or_loader, "logits"):
            self.reranker, self._load = None, reranker_or_loader
        else:
            self.reranker, self._load = reranker_or_loader, None
        self.queue = queue.Queue()  # unbounded here: build_app admits at most --queue-size requests
        self.batch_tokens = batch_tokens
        self.load_error = None
        self.on_load_failure = lambda: None  # serve() sets this to stop the server
        self.forward_calls = 0  # one per batch: requests_scored / forward_calls is the batching gain
        self.requests_scored = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="nprerank-model", daemon=True)

    @property
    def state(self) -> str:
        return "failed" if self.load_error else "ready" if self.reranker is not None else "loading"

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 5.0):
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check_ready(self):
        if self.load_error:
            raise ApiError("loading", f"the model failed to load: {self.load_error}")
        if self.reranker is None:
            raise ApiError("loading", "the model is still loading; retry in a few seconds (GET /health says when ready)")

    def submit(self, pairs: list, tokens: int) -> Job:
        self.check_ready()
        job = Job(pairs, tokens, concurrent.futures.Future())
        self.queue.put(job)
        return job

    @staticmethod
    def cancel(job: Job) -> None:
        """The client left: skip the job if it has not started, and let go of its texts now."""
        if job.future.cancel():
            job.pairs = []

    def _work(self):
        if self._load is not None:
            try:
                self.reranker = self._load()
            except Exception as e:  # any load failure: report it, then stop the server
                self.load_error = str(e) or type(e).__name__
                log.error("could not load the model: %s", self.load_error)
                self.on_load_failure()
                return
            log.info("model loaded; ready")
        held = None  # a job taken from the queue that did not fit the previous batch
        while not self._stopping.is_set():
            if held is None:
                try:
                    held = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            jobs, tokens, held = [held], held.tokens, None
            while tokens < self.batch_tokens:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job.future.cancelled():  # its client left: it takes no room in the batch
                    continue
                if tokens + job.tokens > self.batch_tokens:
                    held = job
                    break
                jobs.append(job)
                tokens += job.tokens
            self._score([job for job in jobs if job.future.set_running_or_notify_cancel()])

    def _score(self, jobs: list):
        if not jobs:
            return
        try:
            logits = self.reranker.logits([pair for job in jobs for pair in job.pairs])  # [sum of pairs]
        except Exception as e:
            if len(jobs) > 1:  # one failing request must not fail the others batched with it
                for job in jobs:
                    self._score([job])
                return
            log.exception("scoring failed")
            jobs[0].future.set_exception(ApiError("internal", f"scoring failed: {e}"))
            return
        self.forward_calls += 1
        self.requests_scored += len(jobs)
        start = 0
        for job in jobs:
            job.future.set_result(logits[start : start + len(job.pairs)])
            start += len(job.pairs)


# --- the ASGI app -----------------------------------------------------------------------------

CLOUDFLARE_PATHS = (f"/client/v4/accounts/{{account_id}}/ai/run/{CLOUDFLARE_MODEL}", f"/ai/run/{CLOUDFLARE_MODEL}")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OSError(f"nprerank serve needs {module}: pip install 'nprerank[server]'") from None


def build_app(reranker_or_loader, api_key: str | None = None, model_name: str = DEFAULT_MODEL, **limits):
    """A Starlette app serving a Reranker, or a zero-argument loader called in the model thread."""
    _require("starlette")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    limits = Limits(**limits)
    batcher = Batcher(reranker_or_loader, limits.batch_tokens)
    cloudflare, tei, cohere = Cloudflare(), TEI(limits.auto_truncate), Cohere()

    def check_key(request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError("unauthorized", "missing API key: send the header 'Authorization: Bearer <key>'")
        # header values arrive decoded as latin-1: back to the raw bytes, compared to the key's UTF-8
        if not hmac.compare_digest(given.strip().encode("latin-1"), api_key.encode()):
            raise ApiError("unauthorized", "invalid API key")

    async def read_body(request, dialect: Dialect) -> bytes:
        if dialect.json_only:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                got = f"got {media!r}" if media else "no Content-Type was sent"
                raise ApiError("media_type", f"send the body as JSON with 'Content-Type: application/json' ({got})")
        too_large = f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes (--max-body-bytes)"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError("too_large", too_large)
        body = bytearray()
        async for chunk in request.stream():  # also bounds a body sent without Content-Length
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError("too_large", too_large)
        return bytes(body)

    async def client_gone(request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    admitted = 0  # requests being read, tokenized, queued or scored; only the event loop touches it

    async def rerank(request, dialect: Dialect):
        nonlocal admitted
        try:
            check_key(request)
            if admitted >= limits.queue_size:  # refused before its body is read: memory stays bounded
                raise ApiError("overloaded", f"the server is busy: {admitted} requests are in progress "
                                             "(--queue-size); retry shortly")
            admitted += 1
            try:
                return await admitted_rerank(request, dialect)
            finally:
                admitted -= 1
        except ApiError as error:
            status, body = dialect.error(error)
            return JSONResponse(body, status_code=status)

    async def admitted_rerank(request, dialect: Dialect):
        try:
            query = dialect.parse(parse_json(await read_body(request, dialect)), limits)
            batcher.check_ready()
            pairs = [(query.query, text) for text in query.texts]
            max_length = batcher.reranker.tokenizer.max_length
            counts = await run_in_threadpool(batcher.reranker.token_counts, pairs)
            if not query.truncate and batcher.reranker.long_documents == "truncate":
                for i, count in enumerate(counts):
                    if count > max_length:
                        raise ApiError("too_long", f"Input validation error: `inputs` must have less than {max_length} "
                                                   f"tokens. Given: {count} (texts[{i}] with the query); "
                                                   "send truncate: true to cut it instead")
            tokens = sum(min(count, max_length) for count in counts)
            job = batcher.submit(pairs, tokens)
            gone = asyncio.ensure_future(client_gone(request))
            try:
                await asyncio.wait({asyncio.wrap_future(job.future), gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not job.future.done():  # the client left before its answer
                batcher.cancel(job)
                return Response(status_code=499)
            status, body = 200, dialect.answer(query, job.future.result(), tokens, model_name)
        except ApiError as error:
            status, body = dialect.error(error)
        except ClientDisconnect:
            return Response(status_code=499)
        return JSONResponse(body, status_code=status)

    async def cloudflare_route(request):
        return await rerank(request, cloudflare)

    async def tei_route(request):
        return await rerank(request, tei)

    async def cohere_route(request):
        return await rerank(request, cohere)

    async def health(request):
        status = {"status": batcher.state, "model": model_name, "queued": batcher.queue.qsize(),
                  "requests_scored": batcher.requests_scored, "forward_calls": batcher.forward_calls}
        if batcher.load_error:
            status["error"] = batcher.load_error
        return JSONResponse(status, status_code=200 if batcher.state == "ready" else 503)

    async def openapi(request):
        try:
            check_key(request)
        except ApiError as error:
            return JSONResponse({"message": error.message}, status_code=401)
        return JSONResponse(openapi_spec(limits))

    async def not_found(request, exc):
        path, status = request.url.path, getattr(exc, "status_code", 404)
        if "/ai/run/" in path and status == 404:  # Workers AI's answer for a model it does not serve
            model = path.split("/ai/run/", 1)[1]
            body = {"result": {}, "success": False, "messages": [],
                    "errors": [{"code": 5007, "message": f"AiError: No such model {model} or task; this server runs {CLOUDFLARE_MODEL}"}]}
            return JSONResponse(body, status_code=400)
        message = f"no route {request.method} {path}; see GET /openapi.json" if status == 404 else \
            f"{request.method} is not allowed on {path}; see GET /openapi.json"
        return JSONResponse({"message": message}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    routes = [Route(path, cloudflare_route, methods=["POST"]) for path in CLOUDFLARE_PATHS]
    routes += [Route("/rerank", tei_route, methods=["POST"]), Route("/v1/rerank", cohere_route, methods=["POST"]),
               Route("/health", health, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.batcher = batcher
    app.state.limits = limits
    return app


# --- the OpenAPI description ------------------------------------------------------------------


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
    from . import __version__

    return __version__


# --- running it -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; `nprerank serve` and `python -m nprerank.server` share them."""
    default = Limits()
    parser.add_argument("--model", default=os.environ.get("NPRERANK_MODEL") or DEFAULT_MODEL,
                        help=f"model folder or Hugging Face repo id (default $NPRERANK_MODEL or {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", metavar="PORT", type=positive_int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (or set ${API_KEY_ENV})")
    parser.add_argument("--max-body-bytes", metavar="BYTES", type=positive_int, default=default.max_body_bytes,
                        help=f"largest request body; larger is refused with 413 (default {default.max_body_bytes})")
    parser.add_argument("--max-contexts", metavar="N", type=positive_int, default=default.max_contexts,
                        help=f"most contexts/texts/documents in one request (default {default.max_contexts})")
    parser.add_argument("--queue-size", metavar="N", type=positive_int, default=default.queue_size,
                        help=f"requests in progress at once (being read, waiting or scored); more get 429 "
                             f"(default {default.queue_size})")
    parser.add_argument("--batch-tokens", metavar="N", type=positive_int, default=default.batch_tokens,
                        help=f"tokens of waiting requests scored in one forward call (default {default.batch_tokens})")
    parser.add_argument("--auto-truncate", action="store_true",
                        help="TEI /rerank: cut over-long inputs when a request does not say `truncate` "
                             "(default: refuse them with 413, as TEI does)")
    parser.add_argument("--threads", metavar="N", type=positive_int, default=None, help="CPU threads for the model (default: all cores)")
    parser.add_argument("--long-documents", choices=("truncate", "chunk"), default="truncate",
                        help="a passage longer than the model takes: cut it (default), or score its best window")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default info)")


def serve_from_args(args: argparse.Namespace) -> None:
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, threads=args.threads,
          long_documents=args.long_documents, log_level=args.log_level, max_body_bytes=args.max_body_bytes,
          max_contexts=args.max_contexts, queue_size=args.queue_size, batch_tokens=args.batch_tokens,
          auto_truncate=args.auto_truncate)


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          threads: int | None = None, long_documents: str = "truncate", log_level: str = "info", **limits) -> None:
    """Serve `model` until Ctrl-C or SIGTERM, then return. Raises ModelError if the model fails to load."""
    uvicorn = _require("uvicorn")
    from .reranker import Reranker

    api_key = api_key or os.environ.get(API_KEY_ENV) or None

    def load():
        options = {"long_documents": long_documents}
        if threads is not None:
            options["threads"] = threads
        return Reranker.from_pretrained(model, **options)

    app = build_app(load, api_key=api_key, model_name=str(model), **limits)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use it", host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    app.state.batcher.on_load_failure = lambda: setattr(server, "should_exit", True)
    with _signals_end_quietly():
        server.run()
    if app.state.batcher.load_error:
        raise ModelError(f"could not load the model {model}: {app.state.batcher.load_error}")


@contextlib.contextmanager
def _signals_end_quietly():
    """Uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to whatever
    handler was there before; make that handler a no-op so a requested stop exits 0, not -15."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nprerank.server",
                                     description="Serve bge-reranker-base over HTTP (Cloudflare, TEI and Cohere/Jina APIs).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve_from_args(args)
    except (ValueError, OSError) as e:  # ModelError is a ValueError
        print(f"nprerank serve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
