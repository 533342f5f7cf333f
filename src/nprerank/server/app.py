"""The ASGI app: the route table, the gate every request passes (connections, Host, Origin, API
key), reading bodies under a deadline, admission (--queue-size), and handing requests to the batcher.

What a request may cost, in the order it is spent (docs/server.md states the same):
1. a socket: at most --max-connections are open; on one more, the request is refused (429) and
   the socket closed. Headers must arrive within --header-timeout or the socket is closed (run.py).
2. its body: read whole before anything else, at most --max-body-bytes, within --body-timeout
   (else 413 / 408). A slow sender holds only its own socket, never a place in the model's queue.
3. a queue place: only requests read whole take one of --queue-size places (else 429 at once).
4. tokens: the request is parsed and tokenized once, in a worker thread; the tokenizer never sees
   more text than can reach the model (Reranker.encode's bound), so the work is bounded by the
   texts' count (--max-contexts) times the model's max_length, whatever the body's shape.
5. the model: the batcher scores its sequences with other requests' under --batch-tokens.

Every refusal and every failure, wherever it happens, is answered in the shape of the dialect the
path belongs to (a route that is no dialect's answers `{"message": ...}`), and never names a path
on the server's disk. Read next: batcher.py (the worker), run.py (how `nprerank serve` starts it).
"""

import asyncio
import contextlib
import hmac
import logging
import re

from .access import Access
from .batcher import Batcher
from .cloudflare import Cloudflare, unlisted
from .cohere import Cohere
from .dialects import dialects
from .limits import Limits
from .openapi import openapi_spec
from .protocol import DEFAULT_MODEL, ApiError, Dialect, parse_json
from .tei import TEI

log = logging.getLogger("uvicorn.error")  # uvicorn's logger, so our lines share its format
OVER_CAPACITY = "nprerank.over_capacity"  # run.py marks a connection past --max-connections in scope["state"]
# an absolute path (POSIX or Windows) in a message: only its last part may leave the server
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"`:,;()]+)+[\\/]([^\s\\/'\"`:,;()]+)")


def require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OSError(f"nprerank serve needs {module}: pip install 'nprerank[server]'") from None


def hide_paths(message: str) -> str:
    """'/home/me/models/bge/model.safetensors changed' -> 'model.safetensors changed': answers
    tell a client what went wrong, not how the server's disk is laid out (the log keeps it all)."""
    return _PATH.sub(r"\1", message)


def refusal(dialect: Dialect, error: ApiError, close: bool = False):
    """An ApiError as the dialect's JSON answer; `close` when the body was not read (it cannot be reused)."""
    from starlette.responses import JSONResponse

    status, body, headers = dialect.error_response(ApiError(error.kind, hide_paths(error.message)))
    return JSONResponse(body, status_code=status, headers={**headers, "connection": "close"} if close else headers)


