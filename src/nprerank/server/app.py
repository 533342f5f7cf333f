"""The ASGI app: the route table, the API key, admission (--queue-size), reading bodies, and
handing parsed requests to the batcher.

Read next: batcher.py (the worker), run.py (how `nprerank serve` starts it).
"""

import asyncio
import contextlib
import hmac

from .batcher import Batcher
from .cloudflare import Cloudflare, unlisted
from .dialects import dialects
from .limits import Limits
from .openapi import openapi_spec
from .protocol import DEFAULT_MODEL, ApiError, Dialect, parse_json
from .tei import TEI


def require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OSError(f"nprerank serve needs {module}: pip install 'nprerank[server]'") from None


def build_app(reranker_or_loader, api_key: str | None = None, model_name: str = DEFAULT_MODEL, **limits):
    """A Starlette app serving a Reranker, or a zero-argument loader called in the model thread."""
    require("starlette")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    limits = Limits(**limits)
    batcher = Batcher(reranker_or_loader, limits.batch_tokens)
    cloudflare_unlisted = unlisted(model_name)  # a model Workers AI does not list gets no @cf route
    spoken = [d for d in dialects(limits) if not (cloudflare_unlisted and isinstance(d, Cloudflare))]
    tei = next(dialect for dialect in spoken if isinstance(dialect, TEI))

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
            status, body, headers = dialect.error_response(error)
            return JSONResponse(body, status_code=status, headers=headers)

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
            status, body, headers = 200, dialect.answer(query, job.future.result(), tokens, model_name), {}
        except ApiError as error:
            status, body, headers = dialect.error_response(error)
        except ClientDisconnect:
            return Response(status_code=499)
        return JSONResponse(body, status_code=status, headers=headers)

    def rerank_route(dialect: Dialect):
        async def route(request):
            return await rerank(request, dialect)
        return route

    async def tei_info(request):
        try:
            check_key(request)
            batcher.check_ready()
        except ApiError as error:
            status, body, headers = tei.error_response(error)
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse(tei.info(model_name, batcher.reranker.tokenizer.max_length, limits))

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
        if status == 404 and Cloudflare.is_cloudflare_path(path):  # an unknown account path or model
            status, body = Cloudflare.no_route(path, cloudflare_unlisted)
            return JSONResponse(body, status_code=status)
        message = f"no route {request.method} {path}; see GET /openapi.json" if status == 404 else \
            f"{request.method} is not allowed on {path}; see GET /openapi.json"
        return JSONResponse({"message": message}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    routes = [Route(path, rerank_route(dialect), methods=["POST"]) for dialect in spoken for path in dialect.paths]
    # GET /ping and GET / are the health probes of TEI's deployments (SageMaker, Inference Endpoints)
    routes += [Route(path, health, methods=["GET"]) for path in ("/health", "/ping", "/")]
    routes += [Route("/info", tei_info, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.batcher = batcher
    app.state.limits = limits
    return app
