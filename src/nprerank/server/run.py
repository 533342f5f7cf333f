"""Running the server: the `serve` flags, `serve()` (uvicorn until Ctrl-C or SIGTERM), `main()`.

Read next: app.py (what is served).
"""

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from ..arguments import positive_int
from ..config import ModelError
from .app import build_app, require
from .limits import Limits
from .protocol import DEFAULT_MODEL

API_KEY_ENV = "NPRERANK_API_KEY"
log = logging.getLogger("uvicorn.error")  # uvicorn's logger, so our lines share its format


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
    parser.add_argument("--auto-truncate", action=argparse.BooleanOptionalAction, default=default.auto_truncate,
                        help="TEI routes: cut an over-long pair when a request leaves out `truncate`, as TEI does "
                             "since 1.9 (default); --no-auto-truncate refuses it with 413, as older TEI did")
    parser.add_argument("--truncation", choices=("only_second", "longest_first"), default=None,
                        help="how every route cuts a pair too long for the model: only the passage (only_second), "
                             "or the longer side first (longest_first); default: TEI routes longest_first as TEI "
                             "does, the others only_second as FlagEmbedding does")
    parser.add_argument("--threads", metavar="N", type=positive_int, default=None, help="CPU threads for the model (default: all cores)")
    parser.add_argument("--long-documents", choices=("truncate", "chunk"), default="truncate",
                        help="a passage longer than the model takes: cut it (default), or score its best window")
    parser.add_argument("--workers", metavar="N", type=positive_int, default=1,
                        help="server processes sharing the port and one memory-mapped copy of the weights "
                             "(default 1; see docs/scale.md)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default info)")


def serve_from_args(args: argparse.Namespace) -> None:
    options = dict(model=args.model, host=args.host, port=args.port, api_key=args.api_key, threads=args.threads,
                   long_documents=args.long_documents, log_level=args.log_level, max_body_bytes=args.max_body_bytes,
                   max_contexts=args.max_contexts, queue_size=args.queue_size, batch_tokens=args.batch_tokens,
                   auto_truncate=args.auto_truncate, truncation=args.truncation)
    if args.workers > 1:
        from .replicas import serve_replicas

        return serve_replicas(args.workers, options)
    serve(**options)


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          threads: int | None = None, long_documents: str = "truncate", log_level: str = "info", sockets=None,
          preload: bool = False, **limits) -> None:
    """Serve `model` until Ctrl-C or SIGTERM, then return. Raises ModelError if the model fails to load.
    sockets: listening sockets to accept on instead of binding host:port (replicas.py's workers).
    preload: load the model before accepting any connection (a worker sharing a port with others
    must not take a request it would answer 503)."""
    uvicorn = require("uvicorn")
    from ..reranker import Reranker

    api_key = api_key or os.environ.get(API_KEY_ENV) or None

    def load():
        options = {"long_documents": long_documents}
        if threads is not None:
            options["threads"] = threads
        if limits.get("truncation"):  # the server's --truncation, for routes whose Query leaves it to the server
            options["truncation"] = limits["truncation"]
        return Reranker.from_pretrained(model, **options)

    app = build_app(load() if preload else load, api_key=api_key, model_name=str(model), **limits)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use it", host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    app.state.batcher.on_load_failure = lambda: setattr(server, "should_exit", True)
    with _signals_end_quietly():
        server.run(sockets=sockets)
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