def build_app(
    reranker_or_loader,
    api_key: str | None = None,
    model_name: str = DEFAULT_MODEL,
    access: Access | None = None,
    model_source: str | None = None,
    **limits,
):
    """A Starlette app serving a Reranker, or a zero-argument loader called in the model thread
    (then a changed checkpoint is reloaded; see batcher.py). model_name: what clients are told the
    model is; model_source: the folder or repo id it came from (default model_name), never shown."""
    require("starlette")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    limits = Limits(**limits)
    access = access or Access()
    batcher = Batcher(reranker_or_loader, limits.batch_tokens)
    # a model Workers AI does not list gets no @cf route; model_source (the folder or repo id as
    # given, never shown to clients) tells, as model_name may be only a folder's name
    cloudflare_unlisted = unlisted(model_source or model_name)
    spoken = [d for d in dialects(limits) if not (cloudflare_unlisted and isinstance(d, Cloudflare))]
    tei = next(dialect for dialect in spoken if isinstance(dialect, TEI))
    cohere = next(dialect for dialect in spoken if type(dialect) is Cohere)  # {"message"}: routes of no dialect

    def dialect_of(path: str) -> Dialect:
        """The dialect whose shape a request to `path` is answered in, even a refusal or a 404."""
        if Cloudflare.is_cloudflare_path(path):
            # its shape even where the served model has no @cf route (unlisted: the 404 says so)
            return next((dialect for dialect in spoken if isinstance(dialect, Cloudflare)), Cloudflare())
        return next((dialect for dialect in spoken if path in dialect.paths), cohere)

    def check_key(request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError("unauthorized", "missing API key: send the header 'Authorization: Bearer <key>'")
        # header values arrive decoded as latin-1: back to the raw bytes, compared to the key's UTF-8
        if not hmac.compare_digest(given.strip().encode("latin-1"), api_key.encode()):
            raise ApiError("unauthorized", "invalid API key")

    def gate(scope) -> ApiError | None:
        """The checks made before a request is routed, each one a refusal in the dialect's shape."""
        headers = {
            key.decode(): value.decode("latin-1") for key, value in scope["headers"] if key in (b"host", b"origin")
        }
        if scope.get("state", {}).get(OVER_CAPACITY):
            return ApiError(
                "overloaded",
                f"the server has {limits.max_connections} connections open (--max-connections); retry shortly",
            )
        if not access.host_allowed(headers.get("host")):
            return ApiError(
                "forbidden",
                f"the Host header {headers.get('host', '(none)')!r:.80} names no host this "
                "server answers to; start it with --allowed-host NAME to add one "
                "(a guard against DNS rebinding)",
            )
        if not access.origin_allowed(headers.get("origin"), headers.get("host")):
            return ApiError(
                "forbidden",
                f"requests from web pages of Origin {headers['origin']!r:.80} are not "
                "allowed; start the server with --allowed-origin ORIGIN to allow them",
            )
        return None

    class Gate:
        """The gate above, then the app; any failure below answers in shape. Outermost but for
        CORS (which adds its headers to the gate's refusals too).

        After --shutdown-timeout uvicorn cancels the requests still in progress: they answer 503
        "shutting down" in their dialect's shape instead of uvicorn's 500 text/plain.
        """

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            dialect, started = dialect_of(scope["path"]), False

            async def tracked_send(message):
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                error = gate(scope)
                if error is not None:
                    return await refusal(dialect, error, close=True)(scope, receive, send)
                await self.app(scope, receive, tracked_send)
            except asyncio.CancelledError:
                if started:
                    raise
                error = ApiError("loading", "the server is shutting down; retry on another instance or later")
                await refusal(dialect, error, close=True)(scope, receive, send)
            except Exception as e:
                log.exception("failed while answering %s %s", scope["method"], scope["path"])
                if started:
                    raise
                error = ApiError("internal", f"internal error: {type(e).__name__}: {e}")
                await refusal(dialect, error, close=True)(scope, receive, send)

    def check_media(request, dialect: Dialect) -> None:
        if dialect.json_only:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                got = f"got {media!r}" if media else "no Content-Type was sent"
                raise ApiError("media_type", f"send the body as JSON with 'Content-Type: application/json' ({got})")

    async def read_body(request) -> bytes:
        too_large = (
            f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes (--max-body-bytes)"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError("too_large", too_large)

        async def whole_body() -> bytes:
            body = bytearray()
            async for chunk in request.stream():  # also bounds a body sent without Content-Length
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise ApiError("too_large", too_large)
            return bytes(body)

        try:  # one deadline for the whole body: a trickle of bytes cannot keep extending it
            return await asyncio.wait_for(whole_body(), limits.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(
                "timeout", f"the request body did not arrive within {limits.body_timeout:g} s (--body-timeout)"
            ) from None

    async def client_gone(request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    admitted = 0  # requests read whole and parsed, tokenized, queued or scored; only the event loop touches it

    async def rerank(request, dialect: Dialect):
        nonlocal admitted
        try:
            # read whole first (bounded by size and time): a refusal of a body left unread must close
            # the connection, and closing on unread bytes makes the kernel reset it, which can lose
            # the answer before the client reads it (seen with --workers). A read body keeps it open.
            body = await read_body(request)
        except ApiError as error:  # too large, or too slow: the connection cannot carry another request
            return refusal(dialect, error, close=True)
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            check_key(request)
            check_media(request, dialect)
        except ApiError as error:
            return refusal(dialect, error)
        try:
            if admitted >= limits.queue_size:
                raise ApiError(
                    "overloaded",
                    f"the server is busy: {admitted} requests are in progress (--queue-size); retry shortly",
                )
            admitted += 1
            try:
                return await admitted_rerank(request, dialect, body)
            finally:
                admitted -= 1
        except ApiError as error:
            return refusal(dialect, error)

    def tokenize(dialect: Dialect, body: bytes):
        """Parse and tokenize one request, once (in a worker thread: a large body takes a while)."""
        query = dialect.parse(parse_json(body), limits)
        batcher.check_ready()
        reranker = batcher.reranker
        pairs = [(query.query, text) for text in query.texts]
        try:
            encoding = reranker.encode(pairs, truncation=query.truncation, passage_max_length=query.passage_max_length)
        except ValueError as e:  # text the tokenizer refuses (e.g. lone surrogates), named by the library
            raise ApiError("invalid", str(e)) from None
        if not query.truncate and reranker.long_documents == "truncate":
            for i, length in enumerate(encoding.lengths):
                if length > encoding.max_length:
                    raise ApiError(
                        "too_long",
                        f"Input validation error: `inputs` must have less than "
                        f"{encoding.max_length} tokens. Given: more than {encoding.max_length} "
                        f"(texts[{i}] with the query); send truncate: true to cut it instead",
                    )
        return query, encoding

    async def admitted_rerank(request, dialect: Dialect, body: bytes):
        query, encoding = await run_in_threadpool(tokenize, dialect, body)
        del body  # the texts live on in `query`; the raw bytes are not needed any more
        tokens = sum(len(sequence) for sequence in encoding.sequences)
        job = batcher.submit(encoding.sequences, tokens)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({asyncio.wrap_future(job.future), gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():  # the client left before its answer
            batcher.cancel(job)
            return Response(status_code=499)
        logits = encoding.pair_logits(job.future.result())  # [pairs]: a chunked text scores as its best window
        return JSONResponse(dialect.answer(query, logits, tokens, model_name))

    def rerank_route(dialect: Dialect):
        async def route(request):
            return await rerank(request, dialect)

        return route

    async def tei_info(request):
        try:
            check_key(request)
            batcher.check_ready()
        except ApiError as error:
            return refusal(tei, error)
        reranker = batcher.reranker
        return JSONResponse(tei.info(model_name, reranker.tokenizer.max_length, limits, reranker.precision))

    async def health(request):
        status = {
            "status": batcher.state,
            "model": model_name,
            "queued": batcher.queue.qsize(),
            "requests_scored": batcher.requests_scored,
            "forward_calls": batcher.forward_calls,
        }
        if batcher.problem:
            status["error"] = hide_paths(batcher.problem)
        return JSONResponse(status, status_code=200 if batcher.state == "ready" else 503)

    async def openapi(request):
        try:
            check_key(request)
        except ApiError as error:
            return refusal(cohere, error)
        return JSONResponse(openapi_spec(limits))

    async def not_found(request, exc):
        status, cloudflare = getattr(exc, "status_code", 404), Cloudflare.is_cloudflare_path(request.url.path)
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."  # not echoed whole
        if status == 404 and cloudflare:  # an unknown account path or model
            status, body = Cloudflare.no_route(path, cloudflare_unlisted)
            return JSONResponse(body, status_code=status)
        message = (
            f"no route {request.method} {path}; see GET /openapi.json"
            if status == 404
            else f"{request.method} is not allowed on {path}; see GET /openapi.json"
        )
        return JSONResponse({"message": message}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if batcher.serve_when_settled:  # uvicorn accepts only after this: no 503 "loading" from a worker
            await run_in_threadpool(batcher.settled.wait)
        yield
        await run_in_threadpool(batcher.stop)  # joining the model thread must not stall the event loop

    routes = [Route(path, rerank_route(dialect), methods=["POST"]) for dialect in spoken for path in dialect.paths]
    # GET /ping and GET / are the health probes of TEI's deployments (SageMaker, Inference Endpoints)
    routes += [Route(path, health, methods=["GET"]) for path in ("/health", "/ping", "/")]
    routes += [Route("/info", tei_info, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"])]
    middleware = [Middleware(Gate)]
    if access.any_origin or access.origins:  # browsers of the allowed origins get CORS headers and preflights
        # outside the gate, so that its refusals (429 over capacity, 503 shutting down, 500) reach a
        # page of an allowed origin readable, Retry-After included, not as an opaque network error
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=["*"] if access.any_origin else sorted(access.origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["Retry-After"],
            ),
        )
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={404: not_found, 405: not_found}
    )
    app.state.batcher = batcher
    app.state.limits = limits
    return app
